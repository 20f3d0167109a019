"""The `tsqp` command. Flags override the environment the team already uses (LLAMA_MODEL_PATH,
LLAMA_IPC_PATH, LLAMA_DTYPE, LLAMA_GPU_DEVICE); both are mapped onto settings here and nowhere else."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .commands import flags
from .config import DEFAULT_ENDPOINT, DEFAULT_MODEL, DTYPES, ENV, ConfigError, env_endpoint



def _pool_size(text: str):
    from .trusted.protect import poolsize
    try:
        return poolsize.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_device() -> str:
    import torch
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get(ENV["model"], DEFAULT_MODEL),
                   help="a Hugging Face model directory, a .gguf file or random:tiny|small|llama-3.2-1b[@seed] "
                        f"(env {ENV['model']}; default {DEFAULT_MODEL})")
    p.add_argument("--device", default=os.environ.get(ENV["device"]),
                   help=f"cuda:N or cpu (env {ENV['device']}; default cuda:0 when CUDA is present)")
    p.add_argument("--dtype", default=os.environ.get(ENV["dtype"], "float32"), choices=DTYPES,
                   help=f"weights and wire dtype (env {ENV['dtype']}; default float32)")


def add_client_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--endpoint", default=None, action="append" if several else "store",
                   help=f"server endpoint (env {ENV['endpoint']}; default {DEFAULT_ENDPOINT})"
                        + ("; repeat it for several compute servers, one engine each" if several else ""))
    p.add_argument("--transport", choices=("shm", "frames"), default=None,
                   help="tensors through shared memory or as ZeroMQ frames (default: shm for ipc://, frames for tcp://)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any reply (default 60)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for the server's hello (default 5)")
    p.add_argument("--arena-mb", type=int, default=None, help="shared-memory arena size (default: from the model)")
    p.add_argument("--max-arena-mb", type=int, default=4096,
                   help="the most this runner allocates for its arena or KV cache, or accepts in one reply frame, "
                        "whatever the server's model says (default 4096)")
    p.add_argument("--control", choices=("pipes", "socket"), default="pipes",
                   help="with shm, where the calls' headers go: two pipes beside the arena (each message wakes the "
                        "other side directly) or the ZeroMQ socket (default pipes)")
    p.add_argument("--spin-us", type=float, default=0.0,
                   help="with --control pipes: poll for a reply this long before sleeping (saves the wake-up; costs "
                        "a core while waiting; for hosts with cores to spare) (default 0)")


def add_security_args(p: argparse.ArgumentParser, server: bool) -> None:
    """CurveZMQ for tcp:// (`tsqp keys` writes the files); ipc:// is guarded by the socket file's mode."""
    p.add_argument("--keys", default=None, help="keys directory written by `tsqp keys` (env TSQP_KEYS_DIR; "
                                                "default ~/.config/tsqp/keys)")
    p.add_argument("--server-key", default=None,
                   help="the server's key file (serve: its .key_secret; run: its public .key); default from --keys")
    if server:
        p.add_argument("--allow", default=None, help="allowed client public keys: a .key file or a directory "
                                                     "of them (default KEYS/allowed)")
        p.add_argument("--public", action="store_true", help="allow a wildcard tcp bind (all interfaces)")
    else:
        p.add_argument("--client-key", default=None, help="this runner's .key_secret (default KEYS/client.key_secret)")
    p.add_argument("--insecure", action="store_true", help="plain tcp without CurveZMQ: no authentication, "
                                                           "no encryption (says what it exposes)")


