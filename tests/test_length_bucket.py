"""`tsqp run --protect otp --length-bucket N`: what the server observes follows from the bucketed prompt length
only (issue 29, item 3). Two prompts of different lengths in one bucket run against a real protected server
(tsqp's Server on IntCompute, behind a ROUTER of the test's own that writes down every message it receives):
the server's view, hello and attach included, is byte for byte the same, but for the runner's pid and the
arena's random name, which no length decides. (The arena was sized from the bucketed prompt + new tokens:
prompts of 1,620 and 1,650 tokens, bucket 64, 32 new tokens, attached arenas of different sizes.)"""
from __future__ import annotations

import threading

import pytest
import torch
import zmq

from conftest import run_here, short_endpoint
from tsqp import weights as W
from tsqp.untrusted.intmm import IntCompute
from tsqp.untrusted.peers import THIS_PROCESS
from tsqp.untrusted.server import Server
from tsqp.wire import protocol as P

BUCKET, NEW = 64, 32          # random:tiny's arena passes its 16 MiB floor beyond ~1,490 rows


class Observer(threading.Thread):
    """A protected server that records its view: each message's bytes as received (JSON ones decoded, with the
    pid and the arena's name set aside) and each frame's length."""

    def __init__(self):
        super().__init__(daemon=True)
        cfg, weights = W.load("random:tiny", torch.float32, "cpu")
        self.endpoint = short_endpoint("bucket")
        self.server = Server(IntCompute(cfg, weights, "cpu"), W.norm_weights(weights), self.endpoint,
                             W.describe("random:tiny"), max_sessions=4)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.view: list = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if not self.sock.poll(10):
                continue
            peer, *body = self.sock.recv_multipart()
            self.view.append(self.seen(body))
            self.sock.send_multipart([peer, *self.server.handle(peer, body, THIS_PROCESS)], copy=False)

    @staticmethod
    def seen(body: list) -> tuple:
        head = body[0]
        if P.is_binary(head):
            return ("call", head, tuple(len(f) for f in body[1:]))
        msg = P.decode(head)
        msg.pop("pid", None)                                   # the runner's process: no length in it
        if isinstance(msg.get("arena"), dict):
            msg["arena"] = {**msg["arena"], "name": "<random>"}  # memfd name: a random per-session token
        return ("json", sorted(msg.items(), key=str), tuple(len(f) for f in body[1:]))

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close(linger=0)


def view_of(prompt_len: int, transport: str) -> list:
    observer = Observer()
    observer.start()
    try:
        ids = ",".join(str(5 + i % 200) for i in range(prompt_len))
        rc = run_here("--protect", "otp", "--model", "random:tiny", "--endpoint", observer.endpoint,
                      "--transport", transport, *(("--control", "socket") if transport == "shm" else ()),
                      "--prompt-ids", ids,
                      "--max-new-tokens", str(NEW), "--ignore-eos", "--length-bucket", str(BUCKET), "--no-warmup",
                      "--timeout", "60")
        assert rc == 0
    finally:
        observer.close()
    return observer.view


@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_two_prompts_in_one_bucket_look_the_same_to_the_server(transport):
    short, long = view_of(1620, transport), view_of(1650, transport)   # both 1,664 rows once bucketed
    attach = [v for v in short if v[0] == "json" and dict(v[1]).get("type") == "attach"]
    assert len(attach) == (transport == "shm")
    assert len(short) == len(long) and short[0][0] == "json" and dict(short[0][1])["type"] == "hello"
    for i, (a, b) in enumerate(zip(short, long)):
        assert a == b, f"message {i} differs: {a!r:.300} vs {b!r:.300}"
    third = view_of(1700, transport)                                   # 1,728 rows: another bucket
    assert third != short
