"""`tsqp audit` against real recordings: SmolLM2-135M-Instruct (dequantized from its GGUF by transformers) on 55
English prompts, greedy generation, everything the in-process server saw recorded.

What must show: the plain split gives away >= 99% of prompt tokens to the direct attack and, separately, to
the layer-0 match, and >= 99% of the tokens fed to decode steps to the decode-step match; the token-mixing
mask of TSQP's later prototype still gives away >= 95% (set recall, row span at layer 0); recording changes
no logit; the recording format is owner-only and pickle-free; masked-input statistics flag a bad mask.
Protected runs (`--protect otp --verify` through a real `tsqp serve --protect otp --record`, a subset of the
prompts, each twice): every attack at chance, the masked limbs uniform and independent between runs of the
same prompt; the same attacks, on limbs whose pad is broken (zero), recover the text.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from audit_harness import (Csprng, load_model, make_smollm2_hf_dir, read_prompts, record_protected, run_prompts,
                           run_sessions, runner_args)
from conftest import serving_all
from tsqp import weights as W
from tsqp.audit import attacks as A
from tsqp.audit import masked as MK
from tsqp.audit import recording
from tsqp.audit.replay import Context, PublicModel, rms_normalize
from tsqp.audit.report import AuditSettings, load_truth, run_audit
from tsqp.audit.scoring import chi2_sf, fisher_greater, wilson
from tsqp.audit.views import sequences
from tsqp.untrusted.record import Recorder

# the first test to use a fixture pays for it: the checkpoint and 55 recorded generations take minutes on a
# busy 2-core machine, beyond the suite's 300 s per test
pytestmark = pytest.mark.timeout(900)

NEW_TOKENS = 5          # a prefill and 4 decode steps per prompt
WIRE = torch.float32    # tsqp's default wire dtype (bfloat16 matmuls are ~10x slower on CPUs without AMX;
                        # its uint16 storage is tested on its own below)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the 2 cores are shared, and OpenMP workers spinning for a busy core made a recording
    8x slower (this process's OMP_WAIT_POLICY is fixed before this module is imported)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def _smollm2_hf_dir(tmp_path_factory) -> Path:
    # the test extra is required, not optional: a missing package fails here (the harness names it). The
    # package is found, never imported: importing it needs the `llm` CLI, which the tests do not install.
    return make_smollm2_hf_dir(tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def prompts(_smollm2_hf_dir) -> list[list[int]]:
    from tsqp.trusted.tokenizer import Tokenizer
    tok = Tokenizer(_smollm2_hf_dir)
    return [tok.encode(text) for text in read_prompts()]


@pytest.fixture(scope="module")
def loaded(_smollm2_hf_dir):
    return load_model(_smollm2_hf_dir, WIRE)


@pytest.fixture(scope="module")
def rec_root(tmp_path_factory):
    """Where the module's recordings go (~2 GB): in memory (/dev/shm) when there is one, which spares the
    shared disk's write-back; removed when the module ends."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="tsqp-audit-test-", dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path_factory.mktemp("rec")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def plain(_smollm2_hf_dir, prompts, loaded, rec_root):
    """(recording folder, the runs): the split as it is today."""
    folder = rec_root / "plain"
    runs = run_prompts(_smollm2_hf_dir, prompts, NEW_TOKENS, WIRE, folder, loaded=loaded)
    return folder, runs


@pytest.fixture(scope="module")
def public(_smollm2_hf_dir):
    """The attacker's holdings: the public checkpoint (float32 as published here)."""
    return W.load(str(_smollm2_hf_dir), torch.float32)


@pytest.fixture(scope="module")
def plain_report(plain, public):
    folder, _ = plain
    cfg, weights = public
    return run_audit(recording.load(folder), cfg, weights, load_truth(folder / "truth.jsonl"),
                     AuditSettings(vocab_sequences=0))


def attack(report: dict, name: str) -> dict:
    return next(a for a in report["attacks"] if a["attack"] == name)