def add_runner_args(p: argparse.ArgumentParser, several_endpoints: bool = False) -> None:
    """What every trusted runner takes (`run`, `api`): the model, the server, the split and its protection."""
    add_model_args(p)
    add_client_args(p, several_endpoints)
    add_security_args(p, server=False)
    p.add_argument("--local", action="store_true", help="compute in-process, no transport (the baseline)")
    p.add_argument("--policy", choices=("linear", "seed", "flash"), default="linear",
                   help="linear: attention on the trusted side; seed: the prototype's split (QK^T, PV offloaded); "
                        "flash: RoPE here, fused attention + O on the server")
    p.add_argument("--protect", choices=("otp",), default=None,
                   help="otp: every offloaded x @ W gets a fresh one-time pad over exact integers (12-bit weights, "
                        "16-bit activations); embedding and logits stay here; needs --model (the runner's own "
                        "copy of the checkpoint), --policy linear and a `tsqp serve --protect otp`")
    p.add_argument("--verify", action="store_true",
                   help="with --protect: check every result with Freivalds' test before use (false accept <= 2^-40)")
    p.add_argument("--deferred-checks", action="store_true",
                   help="with --verify: a decode step's results are used at once and checked while the runner waits "
                        "for the server's next reply; the logits wait for every check (hides the checks behind the "
                        "server's round trip)")
    p.add_argument("--length-bucket", type=int, default=1, metavar="N",
                   help="with --protect: pad each prefill request with zero rows to a multiple of N, so the server "
                        "learns the prompt's length only to within N tokens (costs up to N-1 rows of work; default "
                        "1: off)")
    p.add_argument("--pad-pool", type=_pool_size, default="64",
                   help="with --protect: pads precomputed per op, filled in the background: tokens (64, the "
                        "default) or memory (256MB, 1GiB; a token of Llama-3.2-1B pads is 3.7 MB)")
    p.add_argument("--compile", action="store_true",
                   help="fuse the trusted elementwise steps with torch.compile (needs a C++ compiler; compiles "
                        "once per prompt length)")
    p.add_argument("--attn-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype of the trusted side's attention math and KV cache (auto: bfloat16 when the wire "
                        "is bfloat16 and the CPU has AMX, else float32)")
    p.add_argument("--chunks", type=int, default=1, help="split the prefill into interleaved chunks (overlap)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads on the trusted side")
    p.add_argument("--attest", choices=("auto", "tdx", "sev-snp", "sgx", "simulated", "off"), default="auto",
                   help="hardware evidence of this runner (its code, model and settings) for clients to verify: "
                        "tdx/sev-snp through configfs-tsm, sgx through Gramine, simulated (no TEE, proves nothing: "
                        "for development); auto (default) takes what the machine offers and is off where it offers "
                        "none; with attestation on, tsqp api serves HTTPS with an attested in-memory key")


def add_tokenizer_arg(p) -> None:
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json or a model directory holding one "
                                                     "(default: --model when it is a directory or a .gguf file)")


def add_serve_parser(sub) -> None:
    """`tsqp serve`: the compute server (untrusted side)."""
    s = sub.add_parser("serve", help="run the compute server (untrusted side)")
    add_model_args(s)
    s.add_argument("--endpoint", default=None, help=f"bind here (env {ENV['endpoint']}; default {DEFAULT_ENDPOINT})")
    s.add_argument("--max-sessions", type=int, default=8, help="runners served at once (default 8)")
    s.add_argument("--max-sessions-per-user", type=int, default=None,
                   help="sessions one user may hold (ipc: a uid; tcp: a CurveZMQ key, or an address with "
                        "--insecure) (default: --max-sessions)")
    s.add_argument("--idle-timeout", type=float, default=600.0,
                   help="drop a tcp session unheard for this many seconds (0: never; a session ends anyway when "
                        "its connection closes) (default 600)")
    s.add_argument("--max-request-mb", type=float, default=1024.0,
                   help="refuse a call whose output and temporaries would need more (default 1024)")
    s.add_argument("--max-message-mb", type=float, default=None,
                   help="drop larger messages (ZMQ_MAXMSGSIZE) (default: --max-request-mb + 1)")
    s.add_argument("--max-queued-mb", type=float, default=1024.0,
                   help="drop a session whose replies, sent and still unread, exceed this (default 1024)")
    s.add_argument("--max-arena-mb", type=float, default=16384.0,
                   help="refuse to map (and, on CUDA, pin) a larger shared-memory arena (default 16384)")
    add_security_args(s, server=True)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--record", default=None, metavar="DIR",
                   help="write everything this server receives and returns, per session, to DIR (owner-only; for "
                        "`tsqp audit`); off by default")
    s.add_argument("--protect", choices=("otp",), default=None,
                   help="otp: serve masked x @ W only (12-bit weights, one-time-padded inputs over Z_2^40); for "
                        "runners with --protect otp")
    s.add_argument("--inject-faults", choices=("flip", "replay", "swap", "zero"), default=None,
                   help="TESTING ONLY, with --protect: alter results on purpose so that --verify's detection can "
                        "be measured")
    s.add_argument("--spin-us", type=float, default=0.0,
                   help="after a call that came through the pipes, poll for the next one this long before "
                        "sleeping (default 0)")


