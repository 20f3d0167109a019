/* The protected runner's per-row passes in one compiled loop each (issue 28): see tsqp/trusted/protect/fast.py.
 *
 * Ring Z_2^40: an element's limb j is byte j. Pads and limbs are planar uint8 [5, rows, width]; a plane's
 * stride (in elements) is passed, so a slice of a pool's block needs no copy. Every function takes raw
 * addresses (the Python side checks dtypes, shapes and contiguity), works on rows [a, b) per thread, and
 * releases the GIL. Plain C99 + pthreads: no JIT, nothing written at run time (loads in a TDX guest and
 * under Gramine like any shared library). The arithmetic is the torch reference's, step for step:
 *   quantize   scale = max|x| / 32767 (float32), q = rint(x / (scale > 0 ? scale : 1)) clamped to +-32767
 *   mask       B = q + R mod 2^40, cut into limbs
 *   finish     off = Z - U mod 2^40 (U holds R W^T - 2^39), Y = off - 2^39, y = ((float)Y * sx) * sw
 *   checks     X . ws and Y . s mod PRIME, exact in 64-bit partial sums of 21/20-bit limb products
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define LIMBS 5
#define MOD (1LL << 40)
#define MASK (MOD - 1)
#define HALF (1LL << 39)
#define ACT_MAX 32767.0f
#define CHUNK 512                      /* elements of Z copied into private memory before any use */
#define MAX_THREADS 64

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

typedef struct {
    /* mask */
    const float *x; const int64_t *r64; const uint8_t *r8; int64_t r_plane;
    uint8_t *limbs; int64_t limb_plane; float *quantized; float *scale;
    /* finish */
    const int64_t *z; const int64_t *u64; const uint8_t *u8; int64_t u_plane;
    const float *sx; const float *sw; float *y; int64_t kept; int64_t *offsets;
    /* checks: 21-bit limbs (lo, hi) of ws [width] or s [width]; side [rows] out; prime; constant */
    const int32_t *c_lo; const int32_t *c_hi; int64_t *side; int64_t prime; int64_t constant;
    /* combine: the planes' int32 limb products, [5, rows, p_row] each (a column block of U), and U's row stride */
    const int32_t *p_hi; const int32_t *p_lo; int64_t p_row; int64_t limb_row;
    int64_t width; int bad;
} Job;

typedef void (*RowFn)(Job *job, int64_t a, int64_t b);

typedef struct { Job *job; RowFn fn; int64_t a, b; } Slice;

static void *run_slice(void *arg) {
    Slice *s = (Slice *)arg;
    s->fn(s->job, s->a, s->b);
    return NULL;
}

/* Rows [0, rows) split evenly over `threads` threads (this one among them); each thread's `bad` flag is
 * OR-ed into the job's. */
static int run_rows(Job *job, RowFn fn, int64_t rows, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    Job jobs[MAX_THREADS];
    Slice slices[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        jobs[i] = *job;
        jobs[i].bad = 0;
        slices[i] = (Slice){&jobs[i], fn, rows * i / threads, rows * (i + 1) / threads};
    }
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, run_slice, &slices[i]) == 0;
    for (int i = 1; i < threads; i++)
        if (!started[i]) run_slice(&slices[i]);          /* no thread to be had: this one does it */
    run_slice(&slices[0]);
    for (int i = 1; i < threads; i++)
        if (started[i]) pthread_join(ids[i], NULL);
    for (int i = 0; i < threads; i++) job->bad |= jobs[i].bad;
    return job->bad;
}

/* (lo + 2^21 hi) mod p for 64-bit partial sums of either sign; p < 2^42. */
static int64_t combine21(int64_t lo, int64_t hi, int64_t p) {
    __int128 v = (__int128)lo + ((__int128)hi << 21);
    int64_t m = (int64_t)(v % p);
    return m < 0 ? m + p : m;
}

/* ---- mask: quantize a row, add its pad, cut into limbs (and the check's input side) ------------------ */
CLONES static float row_absmax(const float *x, int64_t n, int *bad) {
    float m = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        nan |= a != a;
        m = a > m ? a : m;
    }
    *bad |= nan | isinf(m);
    return m;
}

