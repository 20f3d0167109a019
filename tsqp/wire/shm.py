"""A session's shared-memory arena: a sealed memfd that the runner creates and the server maps. Tensors are
views of it; control messages carry offsets.

    runner                                            server
    memfd_create("tsqp-<pid>-<hex>"), ftruncate,
    fallocate, F_ADD_SEALS SHRINK|GROW|SEAL:
    no one, its creator included, can change
    its size again, so no mapping of it can
    ever fault past its end (SIGBUS)
    attach {name, size} ──────────────────────────>  the runner's pid from SO_PEERCRED (the kernel's, not
                                                      the runner's word); opens /proc/<pid>/fd/<n> whose
                                                      link is /memfd:tsqp-<name>; checks it is that memfd,
                                                      sealed SHRINK and GROW, of its own uid and of `size`
                                                      bytes; maps it and closes the fd

Nothing lives in /dev/shm: the memory goes with the last mapping, whatever dies. /dev/shm/tsqp-<uid>/ (0700)
holds only a session's control pipes until the server opens them (pipes.py); a runner killed before that
leaves them, named after its pid, and `remove_stale()` clears them.
"""
from __future__ import annotations

import fcntl
import math
import mmap
import os
import re
import secrets
import stat
from pathlib import Path

import torch

from .. import files
from ..config import runtime_dir
from .protocol import DTYPE_NAME, WIRE_DTYPES, ProtocolError, TensorMeta

SHM_ROOT = Path(os.environ.get("TSQP_SHM_ROOT", "/dev/shm"))
NAME = re.compile(r"^(\d+)-[0-9a-f]{16}$")
LEFTOVER = re.compile(r"^(\d+)-[0-9a-f]{16}(\.req|\.rep)?$")     # an arena's control pipes (or an old arena)
ALIGN = 256
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW        # what the server requires: the size cannot change
MEMFD_PREFIX = "tsqp-"


class ArenaError(RuntimeError):
    """The arena cannot be created, attached, or cannot hold a request."""


SHM_REMEDY = "set XDG_RUNTIME_DIR to a directory of yours with mode 0700 (the control pipes then go there)"


