"""The Hooker's XDP ingress filter for VTL datagrams (``bpf/vtl_xdp.bpf.c``).

Malformed VTL datagrams and datagrams for connections this host does not
serve are dropped in the driver, before the kernel builds a socket buffer and
long before the Python datapath would decode them; everything else passes
untouched.  :class:`XdpFilter` loads and attaches the program and edits its
maps; :class:`ConnectionIdObserver` keeps the connection-ID map in step with a
running endpoint (``EndpointCore.cid_observer``).

The attachment is a bpf_link owned by this process: it goes away with
:meth:`XdpFilter.close` or when the process dies, and it never replaces an XDP
program someone else attached (that is a clear :class:`XdpBusyError`).
Native (driver) mode is tried first, then generic (SKB) mode.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import os
import socket
import struct
import time
from typing import Any

from vtl.hooker import build
from vtl.hooker.libbpf import BPF_XDP, BpfError, BpfObject, Map, ProgInfo, lib

PROGRAM = "vtl_xdp_filter"
#: counter slots, in the order of ``enum vtl_xdp_counter`` in the C source
COUNTERS = (
    "passed", "non_vtl", "short", "version", "length", "type", "zero_dcid", "unknown_conn",
    "aggregates",
)  # fmt: skip
DROP_REASONS = COUNTERS[2:8]
#: how long a forgotten connection ID still passes, so that the endpoint can
#: answer a peer's late CLOSE or DATA with a stateless RESET (wire-format.md)
DEFAULT_GRACE = 10.0

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class XdpBusyError(BpfError):
    """Another XDP program owns the interface; VTL does not replace it."""


class _Count(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class _Config(ctypes.Structure):
    _fields_ = [("check_conns", ctypes.c_uint32), ("aggregates", ctypes.c_uint32)]


class _LinkCreateOpts(ctypes.Structure):
    # the head of struct bpf_link_create_opts: libbpf reads no further than sz
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf 1.1)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


XDP_VERDICTS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


def _cid_key(cid: int) -> ctypes.c_uint64:
    """A connection ID as the program reads it: the 8 wire bytes (big-endian)."""
    return ctypes.c_uint64(struct.unpack("=Q", struct.pack("!Q", cid))[0])


def _cid_of(key: int) -> int:
    return struct.unpack("!Q", struct.pack("=Q", key))[0]


def attached_program(ifindex: int, mode: str | None = None) -> tuple[int, str] | None:
    """(id, name) of the XDP program on ``ifindex`` (in ``mode`` if given), or None."""
    prog_id = ctypes.c_uint32(0)
    flags = MODES[mode] if mode else 0
    if lib().bpf_xdp_query_id(ifindex, flags, ctypes.byref(prog_id)) != 0 or not prog_id.value:
        return None
    name = "?"
    fd = lib().bpf_prog_get_fd_by_id(prog_id.value)
    if fd >= 0:
        try:
            info = ProgInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            if lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) == 0:
                name = info.name.decode(errors="replace")
        finally:
            os.close(fd)
    return prog_id.value, name


def _ifindex(interface: str | int) -> tuple[int, str]:
    if isinstance(interface, int):
        return interface, socket.if_indextoname(interface)
    try:
        return socket.if_nametoindex(interface), interface
    except OSError as exc:
        raise BpfError(
            errno.ENODEV, f"no interface {interface!r} in this network namespace"
        ) from exc


class XdpFilter:
    """The VTL ingress filter on one interface of this network namespace.

    ``mode`` is ``"auto"`` (native, else generic), ``"native"`` or ``"generic"``.
    """

    def __init__(self, interface: str | int, *, mode: str = "auto", grace: float = DEFAULT_GRACE):
        if mode not in ("auto", *MODES):
            raise ValueError(f"mode must be auto, native or generic, not {mode!r}")
        self.ifindex, self.ifname = _ifindex(interface)
        self.grace = grace
        self.mode: str | None = None
        self._link_fd = -1
        self._ports: set[int] = set()
        self._expiries: list[tuple[int, int]] = []  # heap of (expiry ns, cid)
        self.fail_open_reason: str | None = None
        self._obj: BpfObject | None = BpfObject(build.object_path("vtl_xdp"))
        self.native_error: str | None = None  # why auto mode fell back to generic
        try:
            self.prog_id = self._obj.prog_id(PROGRAM)
            self._attach(mode)
            self._configure()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ attaching

    def _busy(self, owner: tuple[int, str]) -> XdpBusyError:
        return XdpBusyError(
            errno.EBUSY,
            f"{self.ifname} already has an XDP program (id {owner[0]}, {owner[1]!r}) that VTL "
            "did not attach: not replacing it (detach it first, e.g. `ip link set dev "
            f"{self.ifname} xdp off`, or run the Hooker on another interface)",
        )

    def _attach(self, mode: str) -> None:
        owner = attached_program(self.ifindex)
        if owner is not None:
            raise self._busy(owner)
        assert self._obj is not None
        prog_fd = self._obj.prog_fd(PROGRAM)
        errors = []
        for name in ("native", "generic") if mode == "auto" else (mode,):
            opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), MODES[name], 0)
            fd = lib().bpf_link_create(prog_fd, self.ifindex, BPF_XDP, ctypes.byref(opts))
            if fd >= 0:
                self._link_fd, self.mode = fd, name
                return
            err = -fd
            if err in (errno.EBUSY, errno.EEXIST):
                owner = attached_program(self.ifindex)
                raise self._busy(owner or (0, "unknown")) from None
            why = os.strerror(err)
            if err == errno.ERANGE:  # veth: no native XDP above about a page
                why += " (the MTU is too large for native XDP here)"
            errors.append(f"{name}: {why}")
            if name == "native":
                self.native_error = why
        raise BpfError(
            errno.EOPNOTSUPP, f"cannot attach XDP to {self.ifname} ({'; '.join(errors)})"
        )

    @property
    def attached(self) -> bool:
        return self._link_fd >= 0

    def close(self) -> None:
        """Detach and free everything (idempotent)."""
        if self._link_fd >= 0:
            os.close(self._link_fd)  # the link's last reference: the kernel detaches
            self._link_fd = -1
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> XdpFilter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ maps

    def _map(self, name: str) -> Map:
        # never a stale fd: after close() the number may belong to someone else
        if self._obj is None:
            raise BpfError(errno.EBADF, f"the XDP filter on {self.ifname} is closed")
        return self._obj.map(name)

    @property
    def _conns(self) -> Map:
        return self._map("vtl_conns")

    @property
    def _port_map(self) -> Map:
        return self._map("vtl_ports")

    @property
    def _stats(self) -> Map:
        return self._map("vtl_xdp_stats")

    def add_port(self, port: int) -> None:
        """Inspect UDP datagrams to ``port`` from now on."""
        if not 0 < port < 65536:
            raise ValueError(f"bad UDP port {port}")
        self._port_map.update(ctypes.c_uint16(socket.htons(port)), ctypes.c_uint32(1))
        self._ports.add(port)

    def remove_port(self, port: int) -> None:
        self._port_map.delete(ctypes.c_uint16(socket.htons(port)))
        self._ports.discard(port)

    @property
    def ports(self) -> set[int]:
        return set(self._ports)

    def add_conn(self, cid: int) -> None:
        """Let datagrams for local connection ID ``cid`` through.  If the map
        is full the filter fails open (stops checking connection IDs) rather
        than drop a live connection's packets."""
        self._purge()
        try:
            self._conns.update(_cid_key(cid), ctypes.c_uint64(0))
        except BpfError as exc:
            self.fail_open(f"cannot add connection {cid:#x}: {exc}")
            raise

    def remove_conn(self, cid: int, grace: float | None = None) -> None:
        """Stop serving ``cid``; it still passes for ``grace`` seconds
        (default: the filter's), then it is an unknown connection."""
        grace = self.grace if grace is None else grace
        if grace <= 0:
            self._conns.delete(_cid_key(cid))
        else:
            expiry = time.monotonic_ns() + int(grace * 1e9)
            self._conns.update(_cid_key(cid), ctypes.c_uint64(expiry))
            heapq.heappush(self._expiries, (expiry, cid))
        self._purge()

    def _purge(self) -> None:
        """Delete connection IDs whose grace period is over (the program
        deletes the ones it meets; this catches the rest)."""
        now = time.monotonic_ns()
        while self._expiries and self._expiries[0][0] <= now:
            expiry, cid = heapq.heappop(self._expiries)
            value = self._conns.lookup(_cid_key(cid), ctypes.c_uint64)
            if value is not None and value.value == expiry:  # type: ignore[attr-defined]
                self._conns.delete(_cid_key(cid))

    def conns(self) -> dict[int, float | None]:
        """Connection IDs in the map: None while live, else seconds of grace left."""
        now = time.monotonic_ns()
        out: dict[int, float | None] = {}
        for key in self._conns.keys(ctypes.c_uint64):
            value = self._conns.lookup(key, ctypes.c_uint64)
            if value is None:
                continue
            expiry = value.value  # type: ignore[attr-defined]
            cid = _cid_of(key.value)  # type: ignore[attr-defined]
            out[cid] = None if expiry == 0 else max(0.0, (expiry - now) / 1e9)
        return out

    def _configure(self) -> None:
        # generic mode runs after GRO and sees GSO batches whole (C source)
        config = _Config(0 if self.fail_open_reason else 1, 1 if self.mode == "generic" else 0)
        self._map("vtl_xdp_config").update(ctypes.c_uint32(0), config)

    def fail_open(self, reason: str) -> None:
        """Stop dropping unknown connection IDs (every other check stays)."""
        self.fail_open_reason = reason
        self._configure()

    # -------------------------------------------------------------- counters

    def counters(self) -> dict[str, int]:
        """Packets and bytes per slot, summed over CPUs: ``passed``,
        ``passed_bytes``, ``non_vtl``, ..., ``unknown_conn_bytes``,
        and ``dropped`` (all reasons)."""
        ncpu = lib().libbpf_num_possible_cpus()
        row = _Count * max(ncpu, 1)
        out: dict[str, int] = {}
        for slot, name in enumerate(COUNTERS):
            cells: Any = self._stats.lookup(ctypes.c_uint32(slot), row) or ()
            out[name] = sum(c.packets for c in cells)
            out[f"{name}_bytes"] = sum(c.bytes for c in cells)
        out["dropped"] = sum(out[r] for r in DROP_REASONS)
        return out

    def test_run(self, frame: bytes, repeat: int = 1) -> tuple[str, int]:
        """Run the program in the kernel on one Ethernet ``frame``
        (BPF_PROG_TEST_RUN, ``repeat`` times): its verdict and the average
        nanoseconds per run.  The counters count these runs too."""
        if self._obj is None:
            raise BpfError(errno.EBADF, f"the XDP filter on {self.ifname} is closed")
        buf = ctypes.create_string_buffer(frame, len(frame))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), repeat=max(1, repeat))
        opts.data_in = ctypes.cast(buf, ctypes.c_void_p)
        opts.data_size_in = len(frame)
        prog_fd = self._obj.prog_fd(PROGRAM)
        rc = lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
        if rc != 0:
            raise BpfError(-rc if rc < 0 else errno.EIO, f"test run: {os.strerror(abs(rc))}")
        return XDP_VERDICTS.get(opts.retval, str(opts.retval)), int(opts.duration)

    def status(self) -> dict[str, Any]:
        """What ``vtl hooker status`` shows for this filter."""
        live = sum(1 for v in self.conns().values() if v is None)
        return {
            "interface": self.ifname,
            "ifindex": self.ifindex,
            "program": PROGRAM,
            "program_id": self.prog_id,
            "mode": self.mode,
            "native_error": self.native_error,
            "attached": self.attached,
            "ports": sorted(self._ports),
            "connections": live,
            "fail_open": self.fail_open_reason,
            "counters": self.counters(),
        }