/* R's element k from a pad: int64 rows, or five planes `plane` elements apart */
static inline int64_t pad_at(const int64_t *restrict r64, const uint8_t *restrict r8, int64_t plane, int64_t k) {
    if (r64) return r64[k];
    return (int64_t)((uint64_t)r8[k] | (uint64_t)r8[k + plane] << 8 | (uint64_t)r8[k + 2 * plane] << 16 |
                     (uint64_t)r8[k + 3 * plane] << 24 | (uint64_t)r8[k + 4 * plane] << 32);
}

CLONES static void mask_one(Job *j, int64_t t) {
    const int64_t n = j->width, lp = j->limb_plane, rp = j->r_plane;
    const float *restrict x = j->x + t * n;
    int bad = 0;
    const float scale = row_absmax(x, n, &bad) / ACT_MAX;
    j->scale[t] = scale;
    if (bad) { j->bad = 1; return; }
    const float divisor = scale > 0.0f ? scale : 1.0f;
    float *restrict qout = j->quantized ? j->quantized + t * n : NULL;
    uint8_t *restrict l0 = j->limbs + t * n;
    const int64_t *restrict r64 = j->r64 ? j->r64 + t * n : NULL;
    const uint8_t *restrict r8 = j->r8 ? j->r8 + t * n : NULL;
    const int32_t *restrict c_lo = j->c_lo, *restrict c_hi = j->c_hi;
    int32_t qi[CHUNK];
    int64_t acc_lo = 0, acc_hi = 0;
    for (int64_t c = 0; c < n; c += CHUNK) {
        const int64_t m = n - c < CHUNK ? n - c : CHUNK;
        for (int64_t i = 0; i < m; i++) {
            float q = rintf(x[c + i] / divisor);
            q = q < -ACT_MAX ? -ACT_MAX : (q > ACT_MAX ? ACT_MAX : q);
            if (qout) qout[c + i] = q;
            qi[i] = (int32_t)q;
        }
        if (r64)
            for (int64_t i = 0; i < m; i++) {
                uint64_t b = (uint64_t)(r64[c + i] + qi[i]);
                l0[c + i] = (uint8_t)b; l0[c + i + lp] = (uint8_t)(b >> 8); l0[c + i + 2 * lp] = (uint8_t)(b >> 16);
                l0[c + i + 3 * lp] = (uint8_t)(b >> 24); l0[c + i + 4 * lp] = (uint8_t)(b >> 32);
            }
        else {
            /* B = R + q mod 2^40 plane by plane in 32-bit lanes (vectorizes): the low four bytes as one word
             * plus q mod 2^32, then byte 4 gets the carry and q's sign (q < 0 adds 2^32 - |q|, one 2^32 too many) */
            const uint8_t *restrict p0 = r8 + c, *restrict p1 = p0 + rp, *restrict p2 = p1 + rp, *restrict p3 = p2 + rp,
                          *restrict p4 = p3 + rp;
            uint8_t *restrict o0 = l0 + c, *restrict o1 = o0 + lp, *restrict o2 = o1 + lp, *restrict o3 = o2 + lp,
                    *restrict o4 = o3 + lp;
#pragma GCC ivdep
            for (int64_t i = 0; i < m; i++) {
                const uint32_t lo = (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 | (uint32_t)p3[i] << 24;
                const uint32_t s = lo + (uint32_t)qi[i];
                o0[i] = (uint8_t)s; o1[i] = (uint8_t)(s >> 8); o2[i] = (uint8_t)(s >> 16); o3[i] = (uint8_t)(s >> 24);
                o4[i] = (uint8_t)(p4[i] + (uint32_t)(s < lo) + (uint32_t)(qi[i] >> 31));
            }
        }
        if (c_lo)
            for (int64_t i = 0; i < m; i++) {
                acc_lo += (int64_t)qi[i] * c_lo[c + i];
                acc_hi += (int64_t)qi[i] * c_hi[c + i];
            }
    }
    if (c_lo) j->side[t] = combine21(acc_lo, acc_hi, j->prime);
}

static void mask_rows(Job *j, int64_t a, int64_t b) {
    for (int64_t t = a; t < b; t++) mask_one(j, t);
}

/* ---- finish: range-check Z, unmask, lift, dequantize (and the check's output side) ------------------- */
/* Y . s mod p from off = Y + 2^39 in [0, 2^40): off = 2^20 oh + ol, s = 2^21 sh + sl (c_hi, c_lo), four
 * sums of products below 2^41 each (below 2^58 over 2^17 outputs); constant = 2^39 sum(s) mod p. */
static int64_t output_side_of(uint64_t ll, uint64_t lh, uint64_t hl, uint64_t hh, int64_t p, int64_t constant) {
    __int128 v = (__int128)ll + ((__int128)lh << 21) + ((__int128)hl << 20) + ((__int128)hh << 41);
    int64_t m = (int64_t)(v % p) - constant;
    return m < 0 ? m + p : m;
}

CLONES static void finish_one(Job *j, int64_t t) {
    const int64_t n = j->width, up = j->u_plane;
    const int64_t *restrict z = j->z + t * n;
    const int keep = t < j->kept;
    float *restrict y = keep ? j->y + t * n : NULL;
    int64_t *restrict offsets = j->offsets ? j->offsets + t * n : NULL;
    const float sx = keep ? j->sx[t] : 0.0f;
    const float *restrict sw = j->sw;
    const int64_t *restrict u64 = j->u64 ? j->u64 + t * n : NULL;
    const uint8_t *restrict u8 = j->u8 ? j->u8 + t * n : NULL;
    const int32_t *restrict c_lo = j->c_lo, *restrict c_hi = j->c_hi;
    uint64_t ll = 0, lh = 0, hl = 0, hh = 0;
    int64_t private[CHUNK];
    for (int64_t c = 0; c < n; c += CHUNK) {
        const int64_t m = n - c < CHUNK ? n - c : CHUNK;
        /* the server may write its buffer meanwhile: what is range-checked, unmasked and checked is this copy */
        memcpy(private, z + c, (size_t)m * sizeof(int64_t));
        __asm__ __volatile__("" ::: "memory");
        uint64_t bad = 0;
        for (int64_t i = 0; i < m; i++) bad |= (uint64_t)private[i] >> 40;
        if (bad) { j->bad = 1; return; }
        if (u64)
            for (int64_t i = 0; i < m; i++) private[i] = (private[i] - u64[c + i]) & MASK;
        else {                         /* the planes' pointers apart, or gcc's alias check keeps this scalar */
            const uint8_t *restrict q0 = u8 + c, *restrict q1 = q0 + up, *restrict q2 = q1 + up, *restrict q3 = q2 + up,
                          *restrict q4 = q3 + up;
#pragma GCC ivdep
            for (int64_t i = 0; i < m; i++) {
                const uint64_t u = (uint64_t)q0[i] | (uint64_t)q1[i] << 8 | (uint64_t)q2[i] << 16 |
                                   (uint64_t)q3[i] << 24 | (uint64_t)q4[i] << 32;
                private[i] = (int64_t)(((uint64_t)private[i] - u) & MASK);
            }
        }
        if (c_lo)
            for (int64_t i = 0; i < m; i++) {
                uint64_t ol = (uint64_t)private[i] & 0xFFFFF, oh = (uint64_t)private[i] >> 20;
                uint64_t sl = (uint32_t)c_lo[c + i], sh = (uint32_t)c_hi[c + i];
                ll += ol * sl; lh += ol * sh; hl += oh * sl; hh += oh * sh;
            }
        if (offsets) memcpy(offsets + c, private, (size_t)m * sizeof(int64_t));
        if (y)
            for (int64_t i = 0; i < m; i++) y[c + i] = ((float)(private[i] - HALF) * sx) * sw[c + i];
    }
    if (c_lo) j->side[t] = output_side_of(ll, lh, hl, hh, j->prime, j->constant);
}

static void finish_rows(Job *j, int64_t a, int64_t b) {
    for (int64_t t = a; t < b; t++) finish_one(j, t);
}

/* ---- the checks' sides from kept copies (deferred checks) --------------------------------------------- */
CLONES static void input_side_rows(Job *j, int64_t a, int64_t b) {
    const int64_t n = j->width;
    for (int64_t t = a; t < b; t++) {
        const float *x = j->x + t * n;
        int64_t acc_lo = 0, acc_hi = 0;
        for (int64_t i = 0; i < n; i++) {
            int32_t qi = (int32_t)x[i];
            acc_lo += (int64_t)qi * j->c_lo[i];
            acc_hi += (int64_t)qi * j->c_hi[i];
        }
        j->side[t] = combine21(acc_lo, acc_hi, j->prime);
    }
}

CLONES static void output_side_rows(Job *j, int64_t a, int64_t b) {
    const int64_t n = j->width;
    for (int64_t t = a; t < b; t++) {
        const int64_t *off = j->offsets + t * n;
        uint64_t ll = 0, lh = 0, hl = 0, hh = 0;
        for (int64_t k = 0; k < n; k++) {
            uint64_t ol = (uint64_t)off[k] & 0xFFFFF, oh = ((uint64_t)off[k] >> 20) & 0xFFFFF;
            uint64_t sl = (uint32_t)j->c_lo[k], sh = (uint32_t)j->c_hi[k];
            ll += ol * sl; lh += ol * sh; hl += oh * sl; hh += oh * sh;
        }
        j->side[t] = output_side_of(ll, lh, hl, hh, j->prime, j->constant);
    }
}

/* ---- the pool: U's limbs from the limb GEMM's int32 products ----------------------------------------- */
/* hi, lo int32 [5, rows, p_row] (limb j's products with the hi plane and with the lo plane, for a block of
 * `out` of U's columns), offset int64 [out] (the block's 128 colsum(W) sum_j 2^(8j) mod 2^40) -> the limbs of B W^T - 2^39 mod 2^40 (ring.py's _combine, exact:
 * every step is mod 2^64 wrapping arithmetic, and only the low 40 bits are kept). */
CLONES static void combine_rows(Job *j, int64_t a, int64_t b) {
    const int64_t out = j->width, rows = j->kept, lp = j->limb_plane, pr = j->p_row;
    const int32_t *restrict hi = j->p_hi, *restrict lo = j->p_lo;
    const int64_t *restrict offset = j->z;
    for (int64_t t = a; t < b; t++) {
        uint8_t *restrict l0 = j->limbs + t * j->limb_row;
        for (int64_t k = 0; k < out; k++) {
            uint64_t y = (uint64_t)offset[k] - (uint64_t)HALF;
            for (int l = 0; l < LIMBS - 1; l++) {
                const int64_t at = ((int64_t)l * rows + t) * pr + k;
                y += ((uint64_t)(int64_t)hi[at] << (8 * l + 6)) + ((uint64_t)(int64_t)lo[at] << (8 * l));
            }
            const int64_t last = ((int64_t)(LIMBS - 1) * rows + t) * pr + k;
            y += ((((uint64_t)(int64_t)hi[last] << 6) + (uint64_t)(int64_t)lo[last]) & 0xFF) << 32;
            l0[k] = (uint8_t)y; l0[k + lp] = (uint8_t)(y >> 8); l0[k + 2 * lp] = (uint8_t)(y >> 16);
            l0[k + 3 * lp] = (uint8_t)(y >> 24); l0[k + 4 * lp] = (uint8_t)(y >> 32);
        }
    }
}

/* ---- Python entry points: addresses and sizes as integers ---------------------------------------------- */
#define PTR(T, v) ((T)(uintptr_t)(v))

static PyObject *run_job(Job *job, RowFn fn, int64_t rows, int threads) {
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = run_rows(job, fn, rows, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(bad);
}

/* mask(x, r64, r8, r_plane, limbs, limb_plane, quantized, scale, c_lo, c_hi, side, prime, rows, width,
 *      threads) -> 1 if a row is not finite */
static PyObject *py_mask(PyObject *self, PyObject *args) {
    unsigned long long x, r64, r8, limbs, quantized, scale, c_lo, c_hi, side;
    long long r_plane, limb_plane, prime, rows, width;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLKLKKKKKLLLi", &x, &r64, &r8, &r_plane, &limbs, &limb_plane, &quantized,
                          &scale, &c_lo, &c_hi, &side, &prime, &rows, &width, &threads))
        return NULL;
    Job job = {0};
    job.x = PTR(const float *, x); job.r64 = PTR(const int64_t *, r64); job.r8 = PTR(const uint8_t *, r8);
    job.r_plane = r_plane; job.limbs = PTR(uint8_t *, limbs); job.limb_plane = limb_plane;
    job.quantized = PTR(float *, quantized); job.scale = PTR(float *, scale);
    job.c_lo = PTR(const int32_t *, c_lo); job.c_hi = PTR(const int32_t *, c_hi);
    job.side = PTR(int64_t *, side); job.prime = prime; job.width = width;
    return run_job(&job, mask_rows, rows, threads);
}