def add_run_parser(sub) -> None:
    """`tsqp run`: the trusted runner, one prefill or a generation, with statistics."""
    r = sub.add_parser("run", help="run the trusted runner: one prefill, or generation with --max-new-tokens "
                                   "or --prompt; with statistics")
    add_runner_args(r)
    r.add_argument("--tokens", type=int, default=128, help="a fixed prompt of N token ids (default 128)")
    r.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --tokens")
    g = r.add_argument_group("generation (with --max-new-tokens or --prompt; otherwise one prefill)")
    g.add_argument("--prompt", default=None, help="text to continue; needs a tokenizer (--tokenizer or --model DIR)")
    g.add_argument("--chat", default=None, help="a user message, sent through the model's chat template (from "
                                                "--tokenizer or --model: tokenizer_config.json, chat_template.jinja "
                                                "or the GGUF's metadata); stops at the template's end of turn")
    g.add_argument("--system", default=None, help="with --chat: a system message first")
    add_tokenizer_arg(g)
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="generate up to N tokens after the prompt (default with --prompt: 128)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (the default); > 0: sample (1 when only --top-k/--top-p are given)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding mass p")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one, reported in the JSON)")
    g.add_argument("--ignore-eos", action="store_true", help="run to --max-new-tokens (benchmarks)")
    r.add_argument("--json", default=None, help="write settings and statistics here")
    r.add_argument("--dump-logits", default=None, help="write the last position's logits (float32 .npy)")
    r.add_argument("--no-warmup", action="store_true", help="time the first prefill")


def add_api_parser(sub) -> None:
    """`tsqp api`: the OpenAI-compatible HTTP API in the trusted runner."""
    a = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                                   "/v1/chat/completions) from the trusted runner")
    add_runner_args(a, several_endpoints=True)
    add_tokenizer_arg(a)
    h = a.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="listen here (default 127.0.0.1: this host only)")
    h.add_argument("--port", type=int, default=8000, help="listen on this port (default 8000; 0: any free one, printed)")
    h.add_argument("--model-name", default=None,
                   help="the model id clients name (default: --model's file name without .gguf, or its directory name)")
    h.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM), ending TLS in the "
                                                   "runner's process; with --tls-key")
    h.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    h.add_argument("--unix", default=None, metavar="PATH",
                   help="listen on this unix socket (mode 0600 in a 0700 directory: this user only) instead of tcp")
    h.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY'; on the command line every local user reads it in "
                        "/proc/PID/cmdline: prefer --api-key-file or the env TSQP_API_KEY (default: no key)")
    h.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the key from this file, which only its owner may read (mode 0600)")
    e = a.add_argument_group("engine (continuous batching, one per compute server)")
    e.add_argument("--max-batch", "--workers", dest="max_batch", type=int, default=16,
                   help="requests generated at once per compute server, every step one batched forward "
                        "(--workers: the old name) (default 16)")
    e.add_argument("--max-step-tokens", type=int, default=64,
                   help="rows one step carries: a decode row per running request, the rest prefill chunks; a "
                        "long prompt delays running streams by at most one such step (default 64)")
    e.add_argument("--kv-budget-mb", type=float, default=1024.0,
                   help="KV cache memory per compute server; a request reserves its prompt + max_tokens at "
                        "admission and waits while the budget is full (default 1024)")
    e.add_argument("--queue", type=int, default=16,
                   help="requests that may wait beyond every engine's --max-batch; beyond that a request gets "
                        "429 (default 16)")
    e.add_argument("--reconnect-after-verification-failure", action="store_true",
                   help="with --verify: after a server is caught altering a result, open a fresh session to it for "
                        "the next requests (default: every later request on it gets 502 until tsqp api restarts)")
    h.add_argument("--max-tokens", type=int, default=512,
                   help="max_tokens for a request that names none, capped by the context (default 512)")
    h.add_argument("--max-connections", type=int, default=512,
                   help="connections open at once; one more is answered 503 and closed (default 512)")
    h.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers, then it is closed (default 10)")
    h.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's body, then it gets 408 (default 30)")
    h.add_argument("--session-idle", type=float, default=300.0,
                   help="close an engine's session unused this many seconds, freeing the server's slot; the next "
                        "request opens a fresh one (default 300)")