# ---- the recording ------------------------------------------------------------------------------------------
def test_recording_format_is_owner_only_and_pickle_free(tmp_path):
    rec = Recorder(tmp_path / "rec")
    session = rec.session("a/b c")                                  # a label is never a path
    ids = torch.tensor([5, 7, 11])
    x = torch.randn(3, 4).to(torch.bfloat16)
    limbs = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    session.call("embed", None, 1, [ids], x, {"type": "call", "op": "embed"})
    session.call("qkv", 0, 2, [limbs], None, {"type": "call", "op": "qkv", "masked": True})
    rec.close()
    root = tmp_path / "rec"
    folders = [p for p in root.iterdir()]
    assert [p.name for p in folders] == ["0000-a_b_c"]
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    lines = [json.loads(l) for l in (folders[0] / "index.jsonl").read_text().splitlines()]
    assert [(l["seq"], l["op"], l["layer"], l["id"]) for l in lines] == [(0, "embed", None, 1), (1, "qkv", 0, 2)]
    assert lines[0]["output"] == {"file": "000000-out.npy", "dtype": "bfloat16", "shape": [3, 4]}
    assert lines[1]["output"] is None and lines[1]["header"]["masked"] is True
    raw = np.load(folders[0] / "000000-out.npy", allow_pickle=False)       # numpy alone can read it
    assert raw.dtype == np.uint16
    assert np.array_equal(raw, x.view(torch.uint16).numpy())
    [back] = recording.load(root)
    assert back.label == "a/b c"
    assert torch.equal(back.calls[0].input(0), ids)
    assert back.calls[0].output.dtype == torch.bfloat16 and torch.equal(back.calls[0].output, x)
    assert torch.equal(back.calls[1].input(0), limbs)
    # a second server run on the same folder appends sessions instead of overwriting
    assert Recorder(root).session("next").path.name == "0001-next"


def test_reader_refuses_paths_out_of_the_session(tmp_path):
    rec = Recorder(tmp_path / "rec")
    rec.session("s").call("embed", None, 1, [torch.tensor([1])], torch.zeros(1, 2), {})
    rec.close()
    index = next((tmp_path / "rec").iterdir()) / "index.jsonl"
    index.write_text(index.read_text().replace("000000-in0.npy", "../../etc/passwd.npy"))
    with pytest.raises(recording.RecordingError, match="bad tensor file name"):
        recording.load(tmp_path / "rec")


def test_recording_holds_what_the_server_received_and_returned(plain, loaded):
    """Replaying each recorded call through a fresh server computation gives the recorded output bit for bit."""
    folder, runs = plain
    cfg, compute, _ = loaded
    [session] = recording.load(folder / "0003-prompt-3")
    ops = {c.op for c in session.calls}
    assert ops == {"embed", "qkv", "o", "gate_up", "down", "lm_head"}
    assert len(session.calls) == NEW_TOKENS * (2 + 4 * cfg.num_layers)      # per pass: embed, 4 per layer, head
    assert torch.equal(session.calls[0].input(0), torch.tensor(runs[3]["prompt_ids"]))
    for call in session.calls[:: 37]:
        expected, _ = compute.run(call.op, call.layer, call.inputs)
        assert torch.equal(call.output, expected), (call.seq, call.op, call.layer)


def test_recorded_run_gives_the_same_logits(_smollm2_hf_dir, plain, prompts, loaded):
    _, recorded = plain
    unrecorded = run_prompts(_smollm2_hf_dir, prompts[:4], NEW_TOKENS, WIRE, loaded=loaded)
    for a, b in zip(unrecorded, recorded[:4]):
        assert a["generated_ids"] == b["generated_ids"]
        assert len(a["logits"]) == len(b["logits"]) == NEW_TOKENS
        assert all(torch.equal(x, y) for x, y in zip(a["logits"], b["logits"]))


# ---- the plain split ----------------------------------------------------------------------------------------
def test_plain_split_prompt_tokens_by_the_direct_attack(plain_report, prompts):
    a = attack(plain_report, "direct")["prompt_exact"]
    assert a["tried"] == sum(map(len, prompts)) >= 500
    assert a["rate"] >= 0.99 and a["ci95"][0] > 0.98
    assert a["chance_uniform"] == pytest.approx(1 / 49152)
    assert a["at_chance"] is False and a["chance"] < 0.2      # unrelated prompts share a few openings


def test_plain_split_prompt_tokens_by_the_layer0_match(plain_report, prompts):
    a = attack(plain_report, "layer0_cosine")
    assert a["prompt_exact"]["tried"] == sum(map(len, prompts))
    assert a["prompt_exact"]["rate"] >= 0.99
    assert a["prompt_set"]["rate"] >= 0.99
    assert attack(plain_report, "layer0_span")["prompt_set"]["rate"] >= 0.99


def test_plain_split_decode_tokens_by_the_decode_step_match(plain_report, prompts):
    a = attack(plain_report, "layer0_cosine")["generated_exact"]
    assert a["tried"] == len(prompts) * (NEW_TOKENS - 1)
    assert a["rate"] >= 0.99
    assert attack(plain_report, "returned_logits")["generated_exact"]["rate"] >= 0.99   # greedy: argmax


def test_the_layer0_match_reads_rows_not_ids(plain, public, prompts):
    """The layer-0 attack alone (the embedding requests dropped from the recording) still names the tokens."""
    folder, runs = plain
    cfg, weights = public
    layer0 = A.Layer0(PublicModel(cfg, weights, WIRE))
    for session, run in zip(recording.load(folder)[:5], runs):
        session.calls = [c for c in session.calls if c.op != "embed"]
        [seq] = sequences(session)
        assert A.direct(seq).prompt == [None] * len(run["prompt_ids"])      # no ids: every position a miss
        assert A.direct(seq).info["ids_seen"] == 0
        guess = layer0.cosine(seq)
        assert guess.prompt == run["prompt_ids"]
        assert guess.decode == run["generated_ids"][:NEW_TOKENS - 1]


# ---- the token-mixing mask ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(_smollm2_hf_dir, prompts, loaded, rec_root):
    folder = rec_root / "mixed"
    runs = run_prompts(_smollm2_hf_dir, prompts, 2, WIRE, folder, mask=True, loaded=loaded)
    return folder, runs


@pytest.mark.slow
def test_token_mixing_mask_keeps_the_row_span(mixed, plain, public, prompts):
    folder, runs = mixed
    cfg, weights = public
    sessions = recording.load(folder)
    # the mask is real: the server never saw the rows the plain split sends ...
    plain_rows = sequences(recording.load(plain[0] / "0002-prompt-2")[0])[0].prefill.rows("qkv", 0).float()
    masked_rows = sequences(sessions[2])[0].prefill.rows("qkv", 0).float()
    assert masked_rows.shape == plain_rows.shape
    assert (masked_rows - plain_rows).norm() > 0.5 * plain_rows.norm()
    # ... and the runner still computes the same model (unmasking works)
    for a, b in zip(runs, plain[1]):
        assert torch.nn.functional.cosine_similarity(a["logits"][0], b["logits"][0], dim=0) > 0.99
    report = run_audit(sessions, cfg, weights, load_truth(folder / "truth.jsonl"), AuditSettings(vocab_sequences=0))
    span = attack(report, "layer0_span")["prompt_set"]
    assert span["tried"] >= 500
    assert span["rate"] >= 0.95, span
    assert span["chance_uniform"] < 0.01 and span["at_chance"] is False
    # a decode step is one row: M is a scalar there, and a scaled row still names its token
    decode = attack(report, "layer0_cosine")["generated_exact"]
    assert decode["tried"] == len(prompts) and decode["rate"] >= 0.99


def test_span_membership_separates_present_from_absent(public, prompts):
    """On a block mixed by a dense random matrix (no row shows one token on its own), exactly the tokens
    that are present lie in the row span."""
    cfg, weights = public
    layer0 = A.Layer0(PublicModel(cfg, weights, torch.float32))
    distinct = list(dict.fromkeys(prompts[12]))[:6]
    present = torch.tensor(distinct + distinct[:1])                                     # a repeated token too
    mix = Csprng().uniform(49, -1, 1).reshape(7, 7).float()
    block = mix @ layer0.table[present]                                                 # [7, D], rank 6
    residual, rank = A.span_residuals(block, layer0.unit)
    assert rank == 6
    assert set(torch.argsort(residual)[:6].tolist()) == set(distinct)
    nearest_absent = torch.sort(residual).values[6]
    assert residual[present].max() < 1e-2 < AuditSettings().span_threshold < nearest_absent