/* finish(z, u64, u8, u_plane, sx, sw, y, kept, offsets, c_lo, c_hi, side, prime, constant, rows, width,
 *        threads) -> 1 if a value of z lies outside [0, 2^40) */
static PyObject *py_finish(PyObject *self, PyObject *args) {
    unsigned long long z, u64, u8, sx, sw, y, offsets, c_lo, c_hi, side;
    long long u_plane, kept, prime, constant, rows, width;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLKKKLKKKKLLLLi", &z, &u64, &u8, &u_plane, &sx, &sw, &y, &kept, &offsets,
                          &c_lo, &c_hi, &side, &prime, &constant, &rows, &width, &threads))
        return NULL;
    Job job = {0};
    job.z = PTR(const int64_t *, z); job.u64 = PTR(const int64_t *, u64); job.u8 = PTR(const uint8_t *, u8);
    job.u_plane = u_plane; job.sx = PTR(const float *, sx); job.sw = PTR(const float *, sw);
    job.y = PTR(float *, y); job.kept = kept; job.offsets = PTR(int64_t *, offsets);
    job.c_lo = PTR(const int32_t *, c_lo); job.c_hi = PTR(const int32_t *, c_hi);
    job.side = PTR(int64_t *, side); job.prime = prime; job.constant = constant; job.width = width;
    return run_job(&job, finish_rows, rows, threads);
}

