"""One message of many frames (issue 29, item 2's open gap): ZMQ_MAXMSGSIZE caps each frame and ZMQ_RCVHWM
counts whole messages, and libzmq shows a message to the application only once its last frame is in, so a
server that sends ONE message of 1,000 frames of the runner's cap passes both: libzmq reads and holds it all
while the runner computes or idles. The runner's receive watch (wire/watch.py) counts, from the kernel's own
figure for the connection (TCP_INFO), the bytes received and not yet handed to the runner, and drops the
connection and names the server the moment that passes its bound. The flooder is a real server (tsqp's
Server on random:tiny) behind the test's own ROUTER socket, with CurveZMQ as `tsqp serve` runs tcp."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import zmq

from conftest import short_endpoint
from test_hostile_runner import as_user, other_user, their_dir  # noqa: F401 (a fixture)
from test_runner_queue import bind, tiny_server_and_router
from tsqp import weights as W
from tsqp.wire import protocol as P
from tsqp.wire.client import Budget, RemoteError, RemoteOffload
from tsqp.wire.hello import Expected
from tsqp.wire.keys import ClientCurve
from tsqp.wire.transport import ServerTimeout, heartbeat
from tsqp.wire.watch import HEARTBEAT_BYTES_PER_S

MiB = 2**20
CAP = 1 * MiB            # the runner's receive cap here (Budget.max_bytes with the frames transport)
FRAMES = 1000            # 1,000 frames of 1 MiB in ONE message: 1 GiB


class MultiFrameServer(threading.Thread):
    """Answers honestly; `attack()` sends one unsolicited message of FRAMES frames of CAP bytes each (one
    buffer, sent without copies: the attack costs this side nothing)."""

    def __init__(self, endpoint: str, curve: bool):
        super().__init__(daemon=True)
        self.server, self.sock = tiny_server_and_router()
        heartbeat(self.sock)                   # as `tsqp serve` on tcp: its PINGs reach the runner too
        self.curve = None
        if curve:
            public, secret = zmq.curve_keypair()
            client_public, client_secret = zmq.curve_keypair()
            self.sock.setsockopt(zmq.CURVE_SERVER, 1)
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self.curve = ClientCurve(public, client_public, client_secret)
        self.endpoint, self.stopping, self.peer = bind(self.sock, endpoint), threading.Event(), None
        self.attacks, self.sent = threading.Event(), 0
        self.answer_calls = True               # False: the next call is answered by the attack alone
        self.junk = zmq.Frame(bytes(CAP - 64))     # under the cap with CurveZMQ's 33 bytes a frame

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.attacks.is_set() and self.peer is not None:
                self.attacks.clear()
                self.sock.send_multipart([self.peer, *[self.junk] * FRAMES], copy=False)
                self.sent += 1
            if not self.sock.poll(10):
                continue
            self.peer, *body = self.sock.recv_multipart()
            if P.is_binary(body[0]) and not self.answer_calls:
                self.attacks.set()
                continue
            self.sock.send_multipart([self.peer, *self.server.handle(self.peer, body)], copy=False)

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close(linger=0)


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> int:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS and return it (KiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kib()


def connect(server: MultiFrameServer) -> RemoteOffload:
    cfg, weights = W.load("random:tiny", torch.float32, "cpu")
    norms = W.norm_weights(weights)
    expect = Expected("random:tiny", cfg, lambda dtype: {k: v.to(dtype) for k, v in norms.items()})
    return RemoteOffload(server.endpoint, "frames", timeout_s=5, connect_timeout_s=5, expect=expect,
                         budget=Budget(max_bytes=CAP), curve=server.curve)


def attack_while_idle(endpoint: str, curve: bool) -> tuple[RemoteOffload, int, MultiFrameServer]:
    """Connect, then have the server send its message while the runner idles (no call in flight, nothing
    reading): the runner's peak RSS growth (the kernel's VmHWM) until the watch names the server, or 4 s."""
    server = MultiFrameServer(endpoint, curve)
    server.start()
    remote = connect(server)
    assert remote.receive_cap == CAP
    before = reset_peak()
    server.attacks.set()
    deadline = time.monotonic() + 4.0
    while remote.link.watch.violation is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)                            # what libzmq still reads after the cut counts too
    return remote, (rss_kib("VmHWM") - before) * 1024, server


def assert_cut(remote: RemoteOffload, grown: int, slack: int, errors=ServerTimeout) -> None:
    """The watch named the server hostile, the runner grew at most its bound + slack, and the next call fails."""
    watch = remote.link.watch
    assert watch.violation is not None and "hostile" in watch.violation, f"grew {grown / MiB:.0f} MiB"
    assert grown <= watch.limit + slack, \
        f"grew {grown / MiB:.0f} MiB, bound {watch.limit / MiB:.0f} MiB (+ {slack / MiB:.0f} MiB of slack)"
    with pytest.raises(errors, match="hostile"):
        remote.submit("lm_head", None, torch.zeros(1, remote.cfg.hidden_size)).result()


def test_one_message_of_a_thousand_frames_over_tcp_with_curve_is_cut_at_the_bound():
    remote, grown, server = attack_while_idle("tcp://127.0.0.1:0", curve=True)
    try:
        assert server.sent == 1
        assert server.endpoint in (remote.link.watch.violation or "")
        assert_cut(remote, grown, slack=64 * MiB, errors=(RemoteError, ServerTimeout))   # 64 MiB: the link's rate
    finally:
        remote.close()
        server.close()


def test_a_call_in_flight_answered_by_a_thousand_frames_fails_at_once_naming_the_server():
    """The runner waits for a reply (timeout 5 s); the server sends the 1 GiB message instead: the wait ends
    as soon as the watch cuts the connection, with the server named, and memory stays within the bound."""
    server = MultiFrameServer("tcp://127.0.0.1:0", curve=True)
    server.start()
    remote = connect(server)
    try:
        server.answer_calls = False
        before, t0 = reset_peak(), time.monotonic()
        pending = remote.submit("lm_head", None, torch.zeros(1, remote.cfg.hidden_size))
        with pytest.raises(ServerTimeout, match=f"the server at {server.endpoint} is hostile") as e:
            pending.result()
        took, grown = time.monotonic() - t0, (rss_kib("VmHWM") - before) * 1024     # the kernel's peak
        assert took < 3.0 and "while waiting for op lm_head" in str(e.value), (took, str(e.value))
        assert_cut(remote, grown, slack=16 * MiB)
    finally:
        remote.close()
        server.close()


def test_an_honest_session_over_tcp_is_counted_to_the_byte_and_never_named_hostile():
    """The kernel's count of bytes received, less the frames' exact wire size (watch.wire_bytes), is the
    handshake and the heartbeats alone: the same after 300 calls as after the hello, growing only by the
    heartbeats while idle (well within the allowance)."""
    server = MultiFrameServer("tcp://127.0.0.1:0", curve=True)
    server.start()
    remote = connect(server)
    try:
        watch, x = remote.link.watch, torch.randn(1, remote.cfg.hidden_size)
        deadline = time.monotonic() + 5
        while watch.conn is None and time.monotonic() < deadline:
            time.sleep(0.01)
        after_hello = watch.unread()
        for _ in range(300):
            remote.submit("lm_head", None, x).result()
        after_calls = watch.unread()
        t0 = time.monotonic()
        time.sleep(4.5)                                        # two heartbeats either way
        idle = watch.unread() - after_calls
        assert after_hello < 1024 and after_calls == after_hello, (after_hello, after_calls)
        assert 0 <= idle <= HEARTBEAT_BYTES_PER_S * (time.monotonic() - t0) / 2, idle
        assert watch.violation is None and not watch.lost
    finally:
        remote.close()
        server.close()


def test_one_message_of_a_thousand_frames_over_ipc_is_cut_at_the_bound():
    """Over ipc the runner's relay counts what it takes from the server (relay.py): cut strictly at the bound."""
    remote, grown, server = attack_while_idle(short_endpoint("mf"), curve=False)
    try:
        assert_cut(remote, grown, slack=16 * MiB)
    finally:
        remote.close()
        server.close()