# ---- deeper layers --------------------------------------------------------------------------------------
def test_public_replay_is_the_model(_smollm2_hf_dir, public, prompts):
    """The attacker's replay of the public model agrees with transformers' (the oracle) at layers 15 and 29."""
    from transformers import AutoModelForCausalLM
    cfg, weights = public
    model = PublicModel(cfg, weights, torch.float32)
    ids = torch.tensor(prompts[0])
    hf = AutoModelForCausalLM.from_pretrained(_smollm2_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(ids[None], output_hidden_states=True).hidden_states
    ctx = Context(model, len(ids))
    for p, t in enumerate(ids.tolist()):
        for layer in (15, 29):
            mine = ctx.candidates_at(layer, torch.tensor([t]))[0]
            ref = rms_normalize(hidden[layer][0, p], weights[f"model.layers.{layer}.input_layernorm.weight"],
                                cfg.rms_norm_eps)
            assert torch.allclose(mine, ref, atol=1e-4, rtol=1e-4), (p, layer)
        ctx.append(t)


@pytest.mark.slow
def test_vocabulary_matching_at_deeper_layers(plain, public, _smollm2_hf_dir):
    """Position 0 and the decode steps (and the prompt positions between them) from layer 15's or 29's rows
    alone. Small shortlists keep it to 2 cores; a near-exact match is never the wrong token."""
    folder, runs = plain
    cfg, weights = public
    from tsqp.commands.audit import document_start
    settings = A.VocabSettings(stages=(8, 64), first_stages=(64, 256), start_token=document_start(
        str(_smollm2_hf_dir), cfg))
    model = PublicModel(cfg, weights, WIRE)
    first = A.FirstPosition(model, settings.start_token)
    sessions = recording.load(folder)
    first_ranks = [int((first.ranked == r["prompt_ids"][0]).nonzero()) for r in runs]
    chosen = [i for i, rank in enumerate(first_ranks) if rank < 256][:2]   # first token within the shortlist
    assert len(chosen) == 2
    matched = correct = decode_hits = decode_tried = 0
    for i in chosen:
        [seq] = sequences(sessions[i])
        truth = runs[i]["prompt_ids"] + runs[i]["generated_ids"][:NEW_TOKENS - 1]
        for layer in (15, 29):
            g = A.vocab_match(seq, model, layer, settings, first=first)
            assert g.prompt[0] == truth[0] and g.confident[0], (i, layer)
            found = g.prompt + g.decode
            assert len(found) == len(truth)
            decode_hits += sum(a == b for a, b in zip(g.decode, truth[len(g.prompt):]))
            decode_tried += len(g.decode)
            matched += sum(g.confident)
            correct += sum(ok and a == b for ok, a, b in zip(g.confident, found, truth))
    assert matched == correct                                     # a near-exact match names the right token
    assert decode_tried == 2 * 2 * (NEW_TOKENS - 1) and decode_hits >= 0.9 * decode_tried


# ---- masked inputs --------------------------------------------------------------------------------------
def write_limb_sessions(root: Path, rows: torch.Tensor, pad_for) -> list:
    """Two recordings of the same prompt whose layer-0 input goes out as uint8 limbs: bytes XOR pad."""
    rec = Recorder(root)
    raw = rows.contiguous().view(torch.uint8).reshape(rows.shape[0], -1)          # [T, D * itemsize] bytes
    for run in range(2):
        s = rec.session(f"run-{run}")
        limbs = raw ^ pad_for(run, raw.numel()).reshape(raw.shape)
        s.call("qkv", 0, 1, [limbs], None, {"type": "call", "op": "qkv", "layer": 0})
    rec.close()
    return recording.load(root)


def test_masked_input_statistics_pass_a_one_time_pad_and_fail_bad_masks(plain, tmp_path):
    folder, _ = plain
    rows = sequences(recording.load(folder / "0015-prompt-15")[0])[0].prefill.rows("qkv", 0)   # real activations
    rng = Csprng()

    def fresh(run, n):
        return torch.from_numpy((rng.uniform(n) * 256).floor().to(torch.uint8).numpy())

    fixed_key = fresh(0, rows.numel() * rows.element_size())
    cases = {
        "one-time pad": (fresh, True, True),
        "no mask": (lambda run, n: torch.zeros(n, dtype=torch.uint8), False, False),
        "same pad twice": (lambda run, n: fixed_key[:n], True, False),
    }
    for name, (pad, uniform_ok, independent_ok) in cases.items():
        sessions = write_limb_sessions(tmp_path / name.replace(" ", "_"), rows, pad)
        uni = [r for s in sessions for r in MK.uniformity(s, alpha=1e-6)]     # a sound mask fails 1 in 10^6
        assert uni and all(r["dtype"] == "uint8" for r in uni)
        assert all(r["pass"] for r in uni) == uniform_ok, (name, uni)
        pairs = MK.same_prompt_pairs(sessions, {"run-0": (1,), "run-1": (1,)})
        [ind] = [MK.independence(a, b, alpha=1e-6) for a, b in pairs]
        assert ind["pass"] == independent_ok, (name, ind)
        if name == "same pad twice":
            assert ind["equal_fraction"] == 1.0


def test_plain_split_has_nothing_claimed_masked(plain_report):
    assert plain_report["masked"] == {"claimed_masked_inputs": 0, "uniformity": [], "independence": []}


def test_statistics_against_closed_forms():
    for n, hits in ((10, 0), (10, 10), (50, 49)):
        lo, hi = wilson(hits, n)
        z2 = 1.959963984540054 ** 2
        if hits == 0:
            assert lo == 0 and hi == pytest.approx(z2 / (n + z2))
        if hits == n:
            assert hi == 1 and lo == pytest.approx(n / (n + z2))
        assert lo <= hits / n <= hi
    for x in (0.5, 3.0, 20.0):                    # chi-square with 2 degrees of freedom: exp(-x/2)
        assert chi2_sf(x, 2) == pytest.approx(np.exp(-x / 2), rel=1e-9)


# ---- the command ----------------------------------------------------------------------------------------
def test_tsqp_audit_command(plain, _smollm2_hf_dir, tmp_path):
    folder, _ = plain
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "-m", "tsqp.cli", "audit", str(folder / "0000-prompt-0"), "--model",
                           str(_smollm2_hf_dir), "--truth", str(folder / "truth.jsonl"), "--json", str(out),
                           "--layers", "0,15", "--shortlist", "8", "--first-shortlist", "64"],
                          capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": "."})
    assert proc.returncode == 0, proc.stderr
    assert "tsqp audit" in proc.stdout and "direct" in proc.stdout and "no input is claimed masked" in proc.stdout
    report = json.loads(out.read_text())
    assert report["counts"]["sessions"] == 1 and report["vocab_layers"] == [0, 15]
    names = [a["attack"] for a in report["attacks"]]
    assert names == ["direct", "layer0_cosine", "layer0_span", "returned_logits", "vocab_L0", "vocab_L15"]
    assert attack(report, "direct")["prompt_exact"]["rate"] == 1.0
    assert report["markdown"].startswith("| attack |")


