"""Network-namespace test beds: hosts in their own namespaces joined by veth pairs.

Used by the test suite and by ``vtl demo``. Only the standard library and the
``ip`` command (iproute2) are used, so this module also works outside the
project's virtualenv (``python3 -m vtl.testbed cleanup``).

Typical use::

    with NetnsPair() as pair:
        pair.b.popen(["iperf3", "-s", "-1"])
        pair.a.run(["ping", "-c1", "-W2", pair.b.ip4])

Every namespace is named ``<prefix><tag>-<role>`` (default prefix ``vtlt-``,
e.g. ``vtlt-3fa2c1-a``). Before a namespace is created, the creating process
records its PID and start time in ``/run/vtl-testbed/<prefix><tag>.owner``;
:func:`cleanup_stale` deletes namespaces whose owner is gone. A test bed is
also torn down by ``with``-exit, by an ``atexit`` hook and on SIGTERM/SIGHUP.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "DEFAULT_PREFIX",
    "STATE_DIR",
    "Host",
    "NetnsPair",
    "Testbed",
    "TestbedError",
    "cleanup_stale",
    "list_netns",
    "netns_unavailable_reason",
]

DEFAULT_PREFIX = "vtlt-"
STATE_DIR = Path("/run/vtl-testbed")
NETNS_DIR = Path("/run/netns")
IP = "ip"

_ROLE_RE = re.compile(r"^[a-z0-9]{1,6}$")
_sysrand = random.SystemRandom()  # unaffected by tests that seed `random`


class TestbedError(RuntimeError):
    """A test-bed operation failed; the message includes the command and its stderr."""

    __test__ = False  # not a pytest test class

    def __init__(self, message: str, result: subprocess.CompletedProcess[Any] | None = None):
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- helpers


def _argv(args: str | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(args, str):
        return shlex.split(args)
    return [os.fspath(a) for a in args]


def _fmt_failure(cmd: Sequence[str], cp: subprocess.CompletedProcess[Any]) -> str:
    def text(x: Any) -> str:
        if x is None:
            return ""
        if isinstance(x, bytes):
            x = x.decode(errors="replace")
        return str(x).strip()

    msg = f"command failed (exit {cp.returncode}): {shlex.join(cmd)}"
    err, out = text(cp.stderr), text(cp.stdout)
    if err:
        msg += f"\nstderr: {err}"
    if out:
        msg += f"\nstdout: {out[-2000:]}"
    return msg


def _run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a management command (``ip ...``), raising TestbedError on failure."""
    cmd = list(cmd)
    try:
        cp = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise TestbedError(
            f"{cmd[0]!r} not found: install it (bash scripts/setup.sh installs everything)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"command timed out after {timeout}s: {shlex.join(cmd)}") from exc
    if check and cp.returncode != 0:
        raise TestbedError(_fmt_failure(cmd, cp), cp)
    return cp


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    cp = _run([IP, "netns", "list"])
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _proc_start_time(pid: int) -> str | None:
    """Start time of a process (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # zombies do not count as alive
        return None
    return fields[19]


def _owner_file(base: str, state_dir: Path = STATE_DIR) -> Path:
    return state_dir / f"{base}.owner"


def _owner_alive(base: str, state_dir: Path = STATE_DIR) -> bool:
    try:
        info = json.loads(_owner_file(base, state_dir).read_text())
        pid, start = int(info["pid"]), str(info["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _proc_start_time(pid) == start


def _netns_pids(name: str) -> list[int]:
    cp = _run([IP, "netns", "pids", name], check=False)
    if cp.returncode != 0:
        return []
    return [int(tok) for tok in cp.stdout.split() if tok.isdigit()]


def _kill_netns_processes(name: str, *, rounds: int = 5) -> None:
    """SIGKILL every process still inside namespace `name` (never ourselves)."""
    me = os.getpid()
    for _ in range(rounds):
        pids = [p for p in _netns_pids(name) if p != me]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete_netns(name: str) -> str | None:
    """Kill what runs in `name` and delete it; return an error message or None."""
    if not _netns_exists(name):
        return None
    _kill_netns_processes(name)
    cp = _run([IP, "netns", "delete", name], check=False)
    if cp.returncode != 0 and _netns_exists(name):
        return _fmt_failure([IP, "netns", "delete", name], cp)
    return None


# --------------------------------------------------------------------------- registry

_live: set[Testbed] = set()
_live_lock = threading.RLock()
_handlers_installed = False
_prev_handlers: dict[int, Any] = {}


def _cleanup_all() -> None:
    with _live_lock:
        beds = list(_live)
    for bed in beds:
        with contextlib.suppress(Exception):
            bed.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    # Default disposition: die from the same signal, as if we were never here.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    for signum in (signal.SIGTERM, signal.SIGHUP):
        prev = signal.getsignal(signum)
        if prev is signal.SIG_IGN or prev is None:
            continue  # ignored or set from C: leave it alone
        _prev_handlers[signum] = prev
        signal.signal(signum, _on_signal)


# --------------------------------------------------------------------------- hosts


class Host:
    """One network namespace of a test bed."""

    def __init__(self, testbed: Testbed, name: str, role: str):
        self.testbed = testbed
        self.name = name
        self.role = role
        self.ifname: str | None = None  # main interface (set by the topology)
        self.ip4: str | None = None
        self.ip6: str | None = None
        self.prefixlen4 = 24
        self.prefixlen6 = 64
        self.peer: Host | None = None

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ifname={self.ifname!r}, ip4={self.ip4!r}, ip6={self.ip6!r})"

    @property
    def exec_prefix(self) -> list[str]:
        """Argv prefix that runs a command inside this namespace."""
        return [IP, "netns", "exec", self.name]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n NAME ARGS...`` (raises TestbedError on failure if `check`)."""
        return _run([IP, "-n", self.name, *args], check=check)

    def run(
        self,
        args: str | Sequence[str | os.PathLike[str]],
        *,
        check: bool = True,
        **kw: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the namespace and wait for it.

        Defaults differ from :func:`subprocess.run`: output is captured as
        text, stdin is /dev/null, and a non-zero exit raises TestbedError
        (pass ``check=False`` to get the CompletedProcess regardless).
        """
        cmd = self.exec_prefix + _argv(args)
        if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
            kw["capture_output"] = True
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        if not any(k in kw for k in ("text", "universal_newlines", "encoding", "errors")):
            kw["text"] = True
        try:
            cp = subprocess.run(cmd, check=False, **kw)
        except subprocess.TimeoutExpired as exc:
            raise TestbedError(
                f"command timed out after {exc.timeout}s in {self.name}: {shlex.join(cmd)}"
            ) from exc
        if check and cp.returncode != 0:
            raise TestbedError(_fmt_failure(cmd, cp), cp)
        return cp

    def popen(self, args: str | Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen:
        """Start a command inside the namespace; it is stopped when the test bed closes.

        By default it gets its own session (process group), so that closing
        the test bed also stops its children, and stdin is /dev/null.
        """
        return self.testbed._popen(self, _argv(args), **kw)


# --------------------------------------------------------------------------- test beds


class Testbed:
    """A set of namespaces (hosts) and veth links with guaranteed cleanup.

    Subclasses build a topology in :meth:`build`; use as a context manager.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, *, prefix: str = DEFAULT_PREFIX, kill_timeout: float = 3.0):
        if not prefix or "/" in prefix:
            raise ValueError(f"bad namespace prefix {prefix!r}")
        self.prefix = prefix
        self.tag = secrets.token_hex(3)
        self.base = f"{prefix}{self.tag}"
        self.kill_timeout = kill_timeout
        self.hosts: dict[str, Host] = {}
        self._procs: list[tuple[subprocess.Popen, bool]] = []
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()
        self._started = False
        self._closed = False

    # -- lifecycle

    def __enter__(self) -> Testbed:
        self.start()
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        errors = self.close()
        if errors:
            msg = "test bed cleanup failed:\n" + "\n".join(errors)
            if exc_type is None:
                raise TestbedError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def start(self) -> None:
        """Register for cleanup and record the owner (before creating anything)."""
        if self._started:
            return
        self._started = True
        with _live_lock:
            _install_handlers()
            _live.add(self)
        try:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            start = _proc_start_time(os.getpid())
            _owner_file(self.base).write_text(json.dumps({"pid": os.getpid(), "start": start}))
        except OSError as exc:
            self.close()
            raise TestbedError(f"cannot write owner file under {STATE_DIR}: {exc}") from exc

    def build(self) -> None:
        """Create the topology (override in subclasses)."""

    def close(self) -> list[str]:
        """Stop started processes and delete all namespaces. Idempotent.

        Returns the list of errors (also usable directly, without ``with``).
        """
        with self._lock:
            if self._closed or os.getpid() != self._owner_pid:
                return []  # already closed, or a forked child: the parent cleans up
            self._closed = True
            procs = list(self._procs)
            self._procs.clear()
        self._stop_processes(procs)
        errors = []
        for host in reversed(list(self.hosts.values())):
            err = _delete_netns(host.name)
            if err:
                errors.append(err)
        with contextlib.suppress(OSError):
            _owner_file(self.base).unlink()
        with _live_lock:
            _live.discard(self)
        return errors

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts.values()]

    # -- building blocks

    def add_host(self, role: str) -> Host:
        """Create namespace ``<base>-<role>`` with loopback up."""
        if not _ROLE_RE.match(role):
            raise ValueError(f"role must match {_ROLE_RE.pattern}: {role!r}")
        if role in self.hosts:
            raise ValueError(f"duplicate role {role!r}")
        self._check_open()
        host = Host(self, f"{self.base}-{role}", role)
        self.hosts[role] = host  # registered first, so a failure below is cleaned up
        _run([IP, "netns", "add", host.name])
        host.ip("link", "set", "lo", "up")
        return host

    def add_link(
        self, h1: Host, h2: Host, if1: str | None = None, if2: str | None = None
    ) -> tuple[str, str]:
        """Create a veth pair with one end in each host (both ends still down)."""
        self._check_open()
        if1 = if1 or f"v{self.tag}{h1.role}"
        if2 = if2 or f"v{self.tag}{h2.role}"
        for ifn in (if1, if2):
            if len(ifn) > 15:
                raise ValueError(f"interface name too long (max 15): {ifn!r}")
        _run(
            [IP, "link", "add", if1, "netns", h1.name, "type", "veth",
             "peer", "name", if2, "netns", h2.name]
        )  # fmt: skip
        return if1, if2

    def wait_link_up(self, host: Host, ifname: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        state = "?"
        while True:
            cp = host.ip("-j", "link", "show", "dev", ifname)
            with contextlib.suppress(ValueError, IndexError, KeyError):
                state = json.loads(cp.stdout)[0]["operstate"]
            if state == "UP":
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"{ifname} in {host.name} not up after {timeout}s: {state}")
            time.sleep(0.02)

    # -- processes

    def _check_open(self) -> None:
        if self._closed:
            raise TestbedError(f"test bed {self.base} is closed")
        if not self._started:
            raise TestbedError(f"test bed {self.base} not started (use it with `with`)")

    def _popen(self, host: Host, argv: list[str], **kw: Any) -> subprocess.Popen:
        self._check_open()
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        own_group = bool(kw["start_new_session"])
        with self._lock:
            self._check_open()
            proc = subprocess.Popen(host.exec_prefix + argv, **kw)
            self._procs.append((proc, own_group))
        return proc

    def _stop_processes(self, procs: Iterable[tuple[subprocess.Popen, bool]]) -> None:
        procs = list(procs)

        def signal_all(sig: int) -> None:
            for proc, own_group in procs:
                if proc.poll() is not None:
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if own_group:
                        os.killpg(proc.pid, sig)
                    else:
                        proc.send_signal(sig)

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_timeout
        for proc, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        signal_all(signal.SIGKILL)
        for proc, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