/* input_side(quantized, c_lo, c_hi, side, prime, rows, width, threads); output_side(offsets, c_lo, c_hi,
 * side, prime, constant, rows, width, threads) */
static PyObject *py_input_side(PyObject *self, PyObject *args) {
    unsigned long long x, c_lo, c_hi, side;
    long long prime, rows, width;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLi", &x, &c_lo, &c_hi, &side, &prime, &rows, &width, &threads))
        return NULL;
    Job job = {0};
    job.x = PTR(const float *, x); job.c_lo = PTR(const int32_t *, c_lo); job.c_hi = PTR(const int32_t *, c_hi);
    job.side = PTR(int64_t *, side); job.prime = prime; job.width = width;
    return run_job(&job, input_side_rows, rows, threads);
}

static PyObject *py_output_side(PyObject *self, PyObject *args) {
    unsigned long long offsets, c_lo, c_hi, side;
    long long prime, constant, rows, width;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLLi", &offsets, &c_lo, &c_hi, &side, &prime, &constant, &rows, &width,
                          &threads))
        return NULL;
    Job job = {0};
    job.offsets = PTR(int64_t *, offsets); job.c_lo = PTR(const int32_t *, c_lo);
    job.c_hi = PTR(const int32_t *, c_hi); job.side = PTR(int64_t *, side); job.prime = prime;
    job.constant = constant; job.width = width;
    return run_job(&job, output_side_rows, rows, threads);
}

