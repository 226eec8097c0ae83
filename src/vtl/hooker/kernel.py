"""The Hooker's kernel side as Python sees it: load, attach, configure, read.

:class:`HookerKernel` loads ``bpf/vtl_hooker.bpf.c`` (compiled by
:mod:`vtl.hooker.build`), fills its configuration, attaches the cgroup
programs through bpf_links (so they vanish with this process: fail-open)
and the sk_msg verdict to its SOCKHASH, and exposes the maps the daemon
needs: policy rules, the peer-capability mirror, the original destination
of each redirected connection, and the address rewrites for the server
side.  The ctypes structures below mirror ``bpf/vtl_hooker.h``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtl.hooker import build
from vtl.hooker.libbpf import (
    BPF_SK_MSG_VERDICT,
    BpfError,
    BpfObject,
)

SO_NETNS_COOKIE = 71  # linux/socket.h (not in Python's socket module)

DEFAULT_SPLICE_BUDGET = 0  # opt-in: see add_sock() in bpf/vtl_hooker.bpf.c
PEER_CAPABLE = 1
PEER_INCAPABLE = 2

COUNTER_NAMES = (
    "connect_seen",
    "connect_redirected",
    "connect_incapable_peer",
    "socks_app",
    "socks_hooker",
    "msg_redirected",
    "msg_redirected_bytes",
    "msg_passed",
    "msg_passed_bytes",
    "peername_rewritten",
    "splice_exhausted",
)

# Attach order matters: connect4 last, so that no connection is diverted
# before sock_ops can hand its destination to the Hooker.
CGROUP_PROGRAMS = (
    ("vtl_sockops", "sockops"),
    ("vtl_getpeername4", "cgroup/getpeername4"),
    ("vtl_connect4", "cgroup/connect4"),
)


class Config(ctypes.Structure):
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("hooker_tgid", ctypes.c_uint32),
        ("listen_ip4", ctypes.c_uint32),
        ("listen_port", ctypes.c_uint32),
        ("enabled", ctypes.c_uint32),
        ("splice_budget", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class Orig(ctypes.Structure):
    _fields_ = [
        ("ip4", ctypes.c_uint32),
        ("port", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class Addr(ctypes.Structure):
    _fields_ = [("ip4", ctypes.c_uint32), ("port", ctypes.c_uint32)]


class SockKey(ctypes.Structure):
    _fields_ = [
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("remote_port", ctypes.c_uint32),
    ]


class PrefixKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("ip4", ctypes.c_uint32)]


def ip4_to_be(ip: str) -> int:
    """An IPv4 string as the u32 the kernel stores (network byte order)."""
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def be_to_ip4(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def netns_cookie() -> int:
    """The cookie of this process's network namespace (what the programs
    compare with ``bpf_get_netns_cookie``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return struct.unpack("=Q", raw)[0]


PRIVATE_CGROUP2 = Path("/run/vtl/cgroup2")


def _mounted_cgroup2() -> Path | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2" and Path(parts[1]).is_dir():
                return Path(parts[1])
    return None


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted (``/sys/fs/cgroup`` or, in hybrid mode,
    ``/sys/fs/cgroup/unified``): read from /proc/mounts, never assumed.
    ``ip netns exec`` remounts /sys in a private mount namespace, which
    hides it; then the (single) v2 hierarchy is mounted again at
    ``/run/vtl/cgroup2``, visible only in that mount namespace."""
    found = _mounted_cgroup2()
    if found is not None:
        return found
    PRIVATE_CGROUP2.mkdir(parents=True, exist_ok=True)
    cp = subprocess.run(
        ["mount", "-t", "cgroup2", "none", str(PRIVATE_CGROUP2)], capture_output=True, text=True
    )
    found = _mounted_cgroup2()
    if found is None:
        raise BpfError(
            2, f"no cgroup v2 hierarchy is mounted and mounting one failed: {cp.stderr.strip()}"
        )
    return found


def cgroup_id(path: str | Path) -> int:
    """A cgroup v2 directory's id, as ``bpf_get_current_cgroup_id`` returns it."""
    return os.stat(path).st_ino