class NetnsPair(Testbed):
    """Two hosts ``a`` and ``b`` joined by one veth pair.

    Addresses: ``10.77.X.1/24`` and ``fd77:X::1/64`` on ``a``, ``.2`` / ``::2``
    on ``b``, with X random in 1..250 unless `subnet` is given (IPv6 with
    ``nodad``, so usable at once). With `disable_offloads`, TSO, GSO and GRO
    (and UDP segmentation) are turned off on both ends (``ethtool -K``), as emulated
    links need.
    """

    def __init__(
        self,
        *,
        disable_offloads: bool = False,
        subnet: int | None = None,
        mtu: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        kill_timeout: float = 3.0,
    ):
        super().__init__(prefix=prefix, kill_timeout=kill_timeout)
        if subnet is not None and not 1 <= subnet <= 250:
            raise ValueError("subnet must be in 1..250")
        self.subnet = subnet if subnet is not None else _sysrand.randint(1, 250)
        self.disable_offloads = disable_offloads
        self.mtu = mtu
        self.a: Host
        self.b: Host

    def __enter__(self) -> NetnsPair:
        super().__enter__()
        return self

    def build(self) -> None:
        x = self.subnet
        self.a = a = self.add_host("a")
        self.b = b = self.add_host("b")
        if_a, if_b = self.add_link(a, b)
        a.peer, b.peer = b, a
        for host, ifname, n in ((a, if_a, 1), (b, if_b, 2)):
            host.ifname = ifname
            host.ip4 = f"10.77.{x}.{n}"
            host.ip6 = f"fd77:{x}::{n}"
            host.ip("addr", "add", f"{host.ip4}/24", "dev", ifname)
            host.ip("-6", "addr", "add", f"{host.ip6}/64", "dev", ifname, "nodad")
            if self.mtu:
                host.ip("link", "set", "dev", ifname, "mtu", str(self.mtu))
            if self.disable_offloads:
                # tx-udp-segmentation too: else a UDP GSO batch crosses the veth as
                # one skb and an ingress loss rule drops up to 64 datagrams at once
                host.run(["ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
                          "tx-udp-segmentation", "off"])  # fmt: skip
            host.ip("link", "set", "dev", ifname, "up")
        for host in (a, b):
            assert host.ifname is not None
            self.wait_link_up(host, host.ifname)