/* combine(hi, lo, p_row, offset, limbs, limb_plane, limb_row, rows, out, threads): hi and lo [5, rows, p_row]
 * int32 (columns [0, out) used), offset [out], limbs [5, rows, out] at limb_row bytes a row */
static PyObject *py_combine(PyObject *self, PyObject *args) {
    unsigned long long hi, lo, offset, limbs;
    long long p_row, limb_plane, limb_row, rows, out;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLKKLLLLi", &hi, &lo, &p_row, &offset, &limbs, &limb_plane, &limb_row, &rows, &out,
                          &threads))
        return NULL;
    Job job = {0};
    job.p_hi = PTR(const int32_t *, hi); job.p_lo = PTR(const int32_t *, lo); job.p_row = p_row;
    job.z = PTR(const int64_t *, offset); job.limbs = PTR(uint8_t *, limbs);
    job.limb_plane = limb_plane; job.limb_row = limb_row; job.kept = rows; job.width = out;
    return run_job(&job, combine_rows, rows, threads);
}

/* ---- one row straight from a pool's block (a decode step's request) ------------------------------------ */
/* A decode step makes 65 one-row calls a token at Llama-3.2-1B's shapes; around each, the per-call tensors
 * (scales, check sides, sliced pads) and the argument tuple cost more than the row's arithmetic. These take
 * the block's planes' address and the row's index, return the scale and the check's side as Python numbers,
 * and run mask_one / finish_one on the calling thread (GIL released). Arguments are integers, in order;
 * METH_FASTCALL reads them without a tuple. */
