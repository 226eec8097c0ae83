"""Keep a topology up in the background for ``vtl testbed up`` / ``down``.

``start()`` spawns ``python -m vtl.testbed.supervisor --name NAME FILE``: a
detached process that builds the topology (namespaces ``vtl-NAME-<host>``),
writes its state to ``/run/vtl-testbed/NAME.json`` and then sleeps until it
gets SIGTERM, when it tears everything down and removes the state file. The
supervisor owns the namespaces: if it is SIGKILLed, ``cleanup_stale("vtl-")``
(run by ``vtl testbed down`` and ``vtl testbed cleanup``) removes what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vtl.testbed.netns import STATE_DIR, TestbedError, _proc_start_time, cleanup_stale, list_netns
from vtl.testbed.topology import Topology, python_env

__all__ = [
    "CLI_PREFIX",
    "DEFAULT_NAME",
    "is_alive",
    "read_state",
    "running",
    "start",
    "state_path",
    "stop",
]

CLI_PREFIX = "vtl-"
DEFAULT_NAME = "default"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,23}$")


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"topology name must match {NAME_RE.pattern}: {name!r}")
    return name


def state_path(name: str) -> Path:
    return STATE_DIR / f"{_check_name(name)}.json"


def log_path(name: str) -> Path:
    return STATE_DIR / f"{_check_name(name)}.log"


def is_alive(state: dict[str, Any]) -> bool:
    """Is the supervisor that wrote `state` still running?"""
    return _proc_start_time(int(state["pid"])) == state.get("start")


def read_state(name: str) -> dict[str, Any]:
    """The state of running topology `name` (TestbedError if it is not running)."""
    path = state_path(name)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise TestbedError(
            f"no topology named {name!r} is up (no {path}); start one with "
            "`vtl testbed up TOPO.toml" + ("" if name == DEFAULT_NAME else f" --name {name}") + "`"
        ) from None
    except (OSError, ValueError) as exc:
        raise TestbedError(f"cannot read {path}: {exc}") from exc
    if not is_alive(state):
        raise TestbedError(
            f"topology {name!r} is not running any more (its supervisor, pid {state['pid']}, "
            f"is gone): run `vtl testbed down --name {name}` to clean up"
        )
    return state


def running() -> list[dict[str, Any]]:
    """States of all topologies whose supervisor is alive."""
    out = []
    if STATE_DIR.is_dir():
        for f in sorted(STATE_DIR.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                st = json.loads(f.read_text())
                if st.get("kind") == "vtl-testbed" and is_alive(st):
                    out.append(st)
    return out


def start(
    topology_file: str | os.PathLike[str],
    name: str = DEFAULT_NAME,
    *,
    seed: int | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Bring a topology up under a background supervisor; return its state once ready."""
    _check_name(name)
    path = Path(topology_file).resolve()
    Topology.from_toml(path)  # fail here, with a clear message, on a bad file
    spath = state_path(name)
    if spath.exists():
        try:
            read_state(name)
        except TestbedError:
            stop(name)  # a dead one: clean it up first
        else:
            raise TestbedError(
                f"topology {name!r} is already up (`vtl testbed down --name {name}`)"
            )
    cleanup_stale(CLI_PREFIX)
    if any(ns.startswith(f"{CLI_PREFIX}{name}-") for ns in list_netns()):
        raise TestbedError(f"namespaces {CLI_PREFIX}{name}-* exist and are in use")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "vtl.testbed.supervisor", "--name", name, str(path)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    with open(log_path(name), "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=python_env(),
        )
    deadline = time.monotonic() + timeout
    while True:
        if spath.exists():
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(spath.read_text())
                if state.get("pid") == proc.pid:
                    return state
        if proc.poll() is not None:
            raise TestbedError(
                f"the topology did not come up (supervisor exit {proc.returncode}):\n"
                + _log_tail(name)
            )
        if time.monotonic() > deadline:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            raise TestbedError(f"the topology was not up after {timeout}s:\n" + _log_tail(name))
        time.sleep(0.05)


def _log_tail(name: str) -> str:
    """The end of the supervisor's log (which is then removed: it was a failed start)."""
    try:
        text = log_path(name).read_text(errors="replace")[-3000:].strip() or "(empty log)"
    except OSError:
        return "(no log)"
    with contextlib.suppress(OSError):
        log_path(name).unlink()
    return text


def stop(name: str = DEFAULT_NAME, timeout: float = 20.0) -> bool:
    """Tear topology `name` down; True if something was running or left over."""
    spath = state_path(name)
    found = False
    try:
        state = json.loads(spath.read_text())
    except (OSError, ValueError):
        state = None
    if state is not None:
        found = True
        pid = int(state["pid"])
        if is_alive(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while is_alive(state) and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_alive(state):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while is_alive(state) and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
    removed = cleanup_stale(CLI_PREFIX)  # whatever a killed supervisor left behind
    found = found or any(ns.startswith(f"{CLI_PREFIX}{name}-") for ns in removed)
    for f in (spath, log_path(name)):
        with contextlib.suppress(OSError):
            f.unlink()
    return found


def _supervise(name: str, topology_file: str, seed: int | None) -> int:
    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    topo = Topology.from_toml(topology_file)
    spath = state_path(name)
    net = None
    try:
        net = topo.up(prefix=CLI_PREFIX, name=name, seed=seed)
        state = {
            "kind": "vtl-testbed",
            "name": name,
            "pid": os.getpid(),
            "start": _proc_start_time(os.getpid()),
            "topology_file": topology_file,
            "created": time.time(),
            "log": str(log_path(name)),
            **net.describe(),
        }
        tmp = spath.with_name(f".{spath.name}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, spath)
        print(f"topology {name!r} up: hosts {', '.join(net.hosts)}", flush=True)
        while True:
            time.sleep(1.0)
            for link, proc in net._emulators.items():
                if proc.poll() is not None:
                    print(f"emulator of link {link!r} exited ({proc.returncode})", flush=True)
                    net._emulators.pop(link)
                    break
    finally:
        if net is not None:
            net.close()
        with contextlib.suppress(OSError):
            if json.loads(spath.read_text()).get("pid") == os.getpid():
                spath.unlink()
        print(f"topology {name!r} down", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtl.testbed.supervisor")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--seed", type=int)
    p.add_argument("topology")
    args = p.parse_args(argv)
    return _supervise(args.name, args.topology, args.seed)


if __name__ == "__main__":
    sys.exit(main())
