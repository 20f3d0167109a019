"""Every flag the parser accepts either takes effect or is refused with a message naming it.

The matrix test adds each flag of `tsqp run`, `tsqp api` and `tsqp serve` to each of a set of command lines
(local, shm, frames, tcp, protected, generating, chatting, ...) and checks the command's own flag checks
against a table written here by hand from what each command does: where the table says the flag applies, the
command line is accepted; anywhere else it is refused, before anything is loaded, with one line naming the
flag. The behaviour tests then run real commands (random:tiny, in this process and against a real server) to
show that accepted flags do take effect and refused ones write nothing.
"""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from conftest import serving
from tsqp import cli
from tsqp.commands import flags

# ---- the command lines, and where each flag applies on them ------------------------------------------------
IPC = "ipc:///tmp/tsqp-flags-test/s.ipc"      # parsed only: nothing binds or connects in the matrix
TCP = "tcp://127.0.0.1:5999"

RUN_CONTEXTS = {   # name -> the command line a flag is added to
    "local": ["--local", "--model", "random:tiny"],
    "local-generate": ["--local", "--model", "random:tiny", "--max-new-tokens", "4"],
    "local-sample": ["--local", "--model", "random:tiny", "--max-new-tokens", "4", "--temperature", "0.7"],
    "local-chat": ["--local", "--model", "random:tiny", "--chat", "hello"],
    "local-protect": ["--local", "--model", "random:tiny", "--protect", "otp", "--verify"],
    "shm": ["--endpoint", IPC],
    "shm-socket": ["--endpoint", IPC, "--control", "socket"],
    "frames": ["--endpoint", IPC, "--transport", "frames"],
    "tcp-insecure": ["--endpoint", TCP, "--insecure"],
    "tcp-curve": ["--endpoint", TCP, "--keys", "KEYS"],
    "protect": ["--endpoint", IPC, "--model", "random:tiny", "--protect", "otp"],
    "protect-verify": ["--endpoint", IPC, "--model", "random:tiny", "--protect", "otp", "--verify"],
}
LOCAL = {"local", "local-generate", "local-sample", "local-chat", "local-protect"}
REMOTE = set(RUN_CONTEXTS) - LOCAL
SHM = {"shm", "shm-socket", "protect", "protect-verify"}
PROTECTED = {"local-protect", "protect", "protect-verify"}
GENERATING = {"local-generate", "local-sample", "local-chat"}
ALL = set(RUN_CONTEXTS)

RUN_APPLIES = {   # flag -> the contexts where it takes effect (everywhere else: refused)
    "model": ALL, "local": LOCAL, "policy": ALL, "protect": ALL, "compile": ALL, "attn_dtype": ALL, "chunks": ALL,
    "threads": ALL, "json": ALL, "no_warmup": ALL, "max_new_tokens": ALL, "chat": ALL,
    "device": LOCAL, "dtype": LOCAL,              # float32 (the sample value) is what --protect computes from
    "endpoint": REMOTE, "transport": REMOTE, "timeout": REMOTE, "connect_timeout": REMOTE, "max_arena_mb": REMOTE,
    "arena_mb": SHM, "control": SHM, "spin_us": SHM - {"shm-socket"},
    "keys": {"tcp-curve"}, "server_key": {"tcp-curve"}, "client_key": {"tcp-curve"},
    "insecure": {"tcp-insecure"},                              # on tcp-curve it turns off the keys given there
    "verify": PROTECTED, "length_bucket": PROTECTED, "pad_pool": PROTECTED,
    "deferred_checks": {"local-protect", "protect-verify"},
    "tokens": ALL - {"local-chat"}, "prompt_ids": ALL - {"local-chat"}, "prompt": ALL - {"local-chat"},
    "system": {"local-chat"}, "tokenizer": GENERATING, "temperature": GENERATING, "top_k": GENERATING,
    "top_p": GENERATING, "ignore_eos": GENERATING, "seed": {"local-sample"},
    "dump_logits": ALL - GENERATING, "attest": ALL,
}
# Adding these to these contexts makes a flag already there inapplicable: that one is named instead.
FLIPS = {("local", ctx): "control" if ctx == "shm-socket" else "endpoint" for ctx in REMOTE} | \
    {("insecure", "tcp-curve"): "keys"}