static int read_ints(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, long long *out) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd integer arguments, got %zd", want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* mask_row(x, r8, r_plane, r_row, limbs, quantized, c_lo, c_hi, prime, width) -> (scale, side) or None when
 * the row is not finite; side is -1 without a check (c_lo 0). x float32 [width], R's planes uint8
 * [5, rows, width] at r8 (row r_row, planes r_plane elements apart), limbs uint8 [5, 1, width] contiguous. */
static PyObject *py_mask_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[10];
    if (read_ints(args, nargs, 10, v)) return NULL;
    const int64_t width = v[9];
    float scale = 0.0f;
    int64_t side = -1;
    Job job = {0};
    job.x = PTR(const float *, v[0]); job.r8 = PTR(const uint8_t *, v[1]) + v[3] * width; job.r_plane = v[2];
    job.limbs = PTR(uint8_t *, v[4]); job.limb_plane = width; job.quantized = PTR(float *, v[5]);
    job.scale = &scale; job.c_lo = PTR(const int32_t *, v[6]); job.c_hi = PTR(const int32_t *, v[7]);
    job.side = &side; job.prime = v[8]; job.width = width;
    Py_BEGIN_ALLOW_THREADS
    mask_one(&job, 0);
    Py_END_ALLOW_THREADS
    if (job.bad) Py_RETURN_NONE;
    return Py_BuildValue("(dL)", (double)scale, (long long)side);
}

/* finish_row(z, u8, u_plane, u_row, sx, sw, y, offsets, c_lo, c_hi, prime, constant, width) -> side (-1
 * without a check) or None when a value of z lies outside [0, 2^40). z int64 [width], U's planes as R's
 * above, sx the row's scale (a float32 value, as mask_row gave it), y float32 [width] (0: not kept). */
static PyObject *py_finish_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[13];
    if (nargs != 13 || !PyFloat_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "finish_row takes 13 arguments, the fifth (the scale) a float");
        return NULL;
    }
    const float sx = (float)PyFloat_AS_DOUBLE(args[4]);
    PyObject *ints[13];
    memcpy(ints, args, sizeof ints);
    ints[4] = ints[3];                                  /* read as an integer, then unused */
    if (read_ints(ints, 13, 13, v)) return NULL;
    const int64_t width = v[12];
    int64_t side = -1;
    Job job = {0};
    job.z = PTR(const int64_t *, v[0]); job.u8 = PTR(const uint8_t *, v[1]) + v[3] * width; job.u_plane = v[2];
    job.sx = &sx; job.sw = PTR(const float *, v[5]); job.y = PTR(float *, v[6]); job.kept = v[6] ? 1 : 0;
    job.offsets = PTR(int64_t *, v[7]); job.c_lo = PTR(const int32_t *, v[8]); job.c_hi = PTR(const int32_t *, v[9]);
    job.side = &side; job.prime = v[10]; job.constant = v[11]; job.width = width;
    Py_BEGIN_ALLOW_THREADS
    finish_one(&job, 0);
    Py_END_ALLOW_THREADS
    if (job.bad) Py_RETURN_NONE;
    return PyLong_FromLongLong(side);
}

static PyMethodDef methods[] = {
    {"mask", py_mask, METH_VARARGS, "quantize, pad and cut rows into limbs"},
    {"finish", py_finish, METH_VARARGS, "range-check, unmask, lift and dequantize rows"},
    {"input_side", py_input_side, METH_VARARGS, "X . ws mod p per row"},
    {"output_side", py_output_side, METH_VARARGS, "Y . s mod p per row, from Y + 2^39"},
    {"combine", py_combine, METH_VARARGS, "U's limbs from the limb GEMM's int32 products"},
    {"mask_row", (PyCFunction)(void (*)(void))py_mask_row, METH_FASTCALL, "mask one row of a pool's block"},
    {"finish_row", (PyCFunction)(void (*)(void))py_finish_row, METH_FASTCALL, "finish one row of a pool's block"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", "tsqp's compiled per-row passes", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }
