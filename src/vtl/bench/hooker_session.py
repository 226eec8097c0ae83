"""The Hooker daemons around one ``hooker:<composition>`` bench run.

The ``hooker`` transport runs the *unmodified* kernel-TCP bench endpoints
(:mod:`vtl.bench.tcp_runner`); what makes it a different transport is this
session: one Hooker (``python -m vtl hooker start``) in each host of the
cell, started before the run's server and stopped after the run, whatever
happened to it.

Which connections are hooked: the bench server binds port 0 and only says
which port it got once it listens, after the session has started (see
:mod:`vtl.bench.runner`), so the Hooker of host ``a`` cannot hook "the
server's port". It hooks every TCP ``connect()`` of host ``a`` to host
``b``'s address instead (``--prefix B/32``); in a bench run the only such
connection is the bench client's. Host ``b``'s Hooker needs no rule: it
receives flows from ``a``'s Hooker and connects to the local server.

Before stopping, the session reads ``vtl hooker status --json`` of both
Hookers (once their flows have ended, so the byte counters are final): the
engine's byte counters, the kernel programs' counters and the VTL carrier's
UDP endpoint counters. :meth:`HookerSession.proof` condenses them into the
evidence that the run's bytes went over VTL, which the transport adds to the
run's record (and fails the run if the Hooker carried less than the payload).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtl.bench.transports import SessionError

READY_TIMEOUT = 30.0  # s for a Hooker to load its programs and listen
STOP_TIMEOUT = 20.0  # s for `vtl hooker stop` + the daemon's exit, then SIGKILL
SETTLE_TIMEOUT = 5.0  # s for hooked flows to end before the counters are read
CLI_TIMEOUT = 15.0  # s for one `vtl hooker status|stop` command


class HookerStartError(SessionError):
    """A Hooker daemon did not come up (its own words are in the message)."""


@dataclass
class HookerProcess:
    """One ``vtl hooker start`` in one testbed host."""

    host: Any
    argv: list[str]
    proc: subprocess.Popen[str] | None = None
    control: str | None = None
    ready_line: str = ""
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        self.proc = self.host.popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(timeout) or not self.ready_line:
            self.kill()
            tail = " | ".join(list(self.output)[-5:])
            why = "exited" if self.proc.poll() is not None else f"not ready after {timeout:g} s"
            raise HookerStartError(f"Hooker in {self.host.name} {why}: {tail or 'no output'}")

    def _drain(self) -> None:
        """Read the daemon's output for its whole life (a full pipe would block it)."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip()
            self.output.append(line)
            if not self.ready_line and line.startswith("hooker ready:"):
                self.ready_line = line
                words = line.split()
                if "control" in words:
                    self.control = words[words.index("control") + 1]
                self._ready.set()
        self._ready.set()  # EOF: it will never say "ready"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``vtl hooker ARGS`` in the same host, addressed to this daemon."""
        argv = [sys.executable, "-m", "vtl", "hooker", *args]
        if self.control:
            argv += ["--control", self.control]
        return self.host.run(argv, check=False, timeout=CLI_TIMEOUT)

    def status(self) -> dict[str, Any] | None:
        try:
            cp = self.cli("status", "--json")
        except Exception:  # noqa: BLE001 -- a diagnostic: None says it failed
            return None
        if cp.returncode != 0:
            return None
        try:
            st = json.loads(cp.stdout)
        except ValueError:
            return None
        return st if isinstance(st, dict) else None

    def stop(self, timeout: float = STOP_TIMEOUT) -> str | None:
        """``vtl hooker stop``, wait for the daemon to exit, SIGKILL it if it
        does not; returns what went wrong (None: a clean stop)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None or self.proc.returncode == 0 else self._exited()
        deadline = time.monotonic() + timeout
        problem = None
        try:
            cp = self.cli("stop")
            if cp.returncode != 0:
                problem = f"`vtl hooker stop` in {self.host.name}: {cp.stderr.strip()[-300:]}"
        except Exception as exc:  # noqa: BLE001 -- fall through to the kill
            problem = f"`vtl hooker stop` in {self.host.name}: {exc}"
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            return f"Hooker in {self.host.name} killed: not stopped within {timeout:g} s"
        if problem is None and self.proc.returncode != 0:
            problem = self._exited()
        return problem

    def _exited(self) -> str:
        assert self.proc is not None
        tail = " | ".join(list(self.output)[-3:])
        return f"Hooker in {self.host.name} exited with {self.proc.returncode}: {tail}"

    def cpu_s(self) -> float | None:
        """User + system CPU seconds the daemon has used so far (its
        protocol work: the bench endpoints' own CPU does not include it)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 3)

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


@dataclass
class HookerSession:
    """The two Hookers of one run and what they said before stopping."""

    composition: str
    client: HookerProcess  # host a: hooks the client's connect()
    server: HookerProcess  # host b: delivers to the bench server
    started_s: float = 0.0
    statuses: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    cpu: dict[str, float | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def settle_and_read(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Read both statuses once no hooked flow is active (or at ``timeout``):
        the engine adds a flow's bytes to its counters when the flow ends."""
        deadline = time.monotonic() + timeout
        while True:
            self.statuses = {"a": self.client.status(), "b": self.server.status()}
            self.cpu = {"a": self.client.cpu_s(), "b": self.server.cpu_s()}
            active = [
                (st or {}).get("engine", {}).get("flows_active", 0) for st in self.statuses.values()
            ]
            if not any(active) or time.monotonic() >= deadline:
                return
            time.sleep(0.3)

    def proof(self, payload: int | None, reverse: int = 0) -> dict[str, Any]:
        """The evidence that ``payload`` bytes went from a to b (and ``reverse``
        bytes from b to a) over VTL, from the counters read before stopping."""
        out: dict[str, Any] = {
            "composition": self.composition,
            "start_s": self.started_s,
            "cpu_s": dict(self.cpu),  # of each daemon, start-up (BPF loading) included
        }
        carried = True
        for side, st in self.statuses.items():
            if st is None:
                out[side] = None
                carried = False
                continue
            eng = st.get("engine", {})
            cs = st.get("carrier_stats", {}) or {}
            out[side] = {
                "engine": {k: v for k, v in eng.items() if k != "peers"},
                "kernel": st.get("kernel", {}),
                "carrier": {k: v for k, v in cs.items() if k not in ("endpoint",)},
                "endpoint": cs.get("endpoint"),
                "rules": st.get("rules"),
            }
        a = (out.get("a") or {}).get("engine", {})
        b = (out.get("b") or {}).get("engine", {})
        ka = (out.get("a") or {}).get("kernel", {})
        out["bytes_a_to_vtl"] = a.get("bytes_to_peer_carrier", 0)
        out["bytes_vtl_to_b"] = b.get("bytes_to_app_carrier", 0)
        out["bytes_b_to_vtl"] = b.get("bytes_to_peer_carrier", 0)
        out["bytes_vtl_to_a"] = a.get("bytes_to_app_carrier", 0)
        out["bytes_fallback"] = sum(
            e.get(k, 0) for e in (a, b) for k in ("bytes_to_peer_fallback", "bytes_to_app_fallback")
        )
        out["connects_redirected"] = ka.get("connect_redirected", 0)
        ea = (out.get("a") or {}).get("endpoint") or {}
        eb = (out.get("b") or {}).get("endpoint") or {}
        # UDP payload bytes of the VTL carrier's endpoints (headers, ACKs and
        # retransmissions included): the bytes on the wire were VTL's
        out["udp_bytes_a_out"] = ea.get("bytes_out")
        out["udp_bytes_b_in"] = eb.get("bytes_in")
        out["payload"] = payload
        if payload is not None:
            carried = carried and (
                out["bytes_a_to_vtl"] >= payload
                and out["bytes_vtl_to_b"] >= payload
                and out["bytes_b_to_vtl"] >= reverse
                and out["bytes_vtl_to_a"] >= reverse
                and out["connects_redirected"] >= 1
            )
        out["carried_over_vtl"] = bool(carried and payload is not None)
        if self.errors:
            out["errors"] = list(self.errors)
        return out


def hooker_argv(composition: str, rules: list[str]) -> list[str]:
    return [sys.executable, "-m", "vtl", "hooker", "start", "-c", composition, *rules]


@contextlib.contextmanager
def hooker_daemons(a: Any, b: Any, composition: str) -> Iterator[HookerSession]:
    """Start a Hooker in host ``a`` (hooking connect()s to ``b``) and one in
    host ``b``; on the way out read their counters, stop them (``vtl hooker
    stop``, SIGKILL on timeout), also when the run failed.  Raises
    :class:`HookerStartError` (after stopping what did start) if one does
    not come up; problems when stopping go to ``session.errors``."""
    session = HookerSession(
        composition,
        HookerProcess(a, hooker_argv(composition, ["--prefix", f"{b.ip4}/32"])),
        HookerProcess(b, hooker_argv(composition, [])),
    )
    t0 = time.monotonic()
    try:
        session.server.start()
        session.client.start()
    except BaseException:
        for hp in (session.client, session.server):
            hp.kill()
        raise
    session.started_s = round(time.monotonic() - t0, 3)
    try:
        yield session
    finally:
        try:
            session.settle_and_read()
        finally:
            for hp in (session.client, session.server):
                problem = hp.stop()
                if problem:
                    session.errors.append(problem)


__all__ = ["HookerProcess", "HookerSession", "HookerStartError", "hooker_daemons"]