def arena_dir() -> Path:
    """Where the runner's control pipes go, this user's alone (made under umask 077; a loose mode is fixed
    through an fd): <XDG_RUNTIME_DIR>/tsqp where the system gives this user a runtime directory (no one else
    can create anything there), else /dev/shm/tsqp-<uid> (which another user may have created first: refused,
    saying whose it is)."""
    runtime = runtime_dir()
    if runtime is not None:
        return files.private_dir(runtime / "tsqp", ArenaError, repair=True, parents=False)
    return files.private_dir(SHM_ROOT / f"tsqp-{os.getuid()}", ArenaError, repair=True, parents=False,
                             remedy=SHM_REMEDY)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Unlink control pipes (and old-style arena files) whose creating process is gone."""
    removed = []
    for f in arena_dir().iterdir():
        m = LEFTOVER.match(f.name)
        if m and not pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f.name)
    return removed


def find_memfd(pid: int, name: str) -> int:
    """Open the memfd called MEMFD_PREFIX + name among process `pid`'s descriptors; returns our own fd."""
    want = f"/memfd:{MEMFD_PREFIX}{name} (deleted)"
    where = Path(f"/proc/{pid}/fd")
    try:
        entries = os.listdir(where)
    except OSError as e:
        raise ArenaError(f"cannot look for the arena among the runner's descriptors ({where}: {e.strerror}); "
                         f"a runner on this host in this pid namespace can use shm, others --transport frames") \
            from None
    for entry in entries:
        try:
            if os.readlink(where / entry) != want:
                continue
            fd = os.open(where / entry, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue                  # closed or swapped meanwhile: the check below is what counts
        if os.readlink(f"/proc/self/fd/{fd}") == want:     # what we opened, not what the link said before
            return fd
        os.close(fd)
    raise ArenaError(f"the runner (pid {pid}) holds no memfd named {MEMFD_PREFIX}{name}")


class Arena:
    def __init__(self, mm: mmap.mmap, name: str, size: int, path: Path | None, fd: int | None = None):
        """path: the runner's session name in arena_dir(); its control pipes go beside it (pipes.make_pipes).
        fd: the runner's memfd, kept open so that the server can find it at attach."""
        self.mm, self.name, self.size, self.path, self.fd = mm, name, size, path, fd
        self.base = torch.frombuffer(mm, dtype=torch.uint8)        # [size] bytes
        self.ptr = self.base.data_ptr()
        self.cuda_registered = False
        self.live: dict[int, int] = {}     # allocator (runner side): live regions, start -> end
        self.views: dict[tuple, torch.Tensor] = {}     # (offset, shape, dtype) -> view, for empty()
        self.made: dict[int, tuple[torch.Tensor, TensorMeta]] = {}   # id(view) -> (view, its record), meta_of()

    @classmethod
    def create(cls, size: int) -> "Arena":
        """The runner's arena: a memfd of `size` bytes (rounded up to pages), allocated now and sealed."""
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        d = arena_dir()
        remove_stale()
        name = f"{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.memfd_create(MEMFD_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)   # fail now, not with SIGBUS at first touch, if memory runs out
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            raise ArenaError(f"cannot create a {size / 2**20:.0f} MiB arena (memfd): {e}; lower --arena-mb or use "
                             f"--transport frames") from None
        return cls(mm, name, size, d / name, fd)

    @classmethod
    def anonymous(cls, size: int) -> "Arena":
        """Process-private staging memory with the same allocator (in-process offload to a GPU)."""
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        return cls(mmap.mmap(-1, size), "anonymous", size, None)

    @classmethod
    def attach(cls, name: str, size: int, pid: int | None, max_size: int | None = None) -> "Arena":
        """Map a runner's sealed memfd (server side). pid: the runner's process as the kernel names it
        (SO_PEERCRED); max_size: the largest arena this server maps."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ProtocolError(f"bad arena name {name!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ProtocolError(f"bad arena size {size!r}")
        if max_size is not None and size > max_size:
            raise ArenaError(f"an arena of {size / 2**20:.0f} MiB is larger than this server maps "
                             f"({max_size / 2**20:.0f} MiB, --max-arena-mb)")
        if not pid:
            raise ArenaError("shared memory needs a runner on this host (ipc://) whose process the server can see; "
                             "use --transport frames")
        fd = find_memfd(pid, name)
        try:
            st = os.fstat(fd)
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise ArenaError(f"arena {name} is not a memfd of uid {os.getuid()} (uid {st.st_uid})")
            if seals & SEALS != SEALS:
                raise ArenaError(f"arena {name} is not sealed against shrinking and growing (seals {seals:#x}): "
                                 f"its runner could truncate it under the server")
            if st.st_size != size:
                raise ArenaError(f"arena {name} has {st.st_size} bytes, the attach said {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(mm, name, size, None)

    # ---- views -------------------------------------------------------------------------------------
    def view(self, meta: TensorMeta) -> torch.Tensor:
        """The tensor at meta.offset; the region is checked against the arena's bounds."""
        off, n = meta.offset, meta.nbytes
        if off is None or off % 8 or off < 0 or off + n > self.size:
            raise ProtocolError(f"region offset={off} nbytes={n} lies outside the {self.size}-byte arena "
                                f"or is misaligned")
        return self.base[off:off + n].view(WIRE_DTYPES[meta.dtype]).view(meta.shape)

    def meta_of(self, t: torch.Tensor) -> TensorMeta | None:
        """A tensor's record in a call header (dtype, shape, offset) when it lies whole in this arena, else None."""
        made = self.made.get(id(t))
        if made is not None and made[0] is t:      # one of region()'s views: known without asking torch
            return made[1]
        off = self.offset_of(t)
        return None if off is None else TensorMeta.of(t, off)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """The offset of a contiguous tensor that lives inside this arena (of any dtype), else None."""
        made = self.made.get(id(t))
        if made is not None and made[0] is t:
            return made[1].offset
        p = t.data_ptr()
        if t.is_contiguous() and self.ptr <= p and p + t.numel() * t.element_size() <= self.ptr + self.size:
            return p - self.ptr
        return None

    # ---- allocation (runner side) ---------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        """First fit from the start, skipping regions still live (inputs of requests in flight, results not yet
        consumed). Each step of a prefill or decode thus gets the same offsets every time, which lets both
        sides reuse what they checked and built for a region layout. Fails clearly when nothing fits."""
        n = (max(nbytes, 1) + ALIGN - 1) // ALIGN * ALIGN
        if n > self.size:
            raise ArenaError(f"a {nbytes / 2**20:.1f} MiB tensor does not fit the {self.size / 2**20:.0f} MiB "
                             f"arena; raise --arena-mb")
        start = 0
        for s, e in sorted(self.live.items()):
            if start + n <= s:
                break
            start = max(start, e)
        if start + n > self.size:
            live = sum(e - s for s, e in self.live.items())
            raise ArenaError(f"the {self.size / 2**20:.0f} MiB arena cannot hold another {nbytes / 2**20:.1f} MiB "
                             f"({live / 2**20:.1f} MiB in flight); raise --arena-mb")
        self.live[start] = start + n
        return start

    def free(self, offset: int) -> None:
        self.live.pop(offset, None)

    def discard(self, t: torch.Tensor) -> None:
        """Free the region an empty() tensor holds, if it lies in this arena (it will feed no call)."""
        off = self.offset_of(t)
        if off is not None:
            self.free(off)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.region(self.alloc(math.prod(shape) * dtype.itemsize), tuple(shape), dtype)

    def region(self, off: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The view of the region at `off` (allocated by the caller). A prefill or decode step allocates the same
        regions each time: their views are made once, with their records for meta_of()."""
        key = (off, shape, dtype)
        view = self.views.get(key)
        if view is None:
            if dtype not in DTYPE_NAME:
                raise ArenaError(f"the arena holds only what crosses the wire ({', '.join(WIRE_DTYPES)}), not {dtype}")
            if len(self.views) >= 4096:
                self.views.clear()
                self.made.clear()
            n = math.prod(shape) * dtype.itemsize
            view = self.views[key] = self.base[off:off + n].view(dtype).view(shape)
            self.made[id(view)] = (view, TensorMeta(DTYPE_NAME[dtype], shape, off))
        return view

    # ---- pinned for DMA (server side, CUDA) ----------------------------------------------------------
    def register_cuda(self) -> None:
        rc = torch.cuda.cudart().cudaHostRegister(self.ptr, self.size, 0)
        if int(rc) != 0:
            raise ArenaError(f"cudaHostRegister of the {self.size}-byte arena failed with code {int(rc)}")
        self.cuda_registered = True

    def close(self) -> None:
        if self.cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.ptr)
            self.cuda_registered = False
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        # the mapping itself goes when the last tensor view of it is collected
        self.base, self.views, self.made = None, {}, {}
