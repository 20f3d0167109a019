"""The runner's receive queue is bounded in bytes by its own numbers (issue 29, item 2): a malicious server that
throws 64 frames of 24 MiB at a runner right after the hello (libzmq queued them all: 1.5 GB) costs the runner
at most (queue + 1) frames of its cap, over tcp and ipc alike. The server here is a real one (tsqp's Server
on random:tiny) behind a ROUTER socket of the test's own, which adds the flood."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import zmq

from conftest import short_endpoint
from tsqp import weights as W
from tsqp.untrusted.compute import Compute
from tsqp.untrusted.server import Server
from tsqp.wire import protocol as P
from tsqp.wire.client import Budget, RemoteOffload, receive_queue
from tsqp.wire.hello import Expected

MiB = 2**20
FRAME = 24 * MiB
FLOOD = 64


def tiny_server_and_router() -> tuple[Server, zmq.Socket]:
    """An honest server's handler for random:tiny, and a ROUTER socket (not bound yet) for a test to serve it
    on as it likes (a hostile peer in all but its answers)."""
    cfg, weights = W.load("random:tiny", torch.float32, "cpu")
    server = Server(Compute(cfg, weights, "cpu"), W.norm_weights(weights), "ipc:///nonexistent/x.ipc",
                    "random:tiny", max_sessions=8)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    return server, sock


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind, a tcp port 0 to a free port; the endpoint bound."""
    if endpoint.endswith(":0"):
        host = endpoint.rsplit(":", 1)[0]
        return f"{host}:{sock.bind_to_random_port(host)}"
    sock.bind(endpoint)
    return endpoint


class Flooder(threading.Thread):
    """Answers honestly, and right after each welcome sends FLOOD unsolicited frames of FRAME bytes (one
    buffer, sent without copies: the flood costs this side nothing)."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.server, self.sock = tiny_server_and_router()
        self.sock.setsockopt(zmq.SNDHWM, FLOOD + 8)
        endpoint = bind(self.sock, endpoint)
        self.endpoint, self.stopping, self.sent = endpoint, threading.Event(), 0
        self.junk = zmq.Frame(bytes(FRAME))

    def run(self) -> None:
        while not self.stopping.is_set():
            if not self.sock.poll(10):
                continue
            peer, *body = self.sock.recv_multipart()
            reply = self.server.handle(peer, body)
            self.sock.send_multipart([peer, *reply], copy=False)
            if not P.is_binary(body[0]) and P.decode(body[0])["type"] == "hello":
                for _ in range(FLOOD):
                    try:
                        self.sock.send_multipart([peer, self.junk], copy=False, flags=zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.Again:
                        break

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close(linger=0)


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:0", "ipc"])
def test_64_large_unsolicited_frames_after_the_hello_stay_within_the_queue_bound(endpoint):
    flooder = Flooder(short_endpoint("flood") if endpoint == "ipc" else endpoint)
    flooder.start()
    cfg, weights = W.load("random:tiny", torch.float32, "cpu")
    norms = W.norm_weights(weights)
    expect = Expected("random:tiny", cfg, lambda dtype: {k: v.to(dtype) for k, v in norms.items()})
    before = rss_kib()
    remote = RemoteOffload(flooder.endpoint, "frames", timeout_s=5, connect_timeout_s=5, expect=expect,
                           budget=Budget(max_bytes=FRAME + MiB))     # results of up to 25 MiB: the cap
    try:
        time.sleep(3.0)                              # the runner does its own work; libzmq reads meanwhile
        grown = (rss_kib() - before) * 1024
        bound = (remote.receive_queue + 1) * remote.receive_cap
        assert remote.receive_cap == FRAME + MiB and remote.receive_queue == receive_queue(FRAME + MiB) == 2
        assert flooder.sent == FLOOD, flooder.sent                     # all 64 left the server's side
        assert grown <= bound + 32 * MiB, f"grew {grown / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
    finally:
        remote.close()
        flooder.close()


def test_the_queue_holds_sixteen_mib_of_small_messages_and_two_of_any_size():
    assert receive_queue(256 * 1024) == 64 and receive_queue(1 * MiB) == 16 and receive_queue(192 * MiB) == 2