# --------------------------------------------------------------------------- stale cleanup


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, state_dir: Path = STATE_DIR) -> list[str]:
    """Delete namespaces named ``<prefix>...`` whose creating process is gone.

    Processes still running inside them are killed first. Namespaces of live
    test beds (this process's or another's) are kept. Returns the deleted names.
    """
    removed: list[str] = []
    errors: list[str] = []
    live_bases: set[str] = set()
    for name in list_netns():
        if not name.startswith(prefix):
            continue
        base = name.rsplit("-", 1)[0]
        if _owner_alive(base, state_dir):
            live_bases.add(base)
            continue
        err = _delete_netns(name)
        if err:
            errors.append(err)
        else:
            removed.append(name)
    # Owner files whose process is gone and whose namespaces are all deleted.
    if state_dir.is_dir():
        for f in state_dir.glob(f"{prefix}*.owner"):
            base = f.name[: -len(".owner")]
            if base not in live_bases and not _owner_alive(base, state_dir):
                with contextlib.suppress(OSError):
                    f.unlink()
        # Per-test-bed directories (``<base>.d``: emulator control sockets, logs).
        for d in state_dir.glob(f"{prefix}*.d"):
            base = d.name[: -len(".d")]
            if d.is_dir() and base not in live_bases and not _owner_alive(base, state_dir):
                shutil.rmtree(d, ignore_errors=True)
    if errors:
        raise TestbedError("could not delete stale namespaces:\n" + "\n".join(errors))
    return removed


def netns_unavailable_reason() -> str | None:
    """Why network-namespace test beds cannot be used here, or None if they can.

    Actually creates and deletes a small NetnsPair.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces and veth)"
    try:
        with NetnsPair():
            pass
    except (TestbedError, OSError) as exc:
        return f"cannot create a network-namespace pair: {exc}"
    return None


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vtl.testbed", description="VTL network-namespace test beds"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_clean = sub.add_parser("cleanup", help="delete stale test namespaces")
    p_clean.add_argument("--prefix", default=DEFAULT_PREFIX)
    p_list = sub.add_parser("list", help="list test namespaces and whether their owner lives")
    p_list.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "cleanup":
            removed = cleanup_stale(args.prefix)
            if removed:
                print(f"removed stale namespaces: {' '.join(removed)}")
        else:
            for name in list_netns():
                if name.startswith(args.prefix):
                    alive = _owner_alive(name.rsplit("-", 1)[0])
                    print(f"{name}\t{'live' if alive else 'stale'}")
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
