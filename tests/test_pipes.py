"""The control pipes beside the arena (wire/pipes.py, the default for shm): same logits as the ZeroMQ socket
path, bad control messages answered with errors, a dead server reported within the timeout, the socket still
served meanwhile."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from conftest import run_here, serving
from tsqp.wire import protocol as P
from tsqp.trusted.model import TrustedModel
from tsqp.wire.client import RemoteOffload
from tsqp.commands.run import fixed_prompt
from tsqp.wire.transport import ServerTimeout

def prefill(remote, policy="linear", chunks=1, T=40):
    model = TrustedModel(remote.cfg, remote.norms, remote, policy, remote.stats)
    return model.prefill(fixed_prompt(remote.cfg, T), model.new_cache(T), chunks)


def ask(remote: RemoteOffload, payload: bytes) -> dict:
    """One raw message down the request pipe; its reply, decoded."""
    pipes = remote.channel.pipes
    pipes.send(payload, 5.0)
    assert pipes.wait(5.0)
    (reply,) = pipes.receive()
    return P.decode(reply)


@pytest.fixture(scope="module")
def server():
    with serving("random:tiny") as (endpoint, proc):
        yield endpoint, proc


@pytest.mark.parametrize("policy,chunks", [("linear", 1), ("flash", 3), ("seed", 2)])
def test_same_logits_as_the_socket_path(server, policy, chunks):
    endpoint, _ = server
    plain = RemoteOffload(endpoint, "shm", control="socket")
    bell = RemoteOffload(endpoint, "shm", control="pipes")
    try:
        want = prefill(plain, policy, chunks)
        got = prefill(bell, policy, chunks)
        socket_bytes_before = bell.stats.sent_bytes
        assert torch.equal(got, want)
        assert bell.stats.rpc_calls == plain.stats.rpc_calls
        assert bell.stats.shm_sent_bytes == plain.stats.shm_sent_bytes
        # both sessions live side by side: the socket one still answers while the bell one is active
        assert torch.equal(prefill(plain, policy, chunks), want)
        assert socket_bytes_before > 0
        assert not bell.arena.live                # every region was given back
        assert torch.equal(prefill(bell, policy, chunks), want)     # and reused: the same result again
        assert not bell.arena.live
    finally:
        plain.close()
        bell.close()


def test_bad_control_messages_get_errors(server):
    endpoint, _ = server
    bell = RemoteOffload(endpoint, "shm", control="pipes")

    try:
        assert ask(bell, b"not json")["type"] == "error"
        err = ask(bell, P.encode({"type": "hello", "id": 2}))                    # only calls travel here
        assert err["type"] == "error" and "calls only" in err["error"], err
        bad = P.encode_call("qkv", 0, 3, [P.TensorMeta("float32", (4, bell.cfg.hidden_size), bell.arena.size)],
                            P.TensorMeta("float32", (4, bell.cfg.qkv_size), 0))
        err = ask(bell, bad)                                                     # an input beyond the arena
        assert err["type"] == "error" and err["id"] == 3 and "outside" in err["error"], err
        ref = RemoteOffload(endpoint, "shm", control="socket")
        try:
            assert torch.equal(prefill(bell), prefill(ref))                 # and the session still works
        finally:
            ref.close()
        pipes = bell.channel.pipes
        os.write(pipes.out_fd, b"\xff\xff\xff\x7f")                 # a length no message has: framing lost
        assert pipes.wait(5.0)
        (reply,) = pipes.receive()
        err = P.decode(reply)
        assert err["type"] == "error" and "corrupt" in err["error"] and "session dropped" in err["error"], err
    finally:
        bell.close()


def test_dead_server_is_reported_within_the_timeout():
    with serving("random:tiny") as (endpoint, proc):
        bell = RemoteOffload(endpoint, "shm", control="pipes", timeout_s=2.0)
        try:
            prefill(bell)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(ServerTimeout, match=r"op embed|op qkv"):
                prefill(bell)
            assert time.monotonic() - t0 < 5
        finally:
            bell.close()


def test_polling_on_both_sides_gives_the_same_logits():
    """--spin-us: the server polls the pipes after each call and the runner polls for its reply."""
    with serving("random:tiny", extra=("--spin-us", "300")) as (endpoint, _):
        plain = RemoteOffload(endpoint, "shm", control="socket")
        polled = RemoteOffload(endpoint, "shm", spin_s=300e-6)
        try:
            want = prefill(plain, "flash", 2)
            assert torch.equal(prefill(polled, "flash", 2), want)
            assert torch.equal(prefill(plain, "flash", 2), want)     # the socket is served while the server polls
        finally:
            plain.close()
            polled.close()
        for flags in (["--spin-us", "200"], ["--control", "socket"]):
            assert run_here("--endpoint", endpoint, "--tokens", "8", "--no-warmup", *flags) == 0


def test_repeated_call_bytes_are_served_and_anything_else_is_checked(server):
    """The server keeps a checked call's views keyed on its header but the id: a repeat must still compute on
    the current data and echo the new id, and any other header is checked again."""
    endpoint, _ = server
    bell = RemoteOffload(endpoint, "shm", control="pipes")
    ref = RemoteOffload(endpoint, "shm", control="socket")
    try:
        D = bell.cfg.hidden_size
        x = bell.arena.empty((3, D), bell.dtype)
        y = bell.arena.empty((3, bell.cfg.qkv_size), bell.dtype)
        ins = [P.TensorMeta.of(x, bell.arena.offset_of(x))]
        out = P.TensorMeta.of(y, bell.arena.offset_of(y))
        results = []
        for rid in (10, 11):
            x.copy_(torch.randn(3, D))
            reply = ask(bell, P.encode_call("qkv", 1, rid, ins, out))
            assert reply["type"] == "result" and reply["id"] == rid, reply
            results.append(y.clone())
            want = ref.submit("qkv", 1, x.clone())
            assert torch.equal(results[-1], want.result())        # computed on the data now in the region
            want.release()
        assert not torch.equal(results[0], results[1])
        err = ask(bell, P.encode_call("qkv", 1, 12, ins, out)[:-1])          # cut short: checked, refused
        assert err["type"] == "error" and "tensor record" in err["error"], err
        bad = bytearray(P.encode_call("qkv", 1, 13, ins, out))
        bad[6] = 99                                                          # layer 99: checked again
        err = ask(bell, bytes(bad))
        assert err["type"] == "error" and err["id"] == 13 and "layer 99" in err["error"], err
    finally:
        bell.close()
        ref.close()


def test_headers_round_trip_and_malformed_ones_are_named():
    call = P.encode_call("down", 3, 2**40 + 7, [P.TensorMeta("bfloat16", (5, 96), 4096)],
                         P.TensorMeta("bfloat16", (5, 64), 8192))
    m = P.unpack(call)
    assert (m.kind, m.op, m.layer, m.id) == (P.CALL, "down", 3, 2**40 + 7)
    assert m.tensors == (P.TensorMeta("bfloat16", (5, 96), 4096), P.TensorMeta("bfloat16", (5, 64), 8192))
    result = P.encode_result("lm_head", None, 9, P.TensorMeta("float32", (1, 512)), 0.00125)
    assert P.decode(result) == {"type": "result", "id": 9, "op": "lm_head", "layer": None, "compute_s": 0.00125,
                                "output": P.TensorMeta("float32", (1, 512))}
    assert P.unpack(P.with_id(call, 5)).id == 5
    answer = P.unpack(P.answering(call, result, 0.5))             # the call's id, the result's fields, the time
    assert (answer.kind, answer.op, answer.layer, answer.id, answer.compute_s) == (P.RESULT, "lm_head", None,
                                                                                   2**40 + 7, 0.5)
    for bad, named in ((call[:10], "shorter than"), (call[:-1], "tensor record"), (b"\xc5\x01" + call[2:], "version 1"),
                       (call[:3] + b"\x63" + call[4:], "op code 99")):
        with pytest.raises(P.ProtocolError, match=named):
            P.unpack(bad)
    with pytest.raises(P.ProtocolError, match="neither a binary header nor JSON"):
        P.decode(b"\x80\x04\x95pickled")


def test_a_result_is_taken_only_as_the_header_its_call_expects():
    """The runner compares a reply with the one result header that answers its call (all but the id and the
    time); anything else goes through the full parse, which names what differs."""
    from tsqp.wire.datapath import Call, reply_time
    want = P.TensorMeta("float32", (4, 64), 8192)
    expected = P.encode_result("o", 2, 0, want, 0.0)
    call = Call("o", 2, b"", (), want, None, (), 0, 0, want.nbytes, P.but_id(expected))
    assert reply_time(P.with_id(expected, 77, 0.25), call) == 0.25
    padded = bytearray(P.with_id(expected, 77, 0.5))
    padded[5] = 1                                                   # a padding byte: carries nothing
    assert reply_time(bytes(padded), call) == 0.5
    lies = {"offset 4096": P.encode_result("o", 2, 7, want._replace(offset=4096), 0.1),
            "layer 3": P.encode_result("o", 3, 7, want, 0.1),
            r"float32\[4, 32\]": P.encode_result("o", 2, 7, want._replace(shape=(4, 32)), 0.1),
            "compute_s -1": P.encode_result("o", 2, 7, want, -1.0),
            "a call": P.encode_call("o", 2, 7, [want], want)}
    for named, reply in lies.items():
        with pytest.raises(P.ProtocolError, match=named):
            reply_time(reply, call)


def test_a_stream_longer_than_the_pipe_arrives_whole_and_in_order():
    """receive() reads once per call (a pipe's capacity); what stays in the pipe keeps it readable, so a reader
    that polls and receives gets every message of a stream several times the pipe's size, in order."""
    import threading
    from tsqp.wire.pipes import Channel
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    reader, writer = Channel(r, w), Channel(r, w)          # each uses one direction
    n = 5000
    sender = threading.Thread(target=lambda: [writer.send(b"m%06d" % i + bytes(50), 10.0) for i in range(n)])
    sender.start()
    got, deadline = [], time.monotonic() + 30
    try:
        while len(got) < n and time.monotonic() < deadline:
            if reader.wait(1.0):
                got += reader.receive()
    finally:
        sender.join(30)
        os.close(r)
        os.close(w)
    assert [m[:7] for m in got] == [b"m%06d" % i for i in range(n)]         # 285 KB through a 64 KiB pipe
    assert all(len(m) == 57 for m in got)