@dataclass(frozen=True)
class OrigDest:
    ip: str
    port: int
    rule: int


class HookerKernel:
    """One Hooker's BPF programs and maps (one network namespace)."""

    def __init__(
        self,
        listen: tuple[str, int],
        *,
        cgroup: str | Path | None = None,
        tgid: int | None = None,
        splice_budget: int = DEFAULT_SPLICE_BUDGET,
    ):
        self.listen = listen
        self.cgroup = Path(cgroup) if cgroup else cgroup2_root()
        self.netns_cookie = netns_cookie()
        self.obj_path = build.object_path("vtl_hooker")
        self._config = Config()
        self._obj: BpfObject | None = BpfObject(self.obj_path)
        try:
            obj = self._obj
            self.maps = {
                name: obj.map(name)
                for name in (
                    "vtl_config",
                    "vtl_counters",
                    "vtl_hook_ports",
                    "vtl_hook_prefixes",
                    "vtl_hook_cgroups",
                    "vtl_peers",
                    "vtl_orig_dst",
                    "vtl_flows",
                    "vtl_peer_names",
                    "vtl_socks",
                    "vtl_splice",
                )
            }
            self._config = Config(
                netns_cookie=self.netns_cookie,
                hooker_tgid=tgid if tgid is not None else os.getpid(),
                listen_ip4=ip4_to_be(listen[0]),
                listen_port=listen[1],
                enabled=1,
                splice_budget=splice_budget,
            )
            self.maps["vtl_config"].update(ctypes.c_uint32(0), self._config)
            # sk_msg first: a socket put in the SOCKHASH gets the verdict
            # program only if it is attached when the socket is added.
            obj.attach_to_map("vtl_skmsg", "vtl_socks", BPF_SK_MSG_VERDICT)
            for prog, _ in CGROUP_PROGRAMS:
                obj.attach_cgroup(prog, self.cgroup)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ policy

    def _obj_or_raise(self) -> BpfObject:
        if self._obj is None:
            raise BpfError(9, "the Hooker's BPF programs are unloaded")
        return self._obj

    def hook_port(self, port: int, rule: int = 1) -> None:
        self.maps["vtl_hook_ports"].update(ctypes.c_uint32(port), ctypes.c_uint32(rule))

    def unhook_port(self, port: int) -> bool:
        return self.maps["vtl_hook_ports"].delete(ctypes.c_uint32(port))

    def hook_prefix(self, cidr: str, rule: int = 1) -> None:
        net = ipaddress.IPv4Network(cidr, strict=False)
        key = PrefixKey(net.prefixlen, ip4_to_be(str(net.network_address)))
        self.maps["vtl_hook_prefixes"].update(key, ctypes.c_uint32(rule))

    def unhook_prefix(self, cidr: str) -> bool:
        net = ipaddress.IPv4Network(cidr, strict=False)
        return self.maps["vtl_hook_prefixes"].delete(
            PrefixKey(net.prefixlen, ip4_to_be(str(net.network_address)))
        )

    def hook_cgroup(self, cgid: int, rule: int = 1) -> None:
        self.maps["vtl_hook_cgroups"].update(ctypes.c_uint64(cgid), ctypes.c_uint32(rule))

    def unhook_cgroup(self, cgid: int) -> bool:
        return self.maps["vtl_hook_cgroups"].delete(ctypes.c_uint64(cgid))

    def set_peer(self, ip: str, state: int | None) -> None:
        """Mirror the peer cache: ``PEER_INCAPABLE`` keeps connect()s to that
        host plain TCP; ``None`` forgets it."""
        key = ctypes.c_uint32(ip4_to_be(ip))
        if state is None:
            self.maps["vtl_peers"].delete(key)
        else:
            self.maps["vtl_peers"].update(key, ctypes.c_uint32(state))

    # ------------------------------------------------------------- flows

    def take_flow(self, app: tuple[str, int]) -> OrigDest | None:
        """The original destination of the redirected connection whose app
        end is ``app`` (consumed: each accept takes its own)."""
        key = Addr(ip4_to_be(app[0]), app[1])
        m = self.maps["vtl_flows"]
        orig = m.lookup(key, Orig)
        if orig is None:
            return None
        m.delete(key)
        assert isinstance(orig, Orig)
        return OrigDest(be_to_ip4(orig.ip4), int(orig.port), int(orig.rule))

    def add_peer_name(self, hooker_src: tuple[str, int], real_peer: tuple[str, int]) -> None:
        """Server host: the server must see ``real_peer`` where the socket's
        peer is ``hooker_src`` (call before connect())."""
        self.maps["vtl_peer_names"].update(
            Addr(ip4_to_be(hooker_src[0]), hooker_src[1]),
            Addr(ip4_to_be(real_peer[0]), real_peer[1]),
        )

    def remove_peer_name(self, hooker_src: tuple[str, int]) -> None:
        with contextlib.suppress(BpfError):
            self.maps["vtl_peer_names"].delete(Addr(ip4_to_be(hooker_src[0]), hooker_src[1]))

    # ------------------------------------------------------------ status

    def counters(self) -> dict[str, int]:
        m = self.maps["vtl_counters"]
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            v = m.lookup(ctypes.c_uint32(i), ctypes.c_uint64)
            out[name] = int(v.value) if v is not None else 0  # type: ignore[attr-defined]
        return out

    def policy(self) -> dict[str, Any]:
        ports = sorted(int(k.value) for k in self.maps["vtl_hook_ports"].keys(ctypes.c_uint32))  # type: ignore[attr-defined]
        prefixes = sorted(
            f"{be_to_ip4(k.ip4)}/{k.prefixlen}"  # type: ignore[attr-defined]
            for k in self.maps["vtl_hook_prefixes"].keys(PrefixKey)
        )
        cgroups = sorted(int(k.value) for k in self.maps["vtl_hook_cgroups"].keys(ctypes.c_uint64))  # type: ignore[attr-defined]
        peers = {}
        for k in self.maps["vtl_peers"].keys(ctypes.c_uint32):
            v = self.maps["vtl_peers"].lookup(k, ctypes.c_uint32)
            if v is not None:
                peers[be_to_ip4(k.value)] = (  # type: ignore[attr-defined]
                    "capable" if v.value == PEER_CAPABLE else "incapable"  # type: ignore[attr-defined]
                )
        return {"ports": ports, "prefixes": prefixes, "cgroups": cgroups, "peers": peers}

    def programs(self) -> list[dict[str, Any]]:
        obj = self._obj_or_raise()
        out = [
            {"name": prog, "type": kind, "id": obj.prog_id(prog), "attached_to": str(self.cgroup)}
            for prog, kind in CGROUP_PROGRAMS
        ]
        out.append(
            {
                "name": "vtl_skmsg",
                "type": "sk_msg",
                "id": obj.prog_id("vtl_skmsg"),
                "attached_to": "map vtl_socks",
            }
        )
        return out

    def spliced_sockets(self) -> int:
        return sum(1 for _ in self.maps["vtl_splice"].keys(SockKey))

    # ------------------------------------------------------------ teardown

    def disable(self) -> None:
        """Stop redirecting new connections (existing ones keep going)."""
        if self._obj is not None:
            self._config.enabled = 0
            with contextlib.suppress(BpfError):
                self.maps["vtl_config"].update(ctypes.c_uint32(0), self._config)

    def close(self) -> None:
        """Detach every program and free every map (idempotent)."""
        obj, self._obj = self._obj, None
        if obj is not None:
            self._config.enabled = 0
            with contextlib.suppress(BpfError):
                obj.map("vtl_config").update(ctypes.c_uint32(0), self._config)
            obj.close()

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    def __enter__(self) -> HookerKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