def add_diagnose_parser(sub) -> None:
    """`tsqp diagnose`: the transports' round trips and the environment."""
    d = sub.add_parser("diagnose", help="measure ipc/tcp/shm round trips against its own echo servers; "
                                        "report the environment")
    d.add_argument("--endpoint", default=None, help=f"the endpoint to inspect (env {ENV['endpoint']}; "
                                                    f"default {DEFAULT_ENDPOINT})")
    d.add_argument("--json", default=None, help="write rows, verdicts and the environment here")
    d.add_argument("--sizes", nargs="+", default=None, help="payload sizes, e.g. 4K 1M 16M (default 4K..64M)")
    d.add_argument("--repeat", type=int, default=None, help="round trips per size, at most (default 30)")
    d.add_argument("--quick", action="store_true", help="a few sizes, few repeats (seconds)")


def add_bench_parser(sub) -> None:
    """`tsqp bench`: prefills (and decodes) over a matrix of configurations."""
    b = sub.add_parser("bench", help="time prefills over a matrix of transports, dtypes and policies, "
                                     "with the no-split references")
    b.add_argument("--model", default=None, help="default: random:llama-3.2-1b with CUDA, random:small without")
    b.add_argument("--device", default=os.environ.get(ENV["device"]), help="the server's device (default cuda:0 "
                                                                          "when CUDA is present, else cpu)")
    b.add_argument("--tokens", type=int, default=None, help="prompt length (default 1024 with CUDA, 256 without)")
    b.add_argument("--transport", default="local,shm,ipc,tcp",
                   help="comma list of local, shm, shm-socket (shm with --control socket), ipc, tcp, shm-otp, "
                        "shm-otp-verify, shm-otp-verify-deferred (--protect otp [--verify [--deferred-checks]])")
    b.add_argument("--dtype", default=None, help="comma list (default bfloat16 with CUDA, float32 without)")
    b.add_argument("--policy", default="linear", help="comma list of linear, seed, flash")
    b.add_argument("--chunks", default="1", help="comma list of chunk counts for the interleaved prefill")
    b.add_argument("--attn-dtype", default="auto", help="comma list of auto, float32, bfloat16 (trusted attention)")
    b.add_argument("--repeat", type=int, default=9, help="timed prefills per configuration (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed prefills first")
    b.add_argument("--decode", type=int, default=0, metavar="N",
                   help="after each timed prefill, time N greedy decode steps (median ms per token per row, and "
                        "its ratio to the shm row; default 0: prefill only)")
    b.add_argument("--endpoint", default=None, help="use this running server instead of starting our own")
    b.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for any reply")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads in the runner")
    b.add_argument("--compile", action="store_true",
                   help="fuse the trusted elementwise steps with torch.compile (compiled during the warm-up)")
    b.add_argument("--spin-us", type=float, default=0.0,
                   help="shm rows: runner and server poll this long before sleeping (default 0)")
    b.add_argument("--no-references", action="store_true", help="skip the device-only and CPU-only references")
    b.add_argument("--pad-rate", type=int, default=0, metavar="TOKENS",
                   help="with a shm-otp* row: measure the int8 GEMM peak, the ideal pad rate it allows and the "
                        "rate a fresh pool fills TOKENS tokens of pads at (default 0: off)")
    b.add_argument("--sustained", type=int, default=0, metavar="N",
                   help="with a shm-otp* row: add the sustained rows (the pool cold, N prefills back to back, "
                        "the whole model on the runner's CPU; default 0: off)")
    b.add_argument("--json", default=None, help="write settings, references and rows here")
    b.add_argument("--plot", default=None, help="write a stacked bar chart (PNG) here")


