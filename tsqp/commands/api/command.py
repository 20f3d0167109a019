"""`tsqp api --host H --port P [--endpoint E | --local] --model M ...`: set up as `tsqp run` does (engine.py),
check the first compute server once, start one engine per compute server (pool.py), then serve HTTP until
SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import ipaddress
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import uvicorn

from ... import weights as W
from ...trusted.chat import ChatTemplateError
from ..attested import attestor_for, describe, provider_of
from ..engine import Offloads, P_name, open_chat_template, open_tokenizer, where
from .access import api_key_of, bind_unix
from .app import Api, bind, model_id_of
from ...wire.keys import client_curve
from .attestation import check_attest_flags, off_warnings
from .limits import Limits, uvicorn_options
from .pool import Limits as EngineLimits
from .pool import Pool, Session, session_tokens

FILES_RESERVED = 64             # file descriptors kept for the model, sessions, pipes and logs beyond the connections
GRACEFUL_SHUTDOWN_S = 5         # on SIGTERM, responses still being written get this long before they are cut


class Server(uvicorn.Server):
    """uvicorn's server that tells the pool first on SIGINT/SIGTERM: running generations end at their next
    token, so open streams finish with an error event and [DONE] instead of being cancelled mid-way."""

    def __init__(self, config: uvicorn.Config, pool: Pool):
        super().__init__(config)
        self.pool = pool

    def handle_exit(self, sig, frame) -> None:
        self.pool.stop()
        super().handle_exit(sig, frame)


def check_flags(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--queue", args.queue, 0),
                             ("--max-tokens", args.max_tokens, 1), ("--max-step-tokens", args.max_step_tokens, 2)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("--session-idle", args.session_idle), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    files_open = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if not 1 <= args.max_connections <= files_open - FILES_RESERVED:
        raise ValueError(f"--max-connections must be in 1..{files_open - FILES_RESERVED} (ulimit -n is {files_open}, "
                         f"{FILES_RESERVED} kept for the process's own files), got {args.max_connections}")
    if args.unix and (args.host != "127.0.0.1" or args.port != 8000):
        raise ValueError("--unix listens on a unix socket only: drop --host and --port")
    if not args.kv_budget_mb > 0:
        raise ValueError(f"--kv-budget-mb must be > 0, got {args.kv_budget_mb}")
    if args.policy != "linear":
        raise ValueError(f"tsqp api batches requests with attention on the trusted side: --policy {args.policy} "
                         f"does not apply (use --policy linear)")
    if args.chunks != 1:
        raise ValueError("--chunks interleaves one prompt's prefill; tsqp api's engine cuts prompts into chunks of "
                         "--max-step-tokens itself: leave --chunks out")
    if args.reconnect_after_verification_failure and not args.verify:
        raise ValueError("--reconnect-after-verification-failure applies with --verify (--protect otp) only")
    if args.local and len(args.endpoints) > 1:
        raise ValueError("--local computes in-process: several --endpoint do not apply")
    if len(set(args.endpoints)) != len(args.endpoints):
        raise ValueError(f"an --endpoint is given twice: {args.endpoints}")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{path}: not found")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host) if ":" not in host else host).is_loopback
    except (OSError, ValueError) as e:      # an unknown name, or an IPv6 literal that is not one
        raise ValueError(f"--host {host!r}: not an address or a name this host resolves ({e})") from None


def exposure_warnings(args, api_key: str | None, attested: bool = False) -> list[str]:
    """What a bind beyond this host exposes: prompts and answers cross its network in the clear without TLS
    (and TLS ended outside the enclave would hand them to its host), and anyone can use it without a key."""
    if args.unix:
        return []
    if is_loopback(args.host):
        return [] if api_key else [f"note: without a key, every local user can use the API on {args.host} "
                                   f"(--api-key-file, or --unix PATH for this user only)"]
    warnings = off_warnings(args, loopback=False)
    if args.tls_cert is None and not attested:
        warnings.append(f"WARNING: --host {args.host} without --tls-cert: prompts and answers travel in the clear")
    if api_key is None:
        warnings.append(f"WARNING: --host {args.host} without --api-key: anyone who reaches it can use it")
    return warnings


def listening(sock: socket.socket, args, https: bool) -> str:
    scheme = "https" if https else "http"
    if sock.family == socket.AF_UNIX:
        return f"{scheme}+unix://{args.unix} (/v1; mode 0600: this user only)"
    host, port = sock.getsockname()[:2]
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/v1"


def per_endpoint(args) -> list[argparse.Namespace]:
    """The flags as each compute server's engine sees them: its endpoint, transport and keys."""
    if args.local:
        return [args]
    out = []
    for endpoint in args.endpoints:
        one = argparse.Namespace(**vars(args))
        one.endpoint = endpoint
        one.transport = args.transport_asked or ("shm" if endpoint.startswith("ipc://") else "frames")
        one.curve = client_curve(endpoint, args.keys, args.server_key, args.client_key, args.insecure)
        out.append(one)
    return out


