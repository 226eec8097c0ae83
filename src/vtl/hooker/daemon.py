"""The Hooker daemon: one per host (network namespace).

It ties the kernel side (:mod:`vtl.hooker.kernel`, optionally
:mod:`vtl.hooker.xdp`) to the user-space flow engine
(:mod:`vtl.hooker.engine`) and a carrier:

* a TCP listener on ``listen_ip:listen_port`` receives the application
  connections that ``vtl_connect4`` redirected; the original destination
  comes from the ``vtl_flows`` map, the composition from the rule that
  matched;
* the carrier listens on ``carrier_port`` for flows from other Hookers and
  hands them to the engine, which connects to the local server after
  recording the real client address for ``vtl_getpeername4``;
* the peer cache is mirrored into ``vtl_peers``, so once a host is known to
  run no VTL, connect()s to it are not even redirected;
* a unix control socket answers ``status``, ``stop`` and cgroup rules
  (``vtl hooker status|stop``, ``vtl run``).

Stopping (``stop``, SIGTERM, SIGINT) disables redirection first, lets the
running flows end for a grace period, then detaches every program.  If the
process is killed instead, the bpf_links go with it (fail-open) and the
Hooker's sockets reset the applications' connections (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtl.hooker.carriers import get_carrier
from vtl.hooker.engine import FlowEngine
from vtl.hooker.flowheader import FlowHeader
from vtl.hooker.kernel import PEER_CAPABLE, PEER_INCAPABLE, HookerKernel, netns_cookie
from vtl.hooker.peers import PeerCache, PeerState

log = logging.getLogger("vtl.hooker")

DEFAULT_LISTEN_PORT = 7300
DEFAULT_CARRIER_PORT = 7400
CONTROL_DIR = Path("/run/vtl")


def default_control_path() -> Path:
    """Per network namespace, since /run is shared by ``ip netns exec``."""
    return CONTROL_DIR / f"hooker-ns{netns_cookie()}.sock"


def primary_ipv4() -> str:
    """The address applications here use for other hosts: the default
    route's source, else the first global IPv4 address."""
    cp = subprocess.run(
        ["ip", "-j", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True
    )
    if cp.returncode == 0:
        with contextlib.suppress(ValueError, IndexError, KeyError):
            return str(json.loads(cp.stdout)[0]["prefsrc"])
    cp = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    with contextlib.suppress(ValueError):
        for link in json.loads(cp.stdout or "[]"):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    return str(a["local"])
    raise RuntimeError("no global IPv4 address on this host: give --listen-ip")


@dataclass
class Rule:
    """Hook connect()s to a destination port or prefix, or from a cgroup,
    and carry them with ``composition`` (None: the carrier's default)."""

    port: int | None = None
    prefix: str | None = None
    cgroup: int | None = None
    composition: str | None = None

    def describe(self) -> str:
        what = (
            f"port {self.port}"
            if self.port is not None
            else f"prefix {self.prefix}"
            if self.prefix is not None
            else f"cgroup {self.cgroup}"
        )
        return what + (f" -> {self.composition}" if self.composition else "")


@dataclass
class HookerConfig:
    rules: list[Rule] = field(default_factory=list)
    listen_ip: str | None = None
    listen_port: int = DEFAULT_LISTEN_PORT
    carrier: str = "vtl"
    carrier_port: int = DEFAULT_CARRIER_PORT
    composition: str | None = None
    cgroup: str | None = None
    control: str | None = None
    xdp: list[str] = field(default_factory=list)
    probe_timeout: float = 1.0
    incapable_ttl: float = 60.0
    splice_budget: int | None = None
    stop_grace: float = 5.0


_inbound_names: contextvars.ContextVar[list[tuple[str, int]]] = contextvars.ContextVar("names")


class _KernelEngine(FlowEngine):
    """The engine with the daemon's one kernel duty on the server side."""

    kernel: HookerKernel | None = None

    def before_connect(self, sock: socket.socket, header: FlowHeader) -> Any:
        if self.kernel is None or sock.family != socket.AF_INET:
            return None
        src = sock.getsockname()[:2]
        self.kernel.add_peer_name(src, (header.client[0], int(header.client[1])))
        with contextlib.suppress(LookupError):
            _inbound_names.get().append(src)
        return None


class _ObserverFanOut:
    """One endpoint, several XDP filters: tell each about connection IDs."""

    def __init__(self, observers: list[Any]):
        self.observers = observers

    def added(self, cid: int) -> None:
        for o in self.observers:
            o.added(cid)

    def removed(self, cid: int) -> None:
        for o in self.observers:
            o.removed(cid)


class Hooker:
    """The daemon (asyncio).  ``await start()``, then ``await serve()``."""

    def __init__(self, config: HookerConfig):
        self.config = config
        self.listen_ip = config.listen_ip or primary_ipv4()
        self.kernel: HookerKernel | None = None
        self.xdp: Any = None
        self.carrier: Any = None
        self.engine: _KernelEngine | None = None
        self.counters: Counter[str] = Counter()
        self.control_path = Path(config.control) if config.control else default_control_path()
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._stopped = asyncio.Event()
        self._stopping = False
        self._rules: dict[int, Rule] = {}
        self._started = 0.0
        self._xdp_observers: list[Any] = []
        self._accept_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        cfg = self.config
        try:
            carrier_opts: dict[str, Any] = {}
            if cfg.composition:
                carrier_opts["composition"] = cfg.composition
            self.carrier = get_carrier(cfg.carrier, **carrier_opts)
            peers = PeerCache(incapable_ttl=cfg.incapable_ttl)
            self.engine = _KernelEngine(
                self.carrier, peers, carrier_port=cfg.carrier_port, probe_timeout=cfg.probe_timeout
            )
            await self.carrier.listen("0.0.0.0", cfg.carrier_port, self._inbound)
            self._listener = self._listen_tcp()
            kw: dict[str, Any] = {"cgroup": cfg.cgroup}
            if cfg.splice_budget is not None:
                kw["splice_budget"] = cfg.splice_budget
            self.kernel = HookerKernel((self.listen_ip, cfg.listen_port), **kw)
            self.engine.kernel = self.kernel
            peers.on_change(self._peer_changed)
            for rule in cfg.rules:
                self.add_rule(rule)
            if cfg.xdp:
                self._start_xdp(cfg.xdp)
            await self._serve_control()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._started = time.time()
        loop = asyncio.get_running_loop()
        self._accept_task = loop.create_task(self._accept_loop())
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))

    def _listen_tcp(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.listen_ip, self.config.listen_port))
        s.listen(4096)
        s.setblocking(False)
        return s

    def _start_xdp(self, interfaces: list[str]) -> None:
        """Filter VTL datagrams on these interfaces, with the carrier's
        connection IDs kept in the filters' maps (VTL carrier only)."""
        from vtl.hooker.xdp import ConnectionIdObserver, XdpFilter

        endpoint = getattr(self.carrier, "endpoint", None)
        if endpoint is None:
            raise RuntimeError("--xdp needs the vtl carrier (it checks VTL connection IDs)")
        self.xdp = []
        for ifname in interfaces:
            self.xdp.append(XdpFilter(ifname))
        observers = [
            ConnectionIdObserver(f).attach(endpoint.core, self.config.carrier_port)
            for f in self.xdp
        ]
        if len(observers) > 1:
            endpoint.core.cid_observer = _ObserverFanOut(observers)
        self._xdp_observers = observers

    def add_rule(self, rule: Rule) -> int:
        """Install a rule in the kernel maps; returns its number."""
        assert self.kernel is not None
        rid = max(self._rules, default=0) + 1
        self._rules[rid] = rule
        if rule.port is not None:
            self.kernel.hook_port(rule.port, rid)
        elif rule.prefix is not None:
            self.kernel.hook_prefix(rule.prefix, rid)
        elif rule.cgroup is not None:
            self.kernel.hook_cgroup(rule.cgroup, rid)
        else:
            del self._rules[rid]
            raise ValueError("a rule needs a port, a prefix or a cgroup")
        return rid

    def remove_rule(self, *, port: int | None = None, prefix: str | None = None,
                    cgroup: int | None = None) -> bool:  # fmt: skip
        """Remove the rule for this port, prefix or cgroup (new connect()s
        stop being hooked; flows already carried go on)."""
        for rid, rule in list(self._rules.items()):
            if (port is not None and rule.port == port) or (
                cgroup is not None and rule.cgroup == cgroup
            ) or prefix is not None and rule.prefix is not None and _same_net(rule.prefix, prefix):
                pass
            else:
                continue
            del self._rules[rid]
            if self.kernel is not None:
                if rule.port is not None:
                    self.kernel.unhook_port(rule.port)
                elif rule.prefix is not None:
                    self.kernel.unhook_prefix(rule.prefix)
                elif rule.cgroup is not None:
                    self.kernel.unhook_cgroup(rule.cgroup)
            return True
        return False

    def _peer_changed(self, peer: Any, old: PeerState, new: PeerState) -> None:
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        if self.kernel is None or ":" in host:
            return
        state = {PeerState.CAPABLE: PEER_CAPABLE, PeerState.INCAPABLE: PEER_INCAPABLE}.get(new)
        try:
            self.kernel.set_peer(host, state)
        except OSError as exc:
            log.warning("cannot mirror peer %s into the kernel: %s", host, exc)

    # ------------------------------------------------------------ flows

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while not self._stopping:
            try:
                sock, addr = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                return
            except OSError as exc:
                if self._stopping:
                    return
                self.counters["accept_errors"] += 1
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            self._spawn(self._outbound(sock, addr[:2]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _outbound(self, sock: socket.socket, app: tuple[str, int]) -> None:
        assert self.kernel is not None and self.engine is not None
        try:
            orig = self.kernel.take_flow(app)
        except OSError as exc:
            orig = None
            log.warning("flow lookup for %s failed: %s", app, exc)
        if orig is None:
            # Not a redirected connection (someone dialled the listener).
            self.counters["accepted_unhooked"] += 1
            sock.close()
            return
        self.counters["accepted_hooked"] += 1
        rule = self._rules.get(orig.rule)
        comp = rule.composition if rule is not None else None
        await self.engine.handle_outbound(sock, app, (orig.ip, orig.port), composition=comp)

    async def _inbound(self, stream: Any, peer: Any) -> None:
        assert self.engine is not None
        names: list[tuple[str, int]] = []
        _inbound_names.set(names)
        try:
            await self.engine.handle_inbound(stream, peer)
        finally:
            if self.kernel is not None:
                for src in names:
                    self.kernel.remove_peer_name(src)

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._started, 1) if self._started else 0,
            "listen": f"{self.listen_ip}:{self.config.listen_port}",
            "carrier": self.config.carrier,
            "carrier_port": self.config.carrier_port,
            "rules": {str(rid): r.describe() for rid, r in self._rules.items()},
            "daemon": dict(self.counters),
        }
        if self.kernel is not None and self.kernel.loaded:
            out["programs"] = self.kernel.programs()
            out["policy"] = self.kernel.policy()
            out["kernel"] = self.kernel.counters()
            out["spliced_sockets"] = self.kernel.spliced_sockets()
        if self.xdp:
            for f in self.xdp:
                st = f.status()
                out.setdefault("programs", []).append(
                    {
                        "name": st["program"],
                        "type": f"xdp ({st['mode']})",
                        "id": st["program_id"],
                        "attached_to": st["interface"],
                    }
                )
            out["xdp"] = {f.ifname: f.status() for f in self.xdp}
        if self.engine is not None:
            out["engine"] = self.engine.stats()
            out["flows"] = self.engine.flows()
        if self.carrier is not None:
            out["carrier_stats"] = self.carrier.stats()
        return out

    # ----------------------------------------------------------- control

    async def _serve_control(self) -> None:
        path = self.control_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if await _control_alive(path):
                raise RuntimeError(f"another Hooker answers on {path}")
            path.unlink()
        server = await asyncio.start_unix_server(self._control_client, path=str(path))
        os.chmod(path, 0o600)
        self._servers.append(server)

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                req = json.loads(line or b"{}")
                reply = await self._control(req)
            except Exception as exc:  # a bad request must not hurt the daemon
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "stop":
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))
            return {"ok": True}
        if cmd == "hook":
            rule = Rule(
                port=_opt_int(req.get("port")),
                prefix=req.get("prefix"),
                cgroup=_opt_int(req.get("cgroup")),
                composition=req.get("composition"),
            )
            if sum(x is not None for x in (rule.port, rule.prefix, rule.cgroup)) != 1:
                return {"ok": False, "error": "give exactly one of port, prefix, cgroup"}
            if rule.port is not None and not 0 < rule.port < 65536:
                return {"ok": False, "error": f"bad port {rule.port}"}
            if rule.prefix is not None:
                ipaddress.IPv4Network(rule.prefix, strict=False)  # ValueError -> error reply
            self.remove_rule(port=rule.port, prefix=rule.prefix, cgroup=rule.cgroup)
            return {"ok": True, "rule": self.add_rule(rule)}
        if cmd == "unhook":
            found = self.remove_rule(
                port=_opt_int(req.get("port")),
                prefix=req.get("prefix"),
                cgroup=_opt_int(req.get("cgroup")),
            )
            return {"ok": found} if found else {"ok": False, "error": "no such rule"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # ------------------------------------------------------------ stop

    async def serve(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float | None = None) -> None:
        """Disable redirection, let flows finish (``grace`` s), detach all."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.stop_grace if grace is None else grace
        if self.kernel is not None:
            self.kernel.disable()
        if self._accept_task is not None:
            self._accept_task.cancel()  # before the close: it waits on the fd
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._listener is not None:
            self._listener.close()
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        for server in self._servers:
            server.close()
        with contextlib.suppress(FileNotFoundError):
            if self._servers:
                self.control_path.unlink()
        if self.carrier is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.carrier.close(), 3)
        for obs in self._xdp_observers:
            obs.detach()
        if self.xdp:
            for f in self.xdp:
                f.close()
        if self.kernel is not None:
            self.kernel.close()
        self._stopped.set()


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _same_net(a: str, b: str) -> bool:
    return ipaddress.IPv4Network(a, strict=False) == ipaddress.IPv4Network(b, strict=False)


async def _control_alive(path: Path) -> bool:
    try:
        await asyncio.wait_for(control_request(path, {"cmd": "status"}), 2)
    except Exception:
        return False
    return True


async def control_request(
    path: str | Path, req: dict[str, Any], timeout: float = 10
) -> dict[str, Any]:
    """One request to a running Hooker's control socket."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    try:
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise ConnectionError(f"the Hooker at {path} closed the control connection")
    reply: dict[str, Any] = json.loads(line)
    return reply


def control(path: str | Path | None, req: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """Blocking wrapper for the CLI."""
    p = Path(path) if path else default_control_path()
    if not p.exists():
        raise FileNotFoundError(
            f"no Hooker control socket at {p} (is `vtl hooker start` running in this namespace?)"
        )
    return asyncio.run(control_request(p, req, timeout))