class ConnectionIdObserver:
    """Keeps the filter's connection IDs equal to an endpoint's.

    Set as ``EndpointCore.cid_observer`` by :meth:`attach`.  The endpoint
    calls :meth:`added` before the first datagram of a connection can be sent
    (so the peer's answer never meets an unknown ID) and :meth:`removed` when
    it forgets one.  If the map cannot take an ID the filter fails open.
    """

    def __init__(self, xdp: XdpFilter, *, grace: float | None = None):
        self.xdp = xdp
        self.grace = grace
        self.cids: set[int] = set()
        self.errors = 0
        self._core: Any = None
        self._port: int | None = None

    def attach(self, core: Any, port: int | None = None) -> ConnectionIdObserver:
        """Observe ``core`` (an EndpointCore; ``UdpEndpoint.core``) and, if
        ``port`` is given, have the filter inspect that UDP port."""
        if self._core is not None:
            raise RuntimeError("observer already attached")
        self._core = core
        core.cid_observer = self
        for cid in list(core.connections):
            self.added(cid)
        if port is not None:
            self.xdp.add_port(port)
            self._port = port
        return self

    def detach(self) -> None:
        """Stop observing; the port (if ours) and our IDs leave the maps."""
        core, self._core = self._core, None
        if core is not None and getattr(core, "cid_observer", None) is self:
            core.cid_observer = None
        if self._port is not None and self.xdp.attached:
            self.xdp.remove_port(self._port)
            self._port = None
        if self.xdp.attached:
            for cid in self.cids:
                self.xdp.remove_conn(cid, grace=0)
        self.cids.clear()

    def added(self, cid: int) -> None:
        try:
            self.xdp.add_conn(cid)
        except BpfError:
            self.errors += 1  # add_conn failed open: the connection still works
        self.cids.add(cid)

    def removed(self, cid: int) -> None:
        self.cids.discard(cid)
        try:
            self.xdp.remove_conn(cid, self.grace)
        except BpfError:
            self.errors += 1  # a stale entry only lets packets through to user space