API_CONTEXTS = {name: RUN_CONTEXTS[name] for name in ("local", "local-protect", "shm", "shm-socket", "frames",
                                                      "tcp-insecure", "tcp-curve", "protect", "protect-verify")}
API_ONLY = ("tokenizer", "host", "port", "model_name", "api_key", "max_batch", "max_step_tokens", "kv_budget_mb",
            "queue", "max_tokens", "session_idle",
            "unix", "max_connections", "header_timeout", "body_timeout", "api_key_file")
API_APPLIES = {k: v & set(API_CONTEXTS) for k, v in RUN_APPLIES.items() if k in flags.RUNNER} | \
    {k: set(API_CONTEXTS) for k in API_ONLY} | {"tls_cert": set(), "tls_key": set()} | \
    {"chunks": set(), "reconnect_after_verification_failure": {"local-protect", "protect-verify"}}

SERVE_CONTEXTS = {"ipc": ["--endpoint", IPC], "tcp-insecure": ["--endpoint", TCP, "--insecure"],
                  "tcp-curve": ["--endpoint", TCP, "--keys", "KEYS"],
                  "protect": ["--endpoint", IPC, "--protect", "otp"]}
S_ALL = set(SERVE_CONTEXTS)
SERVE_APPLIES = {name: S_ALL for name in ("model", "device", "endpoint", "max_sessions", "max_sessions_per_user",
                                          "max_request_mb", "max_message_mb", "max_queued_mb", "max_arena_mb",
                                          "threads", "record", "protect")} | {
    "dtype": S_ALL, "inject_faults": {"protect"}, "idle_timeout": {"tcp-insecure", "tcp-curve"},
    "keys": {"tcp-curve"}, "server_key": {"tcp-curve"}, "allow": {"tcp-curve"},
    "insecure": {"tcp-insecure"}, "public": {"tcp-insecure", "tcp-curve"}, "spin_us": {"ipc", "protect"},
}
SERVE_FLIPS = {("insecure", "tcp-curve"): "keys"}


def value_of(dest: str, context: list[str], keys: str) -> list[str]:
    """The flag with a value that keeps the context's other choices (its endpoint, transport, control)."""
    def given(flag, default):
        return context[context.index(flag) + 1] if flag in context else default
    values = {
        "model": ["random:tiny"], "device": ["cpu"], "dtype": ["float32"], "endpoint": [given("--endpoint", IPC)],
        "transport": [given("--transport", "frames" if given("--endpoint", IPC).startswith("tcp") else "shm")],
        "control": [given("--control", "pipes")], "timeout": ["5"], "connect_timeout": ["5"], "arena_mb": ["64"],
        "max_arena_mb": ["512"], "spin_us": ["10"], "keys": [keys], "server_key": [f"{keys}/server.key"],
        "client_key": [f"{keys}/client.key_secret"], "policy": ["linear"], "protect": ["otp"],
        "length_bucket": ["4"], "pad_pool": ["8"], "attn_dtype": ["float32"], "chunks": ["2"],
        "threads": [str(torch.get_num_threads())], "tokens": ["8"], "prompt_ids": ["1,2,3"], "prompt": ["hi"],
        "chat": ["hi"], "system": ["be brief"], "tokenizer": ["tok.json"], "max_new_tokens": ["2"],
        "temperature": ["0.5"], "top_k": ["5"], "top_p": ["0.9"], "seed": ["1"], "json": ["out.json"],
        "dump_logits": ["out.npy"], "host": ["127.0.0.1"], "port": ["0"], "model_name": ["m"], "api_key": ["k"],
        "max_batch": ["2"], "max_step_tokens": ["32"], "kv_budget_mb": ["64"], "queue": ["2"], "max_tokens": ["16"], "session_idle": ["60"], "tls_cert": ["c.pem"],
        "tls_key": ["k.pem"], "max_sessions": ["4"], "max_sessions_per_user": ["2"], "max_request_mb": ["64"],
        "max_message_mb": ["65"], "max_queued_mb": ["64"], "idle_timeout": ["60"], "record": ["rec"],
        "inject_faults": ["flip"], "allow": [f"{keys}/allowed"], "attest": ["off"], "unix": ["api.sock"],
        "max_connections": ["64"], "header_timeout": ["5"], "body_timeout": ["5"], "api_key_file": ["key.txt"],
    }
    return [f"--{dest.replace('_', '-')}", *values.get(dest, [])]