def add_keys_parser(sub) -> None:
    """`tsqp keys`: CurveZMQ key pairs."""
    k = sub.add_parser("keys", help="generate CurveZMQ key pairs for tcp:// (owner-only files)")
    k.add_argument("--dir", default=None, help="where (env TSQP_KEYS_DIR; default ~/.config/tsqp/keys)")
    k.add_argument("--name", default=None, help="one pair NAME (a client's is allow-listed); default: server and client")
    k.add_argument("--force", action="store_true", help="replace existing key files")


def add_attest_parser(sub) -> None:
    """`tsqp attest`: verify a runner's attestation; its verbs are built in commands/attest.py."""
    from .commands import attest, attest_client
    verbs = attest.add_parser(sub)
    attest_client.add_proxy_parser(verbs)
    attest_client.add_check_answer_parser(verbs)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tsqp", description="LLM inference split between a trusted CPU "
                                 "runner and an untrusted GPU compute server.")
    sub = ap.add_subparsers(dest="command", required=True)
    from .commands import audit as audit_command
    for add in (add_serve_parser, add_run_parser, add_api_parser, add_diagnose_parser, add_bench_parser,
                add_attest_parser):
        add(sub)
    audit_command.add_parser(sub)
    add_keys_parser(sub)
    return ap


def resolve(args) -> None:
    """Fill what flags left open from the environment and the defaults."""
    if args.command == "api":               # one or several --endpoint: one engine each
        args.endpoints, args.transport_asked = args.endpoint or [env_endpoint()[0]], args.transport
        args.endpoint = args.endpoints[0]
    if getattr(args, "endpoint", "unset") is None and args.command != "bench":   # bench starts its own
        args.endpoint, args.endpoint_why = env_endpoint()
    if getattr(args, "transport", "unset") is None:
        args.transport = "shm" if args.endpoint.startswith("ipc://") else "frames"
    if getattr(args, "device", "unset") is None:
        args.device = default_device()
    if args.command == "bench":
        cuda = args.device.startswith("cuda")
        args.model = args.model or ("random:llama-3.2-1b" if cuda else "random:small")
        args.tokens = args.tokens or (1024 if cuda else 256)
        args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    if args.command in ("run", "api") and not args.local:
        from .wire.keys import client_curve
        args.curve = client_curve(args.endpoint, args.keys, args.server_key, args.client_key, args.insecure)


def check_device(args) -> None:
    """A CUDA device asked for where there is none: say so, instead of torch's long message."""
    uses_device = args.command in ("serve", "bench") or getattr(args, "local", False)
    if uses_device and args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__}); "
                             f"use --device cpu")


def interrupt(signum, frame):
    raise KeyboardInterrupt      # SIGTERM unwinds like Ctrl-C: finally blocks close the session and arena


COMMANDS = {   # command -> (module, function), imported only when run: `tsqp keys` needs no torch
    "serve": ("commands.serve", "serve"),
    "run": ("commands.run", "run"),
    "api": ("commands.api.command", "serve_api"),
    "bench": ("commands.bench", "run_bench"),
    "diagnose": ("commands.diagnose", "diagnose"),
    "audit": ("commands.audit", "main"),
    "keys": ("commands.keys", "keys_command"),
    "attest": ("commands.attest", "main"),
}


def run_command(args) -> None:
    import importlib
    module, function = COMMANDS[args.command]
    getattr(importlib.import_module(f".{module}", __package__), function)(args)


def main(argv: list[str] | None = None) -> int:
    # Runner and server take turns on the same cores; spinning OpenMP workers of the waiting side would steal
    # them from the working side (measured: 12x slower prefills on a busy 2-core machine). Must precede torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    if args.command in ("run", "api"):
        signal.signal(signal.SIGTERM, interrupt)
    try:
        resolve(args)
        flags.refuse_inapplicable(args, flags.given(parser(), argv))
        check_device(args)
        run_command(args)
        return 0
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        print(f"tsqp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tsqp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