# ---- protected runs (--protect otp --verify) ------------------------------------------------------------
PROTECTED_PROMPTS = 4        # the first 4 prompts (7 to 20 tokens), each run twice in fresh sessions
PROTECTED_TOKENS = 3         # a prefill and 2 decode steps


@pytest.fixture(scope="module")
def protected(_smollm2_hf_dir, prompts, rec_root):
    """(recording folder, runs): a real `tsqp serve --protect otp --record` and `tsqp run --protect otp
    --verify`'s sessions; runs 0-3 are the prompts once, runs 4-7 the same prompts again."""
    folder = rec_root / "protected"
    runs = record_protected(_smollm2_hf_dir, folder, prompts[:PROTECTED_PROMPTS], PROTECTED_TOKENS, repeats=2)
    return folder, runs


@pytest.fixture(scope="module")
def protected_report(protected, public, _smollm2_hf_dir):
    """Small shortlists keep vocabulary matching to 2 cores: on masked rows no candidate ever matches, so every
    stage is paid in full."""
    from tsqp.commands.audit import document_start
    folder, _ = protected
    cfg, weights = public
    vocab = A.VocabSettings(stages=(8,), first_stages=(64,), start_token=document_start(str(_smollm2_hf_dir), cfg))
    return run_audit(recording.load(folder), cfg, weights, load_truth(folder / "truth.jsonl"),
                     AuditSettings(vocab=vocab, vocab_sequences=2))


