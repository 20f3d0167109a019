"""Deferred checks (--deferred-checks): a decode step's results are used before their check and checked while
the runner waits for the next reply. Nothing changes a bit, every fault is still caught and named, and no
logits leave an LM head call while any result they rest on is unchecked or failed."""
from __future__ import annotations

import pytest
import torch

from test_protect_math import all_keys, floats, ints, linear_inputs, protected, run_model
from tsqp.trusted.protect.freivalds import VerificationError
from tsqp.trusted.protect.masked import QuantizedOffload
from tsqp.untrusted.faults import KINDS, FaultInjector


@pytest.fixture(scope="module")
def tiny():
    from tsqp import weights as W
    cfg, weights = W.load("random:tiny", torch.float32)
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    return cfg, weights, norms


class FaultOn(FaultInjector):
    """Alters the results of one (op, layer) with `rows` rows, the others pass."""

    def __init__(self, kind: str, key, rows: int = 1):
        super().__init__(kind)
        self.key, self.rows = key, rows

    def apply(self, op, layer, z):
        return super().apply(op, layer, z) if (op, layer) == self.key and z.shape[0] == self.rows else z


def test_deferred_checks_change_no_bit_and_check_every_row(tiny):
    cfg, weights, norms = tiny
    prompt, decode = ints((9,), 0, cfg.vocab_size - 1), ints((5,), 0, cfg.vocab_size - 1).tolist()
    po = protected(cfg, weights, pool_tokens=8, batch_tokens=4, background=True, deferred_checks=True)
    got = run_model(cfg, norms, po, prompt, decode, chunks=2)
    report = po.report()
    po.close()
    assert torch.equal(got, run_model(cfg, norms, QuantizedOffload(cfg, weights), prompt, decode, chunks=2))
    rows = len(prompt) + len(decode)
    assert report["deferred_checks"] and report["deferred_check_s"] > 0
    assert report["checked_rows"] == rows * 4 * cfg.num_layers + 1 + len(decode)     # as strict checks count
    assert report["checked_rows"] == report["pool"]["pads_consumed"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_decode_fault_is_named_before_any_logits(tiny, kind):
    """Each op's one-row result, altered: it is handed out unchecked, and the LM head's call raises naming
    that op and layer instead of returning logits; the session is over after it."""
    cfg, weights, _ = tiny
    for key in all_keys(cfg)[:-1]:
        faults = FaultOn(kind, key)
        po = protected(cfg, weights, faults=faults, pool_tokens=4, deferred_checks=True)
        if kind == "replay":              # an earlier answer of this session, to another input
            po.submit(*key, linear_inputs(cfg, key, 1)).result()
        po.submit(*key, linear_inputs(cfg, key, 1)).result()             # used before its check
        assert faults.altered == 1
        head = po.submit("lm_head", None, floats((1, cfg.hidden_size)))
        with pytest.raises(VerificationError, match=f"'{key[0]}' layer {key[1]}"):
            head.result()
        with pytest.raises(VerificationError, match="session is over"):
            po.submit(*key, linear_inputs(cfg, key, 1))
        po.close()


def test_a_faulty_lm_head_row_is_never_returned(tiny):
    cfg, weights, _ = tiny
    faults = FaultOn("flip", ("lm_head", None))
    po = protected(cfg, weights, faults=faults, pool_tokens=4, deferred_checks=True)
    with pytest.raises(VerificationError, match="'lm_head' layer None"):
        po.submit("lm_head", None, floats((1, cfg.hidden_size))).result()
    po.close()


def test_the_next_wait_runs_the_checks_and_stops_the_run_there(tiny):
    """A failed deferred check is raised by the next request's result(), before its reply is used."""
    cfg, weights, _ = tiny
    po = protected(cfg, weights, faults=FaultOn("flip", ("qkv", 0)), pool_tokens=4, deferred_checks=True)
    po.submit("qkv", 0, linear_inputs(cfg, ("qkv", 0), 1)).result()
    following = po.submit("o", 0, linear_inputs(cfg, ("o", 0), 1))
    with pytest.raises(VerificationError, match="'qkv' layer 0"):
        following.result()
    po.close()


def test_a_model_run_with_a_late_decode_fault_stops_naming_it(tiny):
    cfg, weights, norms = tiny
    po = protected(cfg, weights, faults=FaultOn("flip", ("down", 1)), pool_tokens=4, deferred_checks=True)
    with pytest.raises(VerificationError, match="'down' layer 1"):
        run_model(cfg, norms, po, torch.tensor([5, 6, 7]), [9, 10])
    po.close()


def test_requests_of_several_rows_are_still_checked_before_use(tiny):
    cfg, weights, _ = tiny
    key = ("gate_up", 1)
    po = protected(cfg, weights, faults=FaultOn("flip", key, rows=3), pool_tokens=4, deferred_checks=True)
    with pytest.raises(VerificationError, match="'gate_up' layer 1"):
        po.submit(*key, linear_inputs(cfg, key, 3)).result()
    po.close()


def test_an_error_while_checks_are_pending_names_the_failed_check(tiny):
    """A bad unchecked result may be why a later step fails (say, activations no longer finite): the pending
    checks run first and their failure is the error."""
    cfg, weights, _ = tiny
    po = protected(cfg, weights, faults=FaultOn("zero", ("o", 0)), pool_tokens=4, deferred_checks=True)
    po.submit("o", 0, linear_inputs(cfg, ("o", 0), 1)).result()
    x = linear_inputs(cfg, ("gate_up", 0), 1)
    x[0, 3] = float("nan")               # a real non-finite input: either kernel (fast.py) refuses it
    with pytest.raises(VerificationError, match="'o' layer 0"):
        po.submit("gate_up", 0, x)
    po.close()


def test_deferred_checks_need_verify(tiny):
    cfg, weights, _ = tiny
    po = protected(cfg, weights, verify=False, deferred_checks=True)
    assert po.deferred is None and not po.report()["deferred_checks"]
    po.close()


# ---- found by a red-team pass (the reproducers, turned around) -------------------------------------------
class DiesAfterFault:
    """A server that alters a result, then fails the runner's next send (a dead server's broken pipe)."""

    def __init__(self, inner, faults: FaultInjector):
        self.inner, self.faults = inner, faults
        self.stats, self.dtype = inner.stats, inner.dtype

    def empty(self, shape, dtype=None):
        return self.inner.empty(shape, dtype)

    def submit(self, op, layer, *xs):
        if self.faults.altered:
            raise BrokenPipeError(32, "Broken pipe")
        return self.inner.submit(op, layer, *xs)

    def close(self):
        self.inner.close()


def test_a_server_that_fails_after_altering_a_result_is_still_named(tiny):
    """The send after an altered one-row result fails: the pending check runs before that error leaves, so
    the error is the verification failure (tsqp api answers it as the server's fault, never retries it)."""
    from tsqp.local import LocalOffload
    from tsqp.trusted.protect.masked import ProtectedOffload
    from tsqp.untrusted.intmm import IntCompute
    cfg, weights, norms = tiny
    faults = FaultOn("flip", ("o", 0))
    po = ProtectedOffload(DiesAfterFault(LocalOffload(IntCompute(cfg, weights, faults=faults)), faults), cfg,
                          weights, background=False, deferred_checks=True)
    with pytest.raises(VerificationError, match="'o' layer 0"):
        run_model(cfg, norms, po, torch.tensor([5, 6, 7]), [9, 10])
    assert po.failure is not None
    po.close()


def test_a_result_kept_from_before_a_failure_is_not_handed_out_again(tiny):
    cfg, weights, _ = tiny
    key = ("o", 0)
    po = protected(cfg, weights, faults=FaultOn("flip", key), pool_tokens=4, deferred_checks=True)
    altered = po.submit(*key, linear_inputs(cfg, key, 1))
    altered.result()                                                  # used before its check (by design)
    with pytest.raises(VerificationError, match="'o' layer 0"):
        po.submit("gate_up", 0, linear_inputs(cfg, ("gate_up", 0), 1)).result()
    with pytest.raises(VerificationError, match="session is over"):
        altered.result()
    po.close()


def test_an_interrupt_during_the_checks_ends_the_session(tiny, monkeypatch):
    """Checks that an interrupt (Ctrl-C in a notebook) stopped are gone: the session cannot go on to logits."""
    from tsqp.trusted.protect import deferred
    cfg, weights, _ = tiny
    key = ("down", 1)
    po = protected(cfg, weights, faults=FaultOn("flip", key), pool_tokens=4, deferred_checks=True)
    po.submit(*key, linear_inputs(cfg, key, 1)).result()

    def interrupted(ok, op, layer):
        raise KeyboardInterrupt
    monkeypatch.setattr(deferred, "failing_rows", interrupted)
    head = po.submit("lm_head", None, floats((1, cfg.hidden_size)))
    with pytest.raises(KeyboardInterrupt):
        head.result()
    monkeypatch.undo()
    for again in (head.result, lambda: po.submit("qkv", 0, linear_inputs(cfg, ("qkv", 0), 1))):
        with pytest.raises(VerificationError, match="session is over"):
            again()
    po.close()


def test_the_queue_and_the_kept_buffers_stay_bounded_over_a_long_decode(tiny):
    cfg, weights, norms = tiny
    po = protected(cfg, weights, pool_tokens=8, batch_tokens=8, background=True, deferred_checks=True)
    run_model(cfg, norms, po, torch.tensor([5, 6, 7]), ints((60,), 0, cfg.vocab_size - 1).tolist())
    assert len(po.deferred) == 0
    assert sum(len(v) for v in po.deferred._free.values()) <= 2 * len(all_keys(cfg))
    po.close()