PARSER, WRITTEN = cli.parser(), flags.suppressed(cli.parser())     # built once: the matrix parses ~900 lines


def outcome(argv: list[str]) -> str | None:
    """What `tsqp` does with the command line up to running it: None (accepted) or the refusal's message."""
    args = PARSER.parse_args(argv)
    try:
        cli.resolve(args)
        flags.refuse_inapplicable(args, flags.given(WRITTEN, argv))
    except ValueError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> str:
    """Real CurveZMQ key files (tsqp keys), so a tcp:// runner resolves its keys as it would for real."""
    d = tmp_path_factory.mktemp("keys")
    assert cli.main(["keys", "--dir", str(d)]) == 0
    return str(d)


def dests_of(command: str) -> set[str]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, cli.argparse._SubParsersAction))
    return {a.dest for a in sub.choices[command]._actions if a.dest != "help"}


@pytest.mark.parametrize("command,applies", [("run", RUN_APPLIES), ("api", API_APPLIES), ("serve", SERVE_APPLIES)])
def test_every_flag_has_a_rule_and_an_expectation(command, applies):
    """A flag added to the parser fails here until the rules say where it applies, and this test agrees."""
    assert set(flags.RULES[command]) == dests_of(command)
    assert set(applies) == dests_of(command)


def test_every_bench_flag_has_a_rule():
    assert set(flags.RULES["bench"]) == dests_of("bench")


def check_matrix(command: str, contexts: dict, applies: dict, flips: dict, keys: str) -> int:
    wrong = []
    for ctx_name, ctx in contexts.items():
        ctx = [keys if a == "KEYS" else a for a in ctx]
        base = outcome([command, *ctx])
        assert base is None, (ctx_name, base)
        for dest in sorted(applies):
            message = outcome([command, *ctx, *value_of(dest, ctx, keys)])
            named = flips.get((dest, ctx_name), dest)
            if ctx_name in applies[dest]:
                if message is not None:
                    wrong.append(f"{ctx_name} + --{dest}: refused ({message}), but it applies")
            elif message is None or not message.startswith(f"--{named.replace('_', '-')} "):
                wrong.append(f"{ctx_name} + --{dest}: expected a refusal naming --{named}, got {message!r}")
    assert not wrong, "\n".join(wrong)
    return len(contexts) * len(applies)


def test_every_run_flag_in_every_mode_takes_effect_or_is_refused(keys):
    old = torch.get_num_threads()
    try:
        assert check_matrix("run", RUN_CONTEXTS, RUN_APPLIES, FLIPS, keys) == len(RUN_CONTEXTS) * len(dests_of("run"))
    finally:
        torch.set_num_threads(old)


def test_every_api_flag_in_every_mode_takes_effect_or_is_refused(keys):
    assert check_matrix("api", API_CONTEXTS, API_APPLIES, FLIPS, keys) == len(API_CONTEXTS) * len(dests_of("api"))
    both = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]       # together they apply (files checked at start)
    assert outcome(["api", "--local", *both]) is None


def test_every_serve_flag_takes_effect_or_is_refused(keys):
    assert check_matrix("serve", SERVE_CONTEXTS, SERVE_APPLIES, SERVE_FLIPS, keys) == 4 * len(SERVE_APPLIES)