def limits_of(args) -> EngineLimits:
    return EngineLimits(args.max_batch, args.max_step_tokens, int(args.kv_budget_mb * 2**20), args.queue,
                  args.session_idle, args.connect_timeout, args.reconnect_after_verification_failure)


def serve_api(args) -> None:
    t0 = time.perf_counter()
    check_flags(args)
    api_key, key_warnings = api_key_of(args)
    provider = provider_of(args)                # a TEE asked for but absent fails here, before any loading
    check_attest_flags(args, provider, args.unix is not None or is_loopback(args.host))
    tokenizer = open_tokenizer(args, required=True)
    try:
        template, template_error = open_chat_template(args, tokenizer), None
    except ChatTemplateError as e:          # completions still work; chat requests are told why not
        template, template_error = None, str(e)
    sock = bind_unix(args.unix) if args.unix else bind(args.host, args.port)
    each = per_endpoint(args)
    offloads = [Offloads(a) for a in each]
    first = pool = None
    try:
        # the start-up check: the first server answers; a session is sized from the engine's budget alone
        tokens = session_tokens(W.load_config(args.model), args.max_batch, args.max_step_tokens)
        first = Session(offloads[0], tokens, None)
        cfg, dtype, first_offload = first.cfg, first.offload.dtype, first.offload
        pool = Pool(offloads, [where(a) for a in each], tokenizer, cfg, limits_of(args), first)
        first = None                                            # the first engine holds it now
        model_id = args.model_name or model_id_of(args.model)
        attestor = attestor_for(args, provider, first_offload, model_id, certificate_hosts(args.host)) \
            if provider is not None else None
        limits = Limits(connections=args.max_connections, header_s=args.header_timeout, body_s=args.body_timeout)
        api = Api(model_id, cfg, tokenizer, template, template_error, pool, args.max_tokens, api_key,
                  limits=limits, attestor=attestor)
        print(f"Model: {model_id} ({cfg.num_layers} layers, context {cfg.max_position_embeddings} tokens, "
              f"chat template: {'yes' if template else 'none'})", flush=True)
        print(f"Compute: {where(args)}, dtype {P_name(dtype)}, policy {args.policy}"
              f"{', protect ' + args.protect if getattr(args, 'protect', None) else ''}"
              f"{' + verify' if args.verify else ''}{' (deferred checks)' if args.deferred_checks else ''}, "
              f"{torch.get_num_threads()} threads", flush=True)
        print(f"Engine: {len(each)} compute server(s), each up to {args.max_batch} requests per step of at most "
              f"{args.max_step_tokens} rows (prefill chunks of {pool.engine_chunk}), KV budget {args.kv_budget_mb:g} "
              f"MB each ({pool.kv_tokens} positions); up to {args.queue} more requests wait (then 429)", flush=True)
        print(describe(args.attest, provider), flush=True)
        longest = api.prompting.prompts.max_bytes or limits.max_body
        print(f"Limits: {limits.describe(longest)}", flush=True)
        for line in key_warnings + exposure_warnings(args, api_key, attested=attestor is not None):
            print(line, file=sys.stderr, flush=True)
        print(f"Listening: {listening(sock, args, https=bool(args.tls_cert or attestor))}", flush=True)
        print(f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
        config = uvicorn.Config(api.app(), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, ssl_certfile=args.tls_cert,
                                ssl_keyfile=args.tls_key, ssl_context_factory=tls_of(attestor),
                                **uvicorn_options(limits))
        Server(config, pool).run(sockets=[sock])
    finally:
        if first is not None:
            first.close()
        if pool is not None:
            pool.close(timeout_s=args.timeout + 5)
        sock.close()
        if provider is not None and hasattr(provider, "close"):
            provider.close()
        if args.unix:
            Path(args.unix).unlink(missing_ok=True)     # ours: held until now, replaced by no one meanwhile


def certificate_hosts(host: str) -> list[str]:
    """The names the attested certificate carries (clients pin its key through the evidence, not its names)."""
    return list(dict.fromkeys([host, "localhost", "127.0.0.1"]))


def tls_of(attestor):
    """uvicorn's ssl_context_factory serving the attested in-memory key and certificate (None: no attestation)."""
    if attestor is None:
        return None
    context = attestor.tls.ssl_context()
    return lambda config, default: context