@pytest.mark.slow
def test_protected_recording_holds_only_masked_limbs(protected, public):
    """What crossed: no token ids, no float activation; every linear input uint8 limbs [5, T, in], every
    result int64 ring values; every run checked by Freivalds' test; masking is exact (a prompt's two runs
    give the same logits bit for bit)."""
    folder, runs = protected
    cfg, _ = public
    sessions = recording.load(folder)
    assert len(sessions) == 2 * PROTECTED_PROMPTS
    for session, run in zip(sessions, runs):
        assert {c.op for c in session.calls} == {"qkv", "o", "gate_up", "down", "lm_head"}
        assert len(session.calls) == PROTECTED_TOKENS * (1 + 4 * cfg.num_layers)
        for c in session.calls:
            [ref] = c.input_refs
            assert ref.dtype == "uint8" and ref.shape[0] == 5 and c.output_ref.dtype == "int64", (c.op, ref)
        assert run["protection"]["verify"] and run["protection"]["checked_rows"] > 0
    for a, b in zip(runs[:PROTECTED_PROMPTS], runs[PROTECTED_PROMPTS:]):
        assert a["prompt_ids"] == b["prompt_ids"] and a["generated_ids"] == b["generated_ids"]
        assert all(torch.equal(x, y) for x, y in zip(a["logits"], b["logits"]))


@pytest.mark.slow
def test_every_attack_is_at_chance_on_protected_recordings(protected_report, prompts):
    report = protected_report
    names = [a["attack"] for a in report["attacks"]]
    assert names == ["direct", "layer0_cosine", "layer0_span", "returned_logits", "vocab_L0", "vocab_L15", "vocab_L29"]
    n_prompt = 2 * sum(map(len, prompts[:PROTECTED_PROMPTS]))
    assert report["counts"]["prompt_tokens"] == n_prompt
    # the attacks ran on the limbs (reassembled and lifted), not skipped: every position was tried
    assert attack(report, "layer0_cosine")["prompt_exact"]["tried"] == n_prompt
    assert attack(report, "direct")["prompt_exact"]["tried"] == n_prompt
    assert all(g["direct"]["info"]["ids_seen"] == 0 for g in report["guesses"])
    assert attack(report, "returned_logits")["generated_exact"]["tried"] == 2 * PROTECTED_PROMPTS * (PROTECTED_TOKENS - 1)
    judged = 0
    for a in report["attacks"]:
        for m in ("prompt_exact", "prompt_set", "generated_exact", "generated_set"):
            r = a[m]
            if not r["tried"]:
                continue
            assert r["chance_method"] == "unrelated pairings", (a["attack"], m)
            assert r["at_chance"] is True, (a["attack"], m, r)
            judged += 1
    assert judged >= 20
    # the exact-position attacks find (close to) nothing: at most a stray hit, as on unrelated text
    assert attack(report, "layer0_cosine")["prompt_exact"]["hits"] <= 2


@pytest.mark.slow
def test_protected_masked_limbs_are_uniform_and_independent(protected_report, protected):
    m = protected_report["masked"]
    pooled = [u for u in m["uniformity"] if u["session"] == "all"]
    assert sorted((u["dtype"], u["lane"]) for u in pooled) == [("uint8 limbs", j) for j in range(5)]
    assert all(u["values"] > 10**6 for u in pooled)
    assert m["uniformity"] and all(u["pass"] for u in m["uniformity"]), [u for u in m["uniformity"] if not u["pass"]]
    assert len(m["independence"]) == PROTECTED_PROMPTS and all(r["pass"] for r in m["independence"])
    for r in m["independence"]:
        assert abs(r["equal_fraction"] - 1 / 256) < 1e-3 and abs(r["correlation"]) < 0.01
    # the same prompt twice: different bytes, and unrelated ring values once reassembled
    folder, _ = protected
    sessions = recording.load(folder)
    first, again = sequences(sessions[0])[0], sequences(sessions[PROTECTED_PROMPTS])[0]
    x, y = first.prefill.rows("qkv", 0).double(), again.prefill.rows("qkv", 0).double()
    assert x.shape == y.shape and not torch.equal(x, y)
    r = float(torch.corrcoef(torch.stack((x.reshape(-1), y.reshape(-1))))[0, 1])
    assert abs(r) * x.numel() ** 0.5 < 4.5           # r ~ N(0, 1/n) for unrelated values: |z| < 4.5, p < 1e-5