class Named:
    """Stands in for the receive watch the relay reports to."""
    violation = None

    def name(self, why: str) -> None:
        self.violation = why

    def new_connection(self) -> None:
        pass

    def over(self, taken: int) -> bool:
        return False


def test_the_ipc_relay_refuses_another_users_server_by_the_kernels_word(other_user):
    """SO_PEERCRED at the relay (which now stands where libzmq's per-message Peer-Address check stood): the
    other user's real `tsqp serve`, reached past the file system by root; nothing it sends reaches libzmq."""
    import signal
    import shutil

    from conftest import wait_line
    from tsqp.wire.relay import Relay
    d = their_dir(other_user)
    endpoint = f"ipc://{d}/s.ipc"
    server = as_user(other_user, "serve", "--model", "random:tiny", "--device", "cpu", "--endpoint", endpoint)
    relay = dealer = None
    try:
        wait_line(server, "ready in", timeout_s=60)
        relay, named = Relay(endpoint), Named()
        relay.watch = named
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(relay.endpoint)
        dealer.send(P.encode({"type": "hello"}))
        assert not dealer.poll(1500), "a reply came through the relay from another user's server"
        assert named.violation is not None and f"runs as uid {other_user.pw_uid}" in named.violation and \
            f"not as this user (uid {os.getuid()})" in named.violation, named.violation
    finally:
        if dealer is not None:
            dealer.close(linger=0)
        if relay is not None:
            relay.stop()
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
        shutil.rmtree(d, ignore_errors=True)
