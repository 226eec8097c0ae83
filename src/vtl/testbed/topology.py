"""Declarative multi-host topologies joined by emulated links.

A :class:`Topology` names hosts and links (from TOML or from code);
:meth:`Topology.up` builds it and returns a :class:`RunningTopology`::

    with Topology.pair("net2", loss=2).up() as net:
        a, b = net.hosts["a"], net.hosts["b"]
        b.popen(["iperf3", "-s", "-1"])
        a.run(["iperf3", "-c", b.ip4, "-t", "5"])
        net.set_link("a-b", delay_ms=50)          # both directions, live
        print(net.link_stats("a-b"))

Each host is a network namespace ``<prefix><tag>-<host>``. An emulated link
between X and Y gets a relay namespace ``<prefix><tag>-R<i>`` and two veth
pairs ``X:ethK <-> R:ra`` and ``R:rb <-> Y:ethM``; an emulator process in R
(:mod:`vtl.testbed.emulator`) forwards frames between ``ra`` and ``rb``, so X
and Y share one subnet. A link with no conditions (profile ``clean``) is a
direct veth pair with no emulator. Host interfaces are ``eth0``, ``eth1``...
in the order of the host's links.

TOML format::

    hosts = ["h1", "h2", "h3"]          # optional: hosts of links are added anyway

    [[link]]
    a = "h1"
    b = "h2"
    name = "h1-h2"                      # optional, default "<a>-<b>"
    profile = "net2"                    # optional: clean, net1, net2, net3, fast, cellular
    loss = 2                            # percent, each direction (with the profile)
    bursty = false                      # Gilbert-Elliott instead of independent loss
    ipv4 = "10.0.12.0/24"               # optional subnet (a gets .1, b gets .2)
    ipv6 = "fd00:12::/64"
    delay_ms = 5                        # any condition field here applies to both ways
    [link.forward]                      # a -> b (also [link.backward], [link.both])
    rate_mbps = 20

Later entries override earlier ones: profile (+ loss/bursty), then fields
at link level and ``[link.both]``, then ``[link.forward]`` / ``[link.backward]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtl.testbed import profiles as _profiles
from vtl.testbed.emulator import control as _control
from vtl.testbed.linkspec import Conditions
from vtl.testbed.netns import (
    DEFAULT_PREFIX,
    IP,
    STATE_DIR,
    Host,
    Testbed,
    TestbedError,
    _delete_netns,
    _live,
    _live_lock,
    _owner_file,
    _proc_start_time,
    _run,
)

__all__ = [
    "Conditions",
    "LinkInfo",
    "LinkSpec",
    "RunningTopology",
    "Topology",
]

HOST_RE = re.compile(r"^[a-z][a-z0-9_]{0,14}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
_LINK_KEYS = {
    "a",
    "b",
    "name",
    "profile",
    "loss",
    "bursty",
    "ipv4",
    "ipv6",
    "emulate",
    "offloads",
    "mtu",
    "forward",
    "backward",
    "both",
}
_COND_FIELDS = set(Conditions.field_names())


def _cond_fields(d: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(d) - _COND_FIELDS)
    if unknown:
        raise ValueError(
            f"{where}: unknown condition field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_COND_FIELDS))}"
        )
    out = dict(d)
    if out.get("burst") is not None:
        out["burst"] = tuple(out["burst"])
    return out


@dataclass
class LinkSpec:
    """A link of a topology: its ends, conditions per direction and addressing."""

    a: str
    b: str
    name: str
    forward: Conditions = field(default_factory=Conditions)  # a -> b
    backward: Conditions = field(default_factory=Conditions)  # b -> a
    profile: str | None = None
    loss: float = 0.0
    bursty: bool = False
    ipv4: str | None = None
    ipv6: str | None = None
    emulate: bool | None = None  # None: emulated unless both directions do nothing
    offloads: bool | None = None  # None: off on emulated links, kernel default on clean ones
    mtu: int | None = None

    @property
    def emulated(self) -> bool:
        if self.emulate is not None:
            return self.emulate
        return not (self.forward.is_null() and self.backward.is_null())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"a": self.a, "b": self.b, "name": self.name}
        for k in ("profile", "ipv4", "ipv6", "emulate", "offloads", "mtu"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.loss:
            d["loss"] = self.loss
        if self.bursty:
            d["bursty"] = True
        # The resolved conditions (profile already applied), without default values.
        for key, cond in (("forward", self.forward), ("backward", self.backward)):
            default = Conditions().to_dict()
            d[key] = {k: v for k, v in cond.to_dict().items() if v != default[k]}
        return d


class Topology:
    """Hosts and links, declared; :meth:`up` builds them."""

    def __init__(self, hosts: list[str] | None = None, links: list[LinkSpec] | None = None):
        self.hosts: list[str] = []
        self.links: list[LinkSpec] = []
        for h in hosts or ():
            self.add_host(h)
        for link in links or ():
            self._add_spec(link)

    def __repr__(self) -> str:
        return f"Topology(hosts={self.hosts!r}, links={[x.name for x in self.links]!r})"

    # -- building the description

    def add_host(self, name: str) -> str:
        if not HOST_RE.match(name or ""):
            raise ValueError(
                f"host name must match {HOST_RE.pattern} (lower case, <= 15 chars): {name!r}"
            )
        if name not in self.hosts:
            self.hosts.append(name)
        return name

    def _add_spec(self, spec: LinkSpec) -> LinkSpec:
        if spec.a == spec.b:
            raise ValueError(f"link {spec.name!r} joins {spec.a!r} to itself")
        if not NAME_RE.match(spec.name):
            raise ValueError(f"bad link name {spec.name!r} (letters, digits, _.:+- only)")
        if any(x.name == spec.name for x in self.links):
            raise ValueError(f"duplicate link name {spec.name!r}")
        self.add_host(spec.a)
        self.add_host(spec.b)
        spec.forward.validate()
        spec.backward.validate()
        if spec.emulated and spec.offloads:
            raise ValueError(
                f"link {spec.name!r}: offloads cannot be on for an emulated link (the relay "
                "needs MTU-sized frames with complete checksums: TSO/GSO/GRO and tx "
                "checksumming are turned off on its veths)"
            )
        for net, fam in ((spec.ipv4, 4), (spec.ipv6, 6)):
            if net is not None:
                n = ipaddress.ip_network(net, strict=False)
                if n.version != fam or n.num_addresses < 4:
                    raise ValueError(f"link {spec.name!r}: bad IPv{fam} subnet {net!r}")
        self.links.append(spec)
        return spec

    def add_link(
        self,
        a: str,
        b: str,
        name: str | None = None,
        *,
        profile: str | None = None,
        loss: float = 0.0,
        bursty: bool = False,
        forward: Conditions | dict[str, Any] | None = None,
        backward: Conditions | dict[str, Any] | None = None,
        both: Conditions | dict[str, Any] | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        emulate: bool | None = None,
        offloads: bool | None = None,
        mtu: int | None = None,
        **fields: Any,
    ) -> LinkSpec:
        """Add a link between hosts `a` and `b` (created if new).

        Conditions: the profile's (with `loss` percent, bursty or not), then
        `fields` and `both` for both directions, then `forward` (a->b) and
        `backward` (b->a). Dicts or Conditions are accepted; a Conditions
        given as forward/backward replaces that direction entirely.
        """
        name = name or f"{a}-{b}"
        if profile is not None:
            fwd, bwd = _profiles.get(profile, loss, bursty)
        elif loss:
            fwd, bwd = _profiles.get("clean", loss, bursty)
        else:
            fwd, bwd = Conditions(), Conditions()
        common = _cond_fields(fields, f"link {name}")
        if isinstance(both, Conditions):
            fwd = bwd = both
        elif both:
            common.update(_cond_fields(both, f"link {name} [both]"))
        if common:
            fwd, bwd = fwd.replace(**common), bwd.replace(**common)
        for key, val in (("forward", forward), ("backward", backward)):
            if val is None:
                continue
            if isinstance(val, Conditions):
                new = val
            else:
                new = (fwd if key == "forward" else bwd).replace(
                    **_cond_fields(val, f"link {name} [{key}]")
                )
            if key == "forward":
                fwd = new
            else:
                bwd = new
        spec = LinkSpec(
            a=a,
            b=b,
            name=name,
            forward=fwd,
            backward=bwd,
            profile=profile,
            loss=float(loss),
            bursty=bool(bursty),
            ipv4=ipv4,
            ipv6=ipv6,
            emulate=emulate,
            offloads=offloads,
            mtu=mtu,
        )
        return self._add_spec(spec)

    @classmethod
    def pair(
        cls, profile: str = "clean", loss: float = 0.0, bursty: bool = False, **overrides: Any
    ) -> Topology:
        """Hosts ``a`` and ``b`` joined by one link ``a-b``.

        `overrides` are condition fields for both directions (e.g.
        ``delay_ms=10``), or link options: ``emulate`` (True: run the
        emulator even with no impairment, so set_link works later),
        ``offloads``, ``mtu``, ``ipv4``, ``ipv6``, ``forward``, ``backward``.
        """
        topo = cls()
        topo.add_link("a", "b", "a-b", profile=profile, loss=loss, bursty=bursty, **overrides)
        return topo

    # -- (de)serialisation

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        unknown = sorted(set(d) - {"hosts", "link", "links", "name"})
        if unknown:
            raise ValueError(f"unknown top-level key(s) {', '.join(unknown)}")
        topo = cls(hosts=list(d.get("hosts", [])))
        for i, raw in enumerate(list(d.get("link", [])) + list(d.get("links", []))):
            raw = dict(raw)
            if "a" not in raw or "b" not in raw:
                raise ValueError(f"link #{i + 1} needs both ends: a = ..., b = ...")
            opts = {k: raw.pop(k) for k in list(raw) if k in _LINK_KEYS}
            a, b = opts.pop("a"), opts.pop("b")
            topo.add_link(a, b, **opts, **_cond_fields(raw, f"link #{i + 1} ({a}-{b})"))
        return topo

    @classmethod
    def from_toml(cls, source: str | os.PathLike[str]) -> Topology:
        """Parse TOML text, or read a ``.toml`` file (a path)."""
        text = str(source) if not isinstance(source, os.PathLike) else None
        if text is None or ("\n" not in text and "=" not in text):
            path = Path(source)
            try:
                text = path.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read topology file {str(path)!r}: {exc}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"bad topology TOML: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"hosts": list(self.hosts), "link": [x.to_dict() for x in self.links]}

    # -- running it

    def up(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        name: str | None = None,
        seed: int | None = None,
        timeout: float = 30.0,
    ) -> RunningTopology:
        """Build the namespaces, links and emulators; return once every link passes traffic.

        Namespaces are named ``<prefix><name>-<host>`` (`name` defaults to a
        random tag). Use the result as a context manager, or call ``down()``.
        `seed` makes the emulators' random choices reproducible.
        """
        net = RunningTopology(self, prefix=prefix, name=name, seed=seed)
        net.start()
        try:
            net.build()
            net.wait_ready(timeout)
        except BaseException:
            net.close()
            raise
        return net


def python_env() -> dict[str, str]:
    """Environment for ``sys.executable -m vtl...`` in a namespace: vtl importable."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])  # the directory holding vtl/
    env["PYTHONPATH"] = os.pathsep.join(
        [pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


@dataclass
class LinkInfo:
    """A link of a running topology."""

    name: str
    a: str
    b: str
    emulated: bool
    ifname_a: str
    ifname_b: str
    ip4_a: str
    ip4_b: str
    ip6_a: str
    ip6_b: str
    prefixlen4: int
    prefixlen6: int
    relay: str | None = None  # relay namespace
    control: str | None = None  # emulator control socket
    spec: LinkSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("spec")
        return d


_DIR_ALIASES = {"forward": "a->b", "backward": "b->a", "both": "both", "*": "both"}


class RunningTopology(Testbed):
    """A topology that is up: hosts, links, emulators. Tear down with ``down()``/``with``."""

    __test__ = False

    def __init__(
        self,
        topology: Topology,
        *,
        prefix: str = DEFAULT_PREFIX,
        name: str | None = None,
        seed: int | None = None,
        kill_timeout: float = 3.0,
    ):
        super().__init__(prefix=prefix, kill_timeout=kill_timeout)
        if name is not None:
            if not re.match(r"^[a-z0-9][a-z0-9_-]{0,23}$", name):
                raise ValueError(f"topology name must match [a-z0-9][a-z0-9_-]{{0,23}}: {name!r}")
            self.tag = name
            self.base = f"{prefix}{name}"
        self.topology = topology
        self.seed = seed
        self.hosts: dict[str, Host] = {}
        self.relays: dict[str, Host] = {}
        self.links: dict[str, LinkInfo] = {}
        self.state_dir = STATE_DIR / f"{self.base}.d"
        self._emulators: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> RunningTopology:
        if not self._started:  # RunningTopology(...) used directly in a with
            super().__enter__()
            try:
                self.wait_ready()
            except BaseException:
                self.close()
                raise
        return self

    def __repr__(self) -> str:
        return f"RunningTopology({self.base!r}, hosts={list(self.hosts)}, links={list(self.links)})"

    # -- building

    def start(self) -> None:
        if self._started:
            return
        if (Path("/run/netns") / f"{self.base}-{self.topology.hosts[0]}").exists():
            raise TestbedError(f"a test bed named {self.base!r} already exists")
        super().start()

    def _new_ns(self, name: str, role: str, registry: dict[str, Host]) -> Host:
        self._check_open()
        host = Host(self, f"{self.base}-{name}", role)
        registry[name] = host  # registered first: a failure below is cleaned up
        _run([IP, "netns", "add", host.name])
        host.ip("link", "set", "lo", "up")
        return host

    def build(self) -> None:
        if not self.topology.links:
            raise TestbedError("the topology has no links")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for h in self.topology.hosts:
            self._new_ns(h, h, self.hosts)
        nic_count: dict[str, int] = dict.fromkeys(self.hosts, 0)
        for i, spec in enumerate(self.topology.links):
            self._build_link(i, spec, nic_count)
        for h, host in self.hosts.items():  # a host's "main" address: its first link's
            for info in self.links.values():
                if h in (info.a, info.b):
                    side = "a" if info.a == h else "b"
                    host.ifname = getattr(info, f"ifname_{side}")
                    host.ip4 = getattr(info, f"ip4_{side}")
                    host.ip6 = getattr(info, f"ip6_{side}")
                    host.prefixlen4, host.prefixlen6 = info.prefixlen4, info.prefixlen6
                    host.peer = self.hosts[info.b if side == "a" else info.a]
                    break
        for name, info in self.links.items():
            if info.emulated:
                self._start_emulator(name, info)

    def _build_link(self, i: int, spec: LinkSpec, nic_count: dict[str, int]) -> None:
        ha, hb = self.hosts[spec.a], self.hosts[spec.b]
        if_a, if_b = f"eth{nic_count[spec.a]}", f"eth{nic_count[spec.b]}"
        nic_count[spec.a] += 1
        nic_count[spec.b] += 1
        net4 = ipaddress.ip_network(spec.ipv4 or f"10.77.{i + 1}.0/24", strict=False)
        net6 = ipaddress.ip_network(spec.ipv6 or f"fd77:{i + 1:x}::/64", strict=False)
        hosts4, hosts6 = net4.hosts(), net6.hosts()
        info = LinkInfo(
            name=spec.name,
            a=spec.a,
            b=spec.b,
            emulated=spec.emulated,
            ifname_a=if_a,
            ifname_b=if_b,
            ip4_a=str(next(hosts4)),
            ip4_b=str(next(hosts4)),
            ip6_a=str(next(hosts6)),
            ip6_b=str(next(hosts6)),
            prefixlen4=net4.prefixlen,
            prefixlen6=net6.prefixlen,
            spec=spec,
        )
        self.links[spec.name] = info
        offloads = spec.offloads if spec.offloads is not None else not info.emulated
        if info.emulated:
            relay = self._new_ns(f"R{i}", f"R{i}", self.relays)
            info.relay = relay.name
            info.control = str(self.state_dir / f"link{i}.sock")
            # No IPv6 on the relay's own interfaces: it must stay silent on the segment.
            relay.run(
                ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                 "net.ipv6.conf.default.disable_ipv6=1"]
            )  # fmt: skip
            self._veth(ha, if_a, relay, "ra")
            self._veth(relay, "rb", hb, if_b)
            for ifn in ("ra", "rb"):
                if spec.mtu:
                    relay.ip("link", "set", "dev", ifn, "mtu", str(spec.mtu))
                relay.run(["ethtool", "-K", ifn, "tso", "off", "gso", "off", "gro", "off"])
                relay.ip("link", "set", "dev", ifn, "promisc", "on", "up")
        else:
            self._veth(ha, if_a, hb, if_b)
        for host, ifn, ip4, ip6 in (
            (ha, if_a, info.ip4_a, info.ip6_a),
            (hb, if_b, info.ip4_b, info.ip6_b),
        ):
            host.ip("addr", "add", f"{ip4}/{net4.prefixlen}", "dev", ifn)
            host.ip("-6", "addr", "add", f"{ip6}/{net6.prefixlen}", "dev", ifn, "nodad")
            if spec.mtu:
                host.ip("link", "set", "dev", ifn, "mtu", str(spec.mtu))
            if not offloads:
                # tx off: frames crossing the relay must carry real checksums (an
                # AF_PACKET socket sees CHECKSUM_PARTIAL frames with unfinished ones).
                host.run(["ethtool", "-K", ifn, "tso", "off", "gso", "off", "gro", "off",
                          "tx", "off"])  # fmt: skip
            host.ip("link", "set", "dev", ifn, "up")

    def _veth(self, h1: Host, if1: str, h2: Host, if2: str) -> None:
        _run(
            [IP, "link", "add", if1, "netns", h1.name, "type", "veth",
             "peer", "name", if2, "netns", h2.name]
        )  # fmt: skip

    def _start_emulator(self, name: str, info: LinkInfo) -> None:
        assert info.spec is not None and info.relay is not None and info.control is not None
        relay = self.relays[info.relay.rsplit("-", 1)[1]]
        config = {"a->b": info.spec.forward.to_dict(), "b->a": info.spec.backward.to_dict()}
        start = _proc_start_time(os.getpid())
        argv = [
            sys.executable, "-m", "vtl.testbed.emulator",
            "--iface-a", "ra", "--iface-b", "rb",
            "--control", info.control,
            "--config", json.dumps(config),
            "--owner", f"{os.getpid()}:{start}",
        ]  # fmt: skip
        if info.spec.mtu and info.spec.mtu > 65000:
            argv += ["--bufsize", str(info.spec.mtu + 64)]
        if self.seed is not None:
            argv += ["--seed", str(self.seed + len(self._emulators))]
        env = python_env()
        log = open(Path(info.control).with_suffix(".log"), "wb")  # noqa: SIM115
        with log:
            proc = relay.popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._emulators[name] = proc

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for every emulator to answer and every link to pass IPv4 and IPv6 pings."""
        deadline = time.monotonic() + timeout
        for name, proc in self._emulators.items():
            info = self.links[name]
            assert info.control is not None
            while True:
                if proc.poll() is not None:
                    raise TestbedError(
                        f"emulator of link {name!r} exited ({proc.returncode}):\n"
                        + self._emulator_log(name)
                    )
                try:
                    _control(info.control, {"get": True}, timeout=1.0)
                    break
                except (OSError, ValueError):
                    if time.monotonic() > deadline:
                        raise TestbedError(
                            f"emulator of link {name!r} does not answer on {info.control}:\n"
                            + self._emulator_log(name)
                        ) from None
                    time.sleep(0.02)
        pings = []
        for info in self.links.values():
            ha = self.hosts[info.a]
            left = max(1, int(deadline - time.monotonic()))
            for addr in (info.ip4_b, info.ip6_b):
                argv = ha.exec_prefix + ["ping", "-n", "-q", "-c", "1", "-i", "0.1",
                                         "-W", "1", "-w", str(left), addr]  # fmt: skip
                pings.append(
                    (info.name, addr, subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                       stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True))
                )  # fmt: skip
        failed = []
        for link, addr, p in pings:
            out, _ = p.communicate()
            if p.returncode != 0:
                failed.append(f"link {link}: no ping reply from {addr}: {out.strip()[-300:]}")
        if failed:
            raise TestbedError("topology is not passing traffic:\n" + "\n".join(failed))

    def _emulator_log(self, name: str) -> str:
        info = self.links[name]
        assert info.control is not None
        with contextlib.suppress(OSError):
            return Path(info.control[: -len(".sock")] + ".log").read_text()[-3000:]
        return "(no log)"

    # -- teardown

    def close(self) -> list[str]:
        """Stop processes (emulators included), delete all namespaces and files. Idempotent."""
        with self._lock:
            if self._closed or os.getpid() != self._owner_pid:
                return []
            self._closed = True
            procs = list(self._procs)
            self._procs.clear()
        self._stop_processes(procs)
        errors = []
        for host in list(self.relays.values()) + list(reversed(self.hosts.values())):
            err = _delete_netns(host.name)
            if err:
                errors.append(err)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            _owner_file(self.base).unlink()
        with _live_lock:
            _live.discard(self)
        return errors

    def down(self) -> None:
        """Tear everything down (raises TestbedError if something could not be removed)."""
        errors = self.close()
        if errors:
            raise TestbedError("test bed cleanup failed:\n" + "\n".join(errors))

    # -- queries and live changes

    def link(self, name: str) -> LinkInfo:
        try:
            return self.links[name]
        except KeyError:
            raise KeyError(f"no link {name!r}; links: {', '.join(self.links)}") from None

    def addr(self, host: str, link: str | None = None, family: int = 4) -> str:
        """Address of `host` on `link` (default: the host's first link)."""
        for info in self.links.values():
            if (link is None or info.name == link) and host in (info.a, info.b):
                side = "a" if info.a == host else "b"
                return getattr(info, f"ip{family}_{side}")
        raise KeyError(f"host {host!r} is not on link {link!r}")

    def _directions(self, info: LinkInfo, direction: str) -> str:
        d = _DIR_ALIASES.get(direction, direction)
        if d in ("a->b", "b->a", "both"):
            return d
        if d == f"{info.a}->{info.b}":
            return "a->b"
        if d == f"{info.b}->{info.a}":
            return "b->a"
        raise ValueError(
            f"direction must be 'both', 'a->b', 'b->a', '{info.a}->{info.b}' or "
            f"'{info.b}->{info.a}', got {direction!r}"
        )

    def _emulated(self, name: str) -> LinkInfo:
        info = self.link(name)
        if not info.emulated or info.control is None:
            raise TestbedError(
                f"link {name!r} is not emulated: it is a plain veth pair (profile 'clean' "
                "without conditions), so its conditions cannot be changed or counted. "
                "Declare it with emulate = true (Topology.pair(..., emulate=True)) to run "
                "the emulator on it."
            )
        return info

    def _ctl(self, info: LinkInfo, msg: dict[str, Any]) -> dict[str, Any]:
        assert info.control is not None
        try:
            return _control(info.control, msg)
        except RuntimeError as exc:
            raise ValueError(f"link {info.name!r}: {exc}") from None
        except OSError as exc:
            raise TestbedError(f"emulator of link {info.name!r} unreachable: {exc}") from exc

    def set_link(
        self,
        link: str,
        direction: str = "both",
        *,
        conditions: Conditions | None = None,
        replace: bool = False,
        **fields: Any,
    ) -> dict[str, Conditions]:
        """Change a link's conditions while traffic flows; returns the new ones per direction.

        `fields` (Conditions field names) are merged into the current
        conditions, unless `replace` (start from no impairment) or
        `conditions` (use exactly these) is given. Packets arriving after the
        call get the new conditions (those already in the emulator keep theirs).
        """
        info = self._emulated(link)
        d = self._directions(info, direction)
        if conditions is not None:
            fields = {**conditions.to_dict(), **fields}
            replace = True
        fields = _cond_fields(fields, f"set_link({link!r})")
        Conditions().replace(**fields)  # validate locally first
        reply = self._ctl(info, {"set": {"dir": d, **fields}, "replace": replace})
        return {k: Conditions.from_dict(v) for k, v in reply["conditions"].items()}

    def conditions(self, link: str) -> dict[str, Conditions]:
        """Current conditions per direction (``a->b``, ``b->a``)."""
        info = self.link(link)
        if not info.emulated:
            return {"a->b": Conditions(), "b->a": Conditions()}
        reply = self._ctl(info, {"get": True})
        return {k: Conditions.from_dict(v) for k, v in reply["conditions"].items()}

    def link_stats(self, link: str) -> dict[str, Any]:
        """Counters per direction: the emulator's, or the kernel's for a plain veth.

        Emulator counters: rx/tx packets and IP bytes, drops by cause
        (loss, burst, queue, send, kernel), duplicated, corrupted, reordered,
        queue occupancy and high-water marks, scheduling lateness.
        """
        info = self.link(link)
        if not info.emulated:
            out: dict[str, Any] = {"emulated": False}
            for d, (src, ifn) in (("a->b", (info.a, info.ifname_a)),
                                  ("b->a", (info.b, info.ifname_b))):  # fmt: skip
                cp = self.hosts[src].ip("-j", "-s", "link", "show", "dev", ifn)
                s = json.loads(cp.stdout)[0]["stats64"]["tx"]
                out[d] = {"tx_packets": s["packets"], "tx_bytes": s["bytes"],
                          "drop_send": s.get("dropped", 0)}  # fmt: skip
            return out
        reply = self._ctl(info, {"stats": True})
        return {"emulated": True, "uptime_s": reply["uptime_s"], **reply["stats"]}

    def reset_stats(self, link: str | None = None) -> None:
        for info in self.links.values():
            if info.emulated and (link is None or info.name == link):
                self._ctl(info, {"reset_stats": True})

    def describe(self, *, stats: bool = False) -> dict[str, Any]:
        """Hosts, addresses, links and their current conditions (and counters if `stats`)."""
        hosts: dict[str, Any] = {}
        for h, host in self.hosts.items():
            ifaces = []
            for info in self.links.values():
                if h in (info.a, info.b):
                    side = "a" if info.a == h else "b"
                    ifaces.append({
                        "ifname": getattr(info, f"ifname_{side}"),
                        "link": info.name,
                        "ip4": getattr(info, f"ip4_{side}"),
                        "ip6": getattr(info, f"ip6_{side}"),
                        "peer": info.b if side == "a" else info.a,
                    })  # fmt: skip
            hosts[h] = {"netns": host.name, "ip4": host.ip4, "ip6": host.ip6, "interfaces": ifaces}
        links: dict[str, Any] = {}
        for name, info in self.links.items():
            d = info.to_dict()
            spec = info.spec
            if spec is not None:
                d.update(profile=spec.profile, loss=spec.loss, bursty=spec.bursty)
            conds = self.conditions(name) if not self._closed else {}
            d["conditions"] = {k: c.to_dict() for k, c in conds.items()}
            d["summary"] = {k: c.summary() for k, c in conds.items()}
            if stats and not self._closed:
                d["stats"] = self.link_stats(name)
            links[name] = d
        return {
            "name": self.tag,
            "base": self.base,
            "prefix": self.prefix,
            "owner_pid": self._owner_pid,
            "hosts": hosts,
            "links": links,
        }