def test_combinations_of_mode_flags():
    """Pairs the one-flag matrix cannot show: each refusal names the flag that cannot apply."""
    cases = {
        ("run", "--endpoint", IPC, "--protect", "otp", "--policy", "seed"): "--policy",
        ("run", "--endpoint", IPC, "--protect", "otp", "--policy", "flash"): "--policy",
        ("run", "--local", "--deferred-checks"): "--deferred-checks",
        ("run", "--local", "--protect", "otp", "--deferred-checks"): "--deferred-checks",
        ("run", "--local", "--prompt", "a", "--chat", "b"): "--prompt",
        ("run", "--local", "--prompt-ids", "1", "--prompt", "b"): "--prompt-ids",
        ("run", "--local", "--max-new-tokens", "2", "--top-k", "4", "--seed", "3"): None,   # top-k samples at T=1
        ("run", "--local", "--max-new-tokens", "2", "--temperature", "0", "--seed", "3"): "--seed",
        ("run", "--local", "--max-new-tokens", "2", "--top-p", "1.0", "--seed", "3"): "--seed",
        ("run", "--endpoint", IPC, "--transport", "frames", "--spin-us", "5"): "--spin-us",
        ("run", "--endpoint", IPC, "--transport", "frames", "--arena-mb", "5"): "--arena-mb",
        ("run", "--endpoint", TCP, "--keys", "/nowhere", "--insecure"): "--keys",
        ("serve", "--endpoint", IPC, "--dtype", "bfloat16", "--protect", "otp"): "--dtype",
        ("run", "--local", "--dtype", "bfloat16", "--protect", "otp"): "--dtype",
        ("bench", "--transport", "local,ipc,tcp,shm-socket", "--spin-us", "5"): "--spin-us",
        ("bench", "--transport", "local,shm-otp-verify", "--spin-us", "5"): None,
        ("bench", "--transport", "local,shm", "--pad-rate", "64"): "--pad-rate",
        ("bench", "--transport", "local,shm-otp", "--pad-rate", "64"): None,
        ("bench", "--transport", "shm,tcp", "--sustained", "3"): "--sustained",
        ("bench", "--transport", "shm-otp-verify-deferred", "--sustained", "3"): None,
        ("api", "--local", "--unix", "a.sock", "--host", "0.0.0.0"): "--host",
        ("api", "--local", "--unix", "a.sock", "--port", "8001"): "--port",
        ("api", "--local", "--api-key", "k", "--api-key-file", "f"): "--api-key-file",
    }
    for argv, named in cases.items():
        message = outcome(list(argv))
        assert (message is None) if named is None else (message or "").startswith(named + " "), (argv, message)


# ---- the same as a user sees it: real runs ------------------------------------------------------------------
def main_here(capsys, *argv) -> tuple[int, str]:
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = cli.main([str(a) for a in argv])
    finally:
        signal.signal(signal.SIGTERM, old)
    return rc, capsys.readouterr().err


TINY = ("--local", "--model", "random:tiny", "--device", "cpu", "--no-warmup")


def test_output_flags_take_effect_or_write_nothing(tmp_path, capsys):
    """--json and --dump-logits write what they say in a prefill; with generation --dump-logits is refused
    (it used to write nothing and say nothing), and so is the whole run: no JSON either."""
    out, npy = tmp_path / "prefill.json", tmp_path / "prefill.npy"
    assert main_here(capsys, "run", *TINY, "--tokens", 6, "--json", out, "--dump-logits", npy)[0] == 0
    result = json.loads(out.read_text())
    assert result["settings"]["tokens"] == 6 and result["settings"]["transport"] == "local"
    assert np.load(npy).shape == (512,) and int(np.load(npy).argmax()) == result["argmax"]

    out, npy = tmp_path / "gen.json", tmp_path / "gen.npy"
    rc, err = main_here(capsys, "run", *TINY, "--max-new-tokens", 3, "--json", out, "--dump-logits", npy)
    assert rc == 2 and err.count("\n") == 1 and "--dump-logits" in err and "generation" in err, err
    assert not out.exists() and not npy.exists()


