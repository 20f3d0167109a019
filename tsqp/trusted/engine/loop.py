"""The engine's thread: one per compute server. Requests arrive from any thread (`submit`); the loop opens
the offload session when there is work (and after the server failed one), checks a kept session's server
before starting on an idle engine, steps while anything is active, and closes an unused session after
`idle_s`.

A failed step ends the engine's session with the server: every request in it ends with the same error. A
verification failure (the server altered a result) is logged loudly, counted and, unless
`reconnect_after_verification_failure`, shuts this server out: every later request ends at once with
`ServerShutOut` until the runner is restarted.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..protect.freivalds import VerificationError
from .sequence import Request
from .step import Engine


class ServerShutOut(VerificationError):
    """A server caught altering a result earlier: this runner no longer uses it."""


class ShuttingDown(RuntimeError):
    pass


@dataclass
class Health:
    """What /health reports for one compute server."""
    where: str
    state: str = "idle"                  # idle | serving | shut out | unavailable
    sessions_opened: int = 0
    steps: int = 0
    rows: int = 0
    verification_failures: int = 0
    failures: list[dict] = field(default_factory=list)   # each verification failure: op, layer, session, time
    last_error: str | None = None
    pads: dict | None = None             # the protected session's pad pool figures


class EngineLoop:
    def __init__(self, open_session: Callable[[], object], make_engine: Callable[[object], Engine], where: str,
                 idle_s: float, check_s: float, reconnect_after_verification_failure: bool = False,
                 session=None):
        """open_session() -> a session with .model, .offload, .alive(timeout_s), .close(), .describe();
        make_engine(session) -> Engine; session: one opened already (the start-up check)."""
        self.open_session, self.make_engine, self.where = open_session, make_engine, where
        self.idle_s, self.check_s = idle_s, check_s
        self.reconnect = reconnect_after_verification_failure
        self.session, self.engine = session, (make_engine(session) if session is not None else None)
        self.health = Health(where, sessions_opened=int(session is not None))
        self.shut_out: ServerShutOut | None = None
        self.failed_at = 0.0                 # time.monotonic() of the last failure to reach the server
        self.inbox: list[Request] = []
        self.active = 0                      # requests submitted and not yet ended
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name=f"tsqp-engine {where}", daemon=True)
        self.thread.start()

    # ---- any thread ----------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        on_end, once = request.on_end, threading.Lock()

        def ended(reason, error):
            if not once.acquire(blocking=False):
                return                      # ended already
            with self.cond:
                self.active -= 1
            on_end(reason, error)
        request.on_end = ended
        with self.cond:
            self.active += 1
            self.inbox.append(request)
            self.cond.notify()

    def stop(self) -> None:
        """Take nothing more; running requests end at the next step with ShuttingDown."""
        with self.cond:
            self.closing = True
            self.cond.notify()

    def close(self, timeout_s: float) -> None:
        self.stop()
        self.thread.join(timeout_s)

    # ---- the engine's thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._wait()
                new, self.inbox = self.inbox, []
                if self.closing:
                    self._fail(new, ShuttingDown("tsqp api is shutting down"))
                    break
                try:
                    if new:
                        self._start(new)
                    if self.engine is not None and not self.engine.idle:
                        self._step()
                except Exception as e:      # a bug: its requests get a 500, and the thread serves on
                    traceback.print_exc(file=sys.stderr)
                    if self.engine is not None:
                        self.engine.fail_all(e)
                    self._fail(new, e)      # those not in the engine yet (a request ends once: see submit)
                    self._close_session()
        finally:
            if self.engine is not None:
                self.engine.fail_all(ShuttingDown("tsqp api is shutting down: the generation was cut"))
            self._close_session()

    def _wait(self) -> None:
        """Until there is something to do; an unused session is closed after idle_s."""
        with self.cond:
            while not self.inbox and not self.closing and (self.engine is None or self.engine.idle):
                if not self.cond.wait(self.idle_s if self.session is not None else None):
                    self._close_session()

    def _start(self, new: list[Request]) -> None:
        if self.shut_out is not None:
            self._fail(new, self.shut_out)
            return
        if self.session is not None and self.engine.idle and not self.session.alive(self.check_s):
            self._close_session()                   # a dead or restarted server: open a fresh session
        if self.session is None:
            try:
                self.session = self.open_session()
                self.engine = self.make_engine(self.session)
                self.health.sessions_opened += 1
            except Exception as e:                  # unreachable, refused: these requests get why
                self._close_session()
                self._unavailable(e)
                self._fail(new, e)
                return
        for request in new:
            try:
                self.engine.add(request)
            except ValueError as e:
                request.on_end("error", e)
        self.health.state = "serving"

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:          # the session's state is unknown: every request in it ends with e
            self._session_failed(e)
            return
        self.health.steps, self.health.rows = self.engine.steps, self.engine.rows
        if self.engine.idle:
            self.health.state = "idle"
            self.health.pads = self._pads()

    def _session_failed(self, e: Exception) -> None:
        if isinstance(e, VerificationError) and not isinstance(e, ServerShutOut):
            self._caught(e)
        else:
            self._unavailable(e)
        self.engine.fail_all(self.shut_out or e)
        self._close_session()

    def _caught(self, e: VerificationError) -> None:
        """The server altered a result: say so loudly, count it, and shut it out unless told otherwise."""
        pid = getattr(getattr(self.session.offload, "inner", None), "info", {}).get("pid")
        record = {"op": e.op, "layer": e.layer, "session": self.health.sessions_opened, "server_pid": pid,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "detail": str(e)}
        self.health.verification_failures += 1
        self.health.failures.append(record)
        running = len(self.engine.scheduler)
        then = "a fresh session is opened for the next requests (--reconnect-after-verification-failure)" \
            if self.reconnect else "this server is no longer used until tsqp api is restarted"
        print(f"{record['time']} VERIFICATION FAILED: the compute server at {self.where} (pid {pid}, session "
              f"{record['session']}) altered a result of op '{e.op}' layer {e.layer}: {e}. {running} request(s) "
              f"on it failed; {then}.", file=sys.stderr, flush=True)
        if not self.reconnect:
            self.shut_out = ServerShutOut(e.op, e.layer, f"the compute server at {self.where} was caught altering "
                                          f"a result at {record['time']} and is no longer used (restart tsqp api, "
                                          f"or pass --reconnect-after-verification-failure)")
            self.health.state = "shut out"
        self.health.last_error = str(e)

    def _unavailable(self, e: Exception) -> None:
        self.health.state, self.health.last_error = "unavailable", f"{type(e).__name__}: {e}"
        self.failed_at = time.monotonic()

    def _fail(self, requests: list[Request], error: BaseException) -> None:
        for request in requests:
            request.on_end("error", error)

    def _pads(self) -> dict | None:
        pool = getattr(self.session.offload, "pool", None) if self.session is not None else None
        return pool.stats() if pool is not None else None

    def _close_session(self) -> None:
        if self.session is not None:
            self.health.pads = self._pads()
            self.session.close()
        self.session = self.engine = None