def test_attacks_read_the_limbs_when_the_pad_is_broken(_smollm2_hf_dir, prompts, public, tmp_path):
    """The same attacks on the same kind of recording (limbs in, ring values out), pads replaced by zeros:
    they recover the prompt and the generated tokens and the uniformity test fails, so 'at chance' above is
    the pads' doing, not attacks blind to limbs."""
    from tsqp.local import LocalOffload
    from tsqp.trusted.model import TrustedModel
    from tsqp.trusted.protect.masked import ProtectedOffload
    from tsqp.trusted.protect.pads import PadSource
    from tsqp.untrusted.intmm import IntCompute
    from tsqp.untrusted.record import RecordingCompute, open_private
    from tsqp.trusted.generate import generate

    class ZeroPads(PadSource):
        def fresh(self, nbytes: int):
            n, _ = super().fresh(nbytes)
            return n, torch.zeros(nbytes, dtype=torch.uint8)

    cfg, weights = W.load(str(_smollm2_hf_dir), torch.float32)
    compute, recorder = IntCompute(cfg, weights), Recorder(tmp_path / "broken")
    with open_private(tmp_path / "broken" / "truth.jsonl", "w") as truth:
        for n, ids in enumerate(prompts[:2]):
            inner = LocalOffload(RecordingCompute(compute, recorder.session(f"prompt-{n}")))
            offload = ProtectedOffload(inner, cfg, weights, pool_tokens=0, lm_head_rows=0, background=False)
            offload.pool.source = ZeroPads()
            gen = generate(TrustedModel(cfg, {k: v for k, v in weights.items() if k.endswith("norm.weight")}, offload),
                           torch.tensor(ids), PROTECTED_TOKENS, ignore_eos=True)
            truth.write(json.dumps({"session": f"prompt-{n}", "prompt_ids": ids, "generated_ids": gen.ids}) + "\n")
    recorder.close()
    pcfg, pweights = public
    report = run_audit(recording.load(tmp_path / "broken"), pcfg, pweights,
                       load_truth(tmp_path / "broken" / "truth.jsonl"), AuditSettings(layers=[0], vocab_sequences=0))
    cosine = attack(report, "layer0_cosine")
    assert cosine["prompt_exact"]["rate"] >= 0.99 and cosine["generated_exact"]["rate"] == 1.0
    assert cosine["prompt_exact"]["at_chance"] is False
    assert attack(report, "layer0_span")["prompt_set"]["rate"] >= 0.95
    assert attack(report, "returned_logits")["generated_exact"]["rate"] == 1.0
    assert attack(report, "direct")["prompt_exact"]["hits"] == 0          # the runner still embeds
    assert not all(u["pass"] for u in report["masked"]["uniformity"])


def test_fisher_test_against_scipy():
    from scipy import stats             # the test extra's oracle for this one test
    for a, n, b, m in ((1, 950, 0, 30000), (3, 950, 0, 30000), (10, 100, 100, 1000), (40, 100, 100, 1000),
                       (0, 10, 5, 50)):
        want = stats.fisher_exact([[a, n - a], [b, m - b]], alternative="greater").pvalue
        assert fisher_greater(a, n, b, m) == pytest.approx(want, rel=1e-9, abs=1e-300)


# ---- recording through a real server changes no result --------------------------------------------------
@pytest.mark.slow
def test_recording_through_a_real_server_changes_no_logit(_smollm2_hf_dir, prompts, protected, tmp_path):
    """`tsqp serve --record` (a real process) against the same server unrecorded, the runner's sessions as
    `tsqp run` opens them: the same tokens and the same logits bit for bit, for the plain split and for
    --protect otp --verify (whose recorded runs are the `protected` fixture's)."""
    model = str(_smollm2_hf_dir)
    few = prompts[:2]
    specs = [{"model": model, "extra": ("--record", str(tmp_path / "plain"), "--threads", "1")},
             {"model": model, "extra": ("--threads", "1")},
             {"model": model, "extra": ("--protect", "otp", "--threads", "1")}]
    with serving_all(specs, timeout_s=180) as [(recorded, _), (unrecorded, _), (protected_plain, _)]:
        plain = [run_sessions(runner_args(model, e, protect=False), few, PROTECTED_TOKENS) for e in (recorded, unrecorded)]
        again = run_sessions(runner_args(model, protected_plain), few, PROTECTED_TOKENS)
    sessions = recording.load(tmp_path / "plain")
    assert len(sessions) == len(few) and all(len(s.calls) > 0 for s in sessions)
    pairs = list(zip(*plain)) + list(zip(protected[1][:len(few)], again))
    for a, b in pairs:
        assert a["generated_ids"] == b["generated_ids"]
        assert len(a["logits"]) == len(b["logits"]) == PROTECTED_TOKENS
        assert all(torch.equal(x, y) for x, y in zip(a["logits"], b["logits"]))