def test_mode_flags_take_effect(tmp_path, capsys):
    """Accepted sampling, protection and prefill flags show in what the run did, not only in what it says."""
    runs = {}
    for name, extra in {"greedy": ("--max-new-tokens", 4, "--ignore-eos"),
                        "sampled": ("--max-new-tokens", 4, "--ignore-eos", "--temperature", 2.0, "--top-k", 50,
                                    "--seed", 11),
                        "again": ("--max-new-tokens", 4, "--ignore-eos", "--temperature", 2.0, "--top-k", 50,
                                  "--seed", 11),
                        "protected": ("--tokens", 5, "--protect", "otp", "--verify", "--pad-pool", 8),
                        "chunked": ("--tokens", 8, "--chunks", 2, "--policy", "seed")}.items():
        out = tmp_path / f"{name}.json"
        rc, err = main_here(capsys, "run", *TINY, *extra, "--json", out)
        assert rc == 0, (name, err)
        runs[name] = json.loads(out.read_text())
    assert runs["greedy"]["settings"]["sampling"]["temperature"] == 0
    sampled = runs["sampled"]["settings"]["sampling"]
    assert (sampled["temperature"], sampled["top_k"], sampled["seed"]) == (2.0, 50, 11)
    assert runs["sampled"]["generated_ids"] == runs["again"]["generated_ids"]          # the seed took effect
    assert len(runs["greedy"]["generated_ids"]) == 4                                    # --ignore-eos
    protection = runs["protected"]["protection"]
    assert protection["verify"] and protection["checked_rows"] > 0 and protection["pool"]["pool_tokens"] == 8
    assert runs["protected"]["settings"]["protect"] == "otp"
    assert (runs["chunked"]["settings"]["chunks"], runs["chunked"]["settings"]["policy"]) == (2, "seed")


def test_refusals_come_before_anything_loads(capsys):
    """Each refused combination exits 2 with one line naming the flag; none connects to the (absent) server."""
    for argv, named in {("run", *TINY, "--endpoint", IPC): "--endpoint",
                        ("run", *TINY, "--seed", 3): "--seed",
                        ("run", "--endpoint", IPC, "--device", "cpu"): "--device",
                        ("run", "--endpoint", IPC, "--pad-pool", 8): "--pad-pool",
                        ("api", "--local", "--model", "random:tiny", "--tls-cert", "c.pem"): "--tls-cert",
                        ("api", "--local", "--model", "random:tiny", "--connect-timeout", 3): "--connect-timeout",
                        ("serve", "--endpoint", IPC, "--inject-faults", "flip"): "--inject-faults"}.items():
        rc, err = main_here(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and err.split(": error: ")[1].startswith(named + " "), (argv, err)


def test_remote_flags_take_effect(tmp_path, capsys):
    """Against a real server: the transport, control and spin flags show in the run's settings and bytes."""
    with serving("random:tiny") as (endpoint, _):
        runs = {}
        for name, extra in {"shm": ("--spin-us", 50), "socket": ("--control", "socket"),
                            "frames": ("--transport", "frames")}.items():
            out = tmp_path / f"{name}.json"
            rc, err = main_here(capsys, "run", "--endpoint", endpoint, "--tokens", 4, "--no-warmup",
                                "--connect-timeout", 30, *extra, "--json", out)
            assert rc == 0, (name, err)
            runs[name] = json.loads(out.read_text())
    assert runs["shm"]["settings"]["spin_us"] == 50 and runs["shm"]["stats"]["shm_sent_bytes"] > 0
    assert runs["socket"]["settings"]["control"] == "socket"
    assert runs["frames"]["settings"]["transport"] == "ipc" and runs["frames"]["stats"]["shm_sent_bytes"] == 0
