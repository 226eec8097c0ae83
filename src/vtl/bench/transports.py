"""The transports ``vtl bench`` compares, and the registry that names them.

A transport is named ``PREFIX``, ``PREFIX-ARG`` or ``PREFIX:ARG``:

* ``tcp-cubic``, ``tcp-bbr``, ``tcp-reno``: kernel TCP with that congestion
  control (``TCP_CONGESTION`` on both sockets);
* ``quic``, ``quic-cubic``: QUIC from aioquic (its default congestion
  control is Reno);
* ``vtl:<composition>``: VTL over UDP with any composition string, e.g.
  ``vtl:reliability=go-back-n(window=64) congestion=newreno``;
* ``hooker:<composition>``: the unmodified TCP runner, its connection
  carried over VTL by a Hooker in each host (:class:`HookerTransport`).

Each run starts a server process in host ``b`` and then a client process in
host ``a`` (the client is the bulk sender), both ``python -m <runner>``
modules that share the line protocol of :mod:`vtl.bench.common`.

Adding a transport is adding one class: subclass :class:`Transport`, set
``prefix`` and ``runner``, give its payload efficiency, and decorate it with
:func:`register`. That is the seam for the Hooker, which carries an
*unmodified* TCP application over VTL::

    @register
    class HookerTransport(TcpTransport):
        prefix = "hooker"             # named "hooker:<composition>"
        default_arg = DEFAULT_VTL

        def session(self, net):       # around every run of this transport
            return hooker_daemons(net.hosts["a"], net.hosts["b"], self.arg)

        def efficiency(self):         # what goes on the wire is VTL
            return vtl_efficiency()

The TCP runner needs no change: its sockets are what the Hooker takes over.
``session`` is entered around each single run (never across runs), so other
transports' runs never see the Hooker's hooks.
"""

from __future__ import annotations

import contextlib
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vtl.bench import metrics

DEFAULT_VTL = "reliability=selective-repeat congestion=newreno"

#: the transports of a full run
DEFAULT_TRANSPORTS = (
    "tcp-cubic",
    "tcp-bbr",
    "quic",
    f"vtl:{DEFAULT_VTL}",
    "vtl:reliability=go-back-n(window=64) congestion=newreno",
    "vtl:reliability=selective-repeat congestion=cubic",
    "vtl:reliability=selective-repeat congestion=bbr",
    "vtl:reliability=selective-repeat congestion=bbr fec=reed-solomon(k=8,m=2)",
)
#: the transports of ``--quick``
QUICK_TRANSPORTS = ("tcp-cubic", "quic", f"vtl:{DEFAULT_VTL}")
#: goodput and latency ratios are given against this transport
REFERENCE = "tcp-cubic"


class TransportError(ValueError):
    """An unknown or unusable transport name."""


class SessionError(RuntimeError):
    """A transport's helpers for one run (e.g. the Hooker daemons) did not start."""


@dataclass(frozen=True)
class Workload:
    """What one run does (the same for every transport of a cell)."""

    kind: str  # "bulk" or "rr"
    size: int = 8 << 20  # bulk bytes
    seed: int = 1
    count: int = 100  # request/response round trips
    request_min: int = 64
    request_max: int = 1024
    response: int = 1024
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.kind not in ("bulk", "rr"):
            raise ValueError(f"unknown workload {self.kind!r} (bulk or rr)")

    def common_args(self) -> list[str]:
        return ["--workload", self.kind, "--seed", str(self.seed), "--timeout", f"{self.timeout:g}"]

    def client_args(self) -> list[str]:
        if self.kind == "bulk":
            return ["--size", str(self.size)]
        return [
            "--count", str(self.count),
            "--request-min", str(self.request_min),
            "--request-max", str(self.request_max),
            "--response", str(self.response),
        ]  # fmt: skip


class Transport(ABC):
    """One way of moving the benchmark's bytes between host a and host b."""

    #: registry key: the part of the name before ``-`` or ``:``
    prefix: ClassVar[str]
    #: module run with ``python -m`` in each namespace
    runner: ClassVar[str]
    #: argument used when the name has none (None: the bare prefix is the name)
    default_arg: ClassVar[str | None] = None
    #: separator put between prefix and argument in the canonical name
    separator: ClassVar[str] = "-"
    #: seconds :meth:`session` adds to a run (for the time estimate)
    session_overhead_s: ClassVar[float] = 0.0

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg if arg else self.default_arg
        self.check()

    @property
    def name(self) -> str:
        """Canonical name, as recorded in results."""
        return self.prefix if self.arg is None else f"{self.prefix}{self.separator}{self.arg}"

    @property
    def label(self) -> str:
        """Short name for plot legends."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def check(self) -> None:  # noqa: B027 -- optional hook, not abstract
        """Raise TransportError if this transport cannot run here."""

    @abstractmethod
    def efficiency(self) -> float:
        """Payload bytes / IP packet bytes of a full-size packet (see metrics)."""

    def options(self) -> list[str]:
        """Runner options given to both ends."""
        return []

    def describe(self) -> dict[str, Any]:
        """Fields added to every result record of this transport."""
        return {"family": self.prefix}

    def session(self, net: Any) -> contextlib.AbstractContextManager[Any]:
        """Context entered around each run (e.g. helper daemons); none by default.
        Raise :class:`SessionError` from it when the helpers cannot start: the
        run is then recorded as failed and the next run goes on."""
        return contextlib.nullcontext()

    def finish_record(self, rec: dict[str, Any], session: Any) -> None:  # noqa: B027
        """Add what the session saw (after it ended) to the run's record; may
        fail a run the endpoints verified. Nothing by default."""

    def server_argv(self, w: Workload) -> list[str]:
        return [sys.executable, "-m", self.runner, "server", *w.common_args(), *self.options()]

    def client_argv(self, w: Workload, host: str, port: int) -> list[str]:
        return [
            sys.executable, "-m", self.runner, "client", "--to", host, "--port", str(port),
            *w.common_args(), *w.client_args(), *self.options(),
        ]  # fmt: skip


TRANSPORTS: dict[str, type[Transport]] = {}


def register(cls: type[Transport]) -> type[Transport]:
    """Class decorator: make ``cls.prefix`` a transport name."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", cls.prefix):
        raise ValueError(f"transport prefix must be lowercase letters/digits: {cls.prefix!r}")
    TRANSPORTS[cls.prefix] = cls
    return cls


def parse_transport(text: str) -> Transport:
    """``tcp-cubic`` / ``quic`` / ``vtl:<composition>`` -> a Transport."""
    text = " ".join(text.split())
    if ":" in text:
        prefix, arg = text.split(":", 1)
    elif text in TRANSPORTS:
        prefix, arg = text, None
    else:
        prefix, _, arg = text.partition("-")
    cls = TRANSPORTS.get(prefix.strip())
    if cls is None:
        known = ", ".join(sorted(TRANSPORTS))
        raise TransportError(f"unknown transport {text!r} (known prefixes: {known})")
    return cls(arg.strip() if arg else None)


def split_list(text: str) -> list[str]:
    """Split a comma-separated list, leaving commas inside parentheses alone
    (``vtl:reliability=go-back-n(window=64,min_rto=0.1)``)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


# ------------------------------------------------------------------ kernel TCP


def available_tcp_cc() -> list[str]:
    try:
        text = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text()
    except OSError:
        return []
    return text.split()


@register
class TcpTransport(Transport):
    """Kernel TCP; the argument is the congestion control (``tcp-cubic``)."""

    prefix = "tcp"
    runner = "vtl.bench.tcp_runner"
    default_arg = "cubic"

    def check(self) -> None:
        cc = available_tcp_cc()
        if cc and self.arg not in cc:
            raise TransportError(
                f"TCP congestion control {self.arg!r} is not available here ({' '.join(cc)})"
            )

    def efficiency(self) -> float:
        return metrics.tcp_efficiency()

    def options(self) -> list[str]:
        return ["--cc", str(self.arg)]

    def describe(self) -> dict[str, Any]:
        return {"family": "tcp", "cc": self.arg}


# ------------------------------------------------------------------------ QUIC


@register
class QuicTransport(Transport):
    """QUIC from aioquic; ``quic-cubic`` picks aioquic's CUBIC instead of Reno."""

    prefix = "quic"
    runner = "vtl.bench.quic_runner"
    max_datagram_size = 1452

    def check(self) -> None:
        if self.arg not in (None, "reno", "cubic"):
            raise TransportError(f"aioquic has no congestion control {self.arg!r} (reno, cubic)")

    def efficiency(self) -> float:
        return metrics.quic_efficiency(self.max_datagram_size)

    def options(self) -> list[str]:
        opts = ["--max-datagram-size", str(self.max_datagram_size)]
        return opts + (["--cc", self.arg] if self.arg else [])

    def describe(self) -> dict[str, Any]:
        return {
            "family": "quic",
            "cc": self.arg or "reno",
            "max_datagram_size": self.max_datagram_size,
        }


# ------------------------------------------------------------------------- VTL


@register
class VtlTransport(Transport):
    """VTL with the composition given after ``vtl:``."""

    prefix = "vtl"
    runner = "vtl.bench.vtl_runner"
    default_arg = DEFAULT_VTL
    separator = ":"

    def check(self) -> None:
        from vtl.core.composition import Composition
        from vtl.core.errors import VtlError

        try:
            Composition.parse(str(self.arg)).validate()
        except VtlError as exc:
            raise TransportError(f"bad VTL composition {self.arg!r}: {exc}") from exc

    @property
    def label(self) -> str:
        # "vtl:reliability=go-back-n(window=64) congestion=newreno"
        #   -> "vtl go-back-n(window=64)+newreno"
        parts = [tok.split("=", 1)[-1] for tok in _tokens(str(self.arg))]
        return "vtl " + "+".join(parts)

    def efficiency(self) -> float:
        from vtl.core.config import ConnectionConfig

        return metrics.vtl_efficiency(ConnectionConfig().max_datagram_size)

    def options(self) -> list[str]:
        return ["--composition", str(self.arg)]

    def describe(self) -> dict[str, Any]:
        return {"family": "vtl", "composition": self.arg}


# ---------------------------------------------------------------------- Hooker

#: the Hooker's composition when the name has none (``hooker``)
DEFAULT_HOOKER = "reliability=selective-repeat congestion=bbr"


@register
class HookerTransport(TcpTransport):
    """An unmodified kernel-TCP sender and receiver (the TCP runner, cubic on
    its sockets) whose connection the Hooker carries over VTL with the
    composition after ``hooker:`` (:mod:`vtl.bench.hooker_session`)."""

    prefix = "hooker"
    default_arg = DEFAULT_HOOKER
    separator = ":"
    session_overhead_s = 4.0  # start two daemons, read their status, stop them

    def check(self) -> None:
        VtlTransport(self.arg).check()

    @property
    def label(self) -> str:
        return "hooker " + VtlTransport(self.arg).label.removeprefix("vtl ")

    def efficiency(self) -> float:
        # what goes over the link is VTL datagrams
        return VtlTransport(self.arg).efficiency()

    def options(self) -> list[str]:
        return ["--cc", "cubic"]  # the app's own sockets; they only reach the local Hooker

    def describe(self) -> dict[str, Any]:
        return {"family": "hooker", "composition": self.arg, "cc": "cubic"}

    def session(self, net: Any) -> contextlib.AbstractContextManager[Any]:
        from vtl.bench.hooker_session import hooker_daemons

        return hooker_daemons(net.hosts["a"], net.hosts["b"], str(self.arg))

    def finish_record(self, rec: dict[str, Any], session: Any) -> None:
        if session is None:
            return
        if rec["workload"] == "bulk":
            payload, reverse = rec.get("size"), 0
        else:  # request/response: rec["bytes"] counts both directions
            plan = rec.get("rr") or {}
            payload, reverse = None, 0
            if rec.get("status") == "ok" and rec.get("bytes"):
                reverse = plan.get("count", 0) * plan.get("response", 0)
                payload = rec["bytes"] - reverse
        proof = session.proof(payload, reverse)
        rec["hooker"] = proof
        # the app's TCP_INFO describes its socket to the local Hooker, not
        # the link; the VTL carrier's send count is in rec["hooker"]
        rec["retrans_bytes"] = None
        rec["errors"].extend(proof.get("errors", []))
        if rec.get("status") == "ok" and not proof["carried_over_vtl"]:
            rec["status"] = "failed"
            rec["errors"].append(
                f"NOT CARRIED OVER VTL: the Hookers carried {proof['bytes_a_to_vtl']} bytes "
                f"a->b ({proof['bytes_fallback']} as plain TCP), payload {payload}"
            )


def _tokens(spec: str) -> list[str]:
    """Split a composition string at top-level spaces."""
    out, depth, cur = [], 0, []
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == " " and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [t for t in out if t]


__all__ = [
    "DEFAULT_TRANSPORTS",
    "QUICK_TRANSPORTS",
    "DEFAULT_HOOKER",
    "REFERENCE",
    "TRANSPORTS",
    "SessionError",
    "Transport",
    "TransportError",
    "Workload",
    "parse_transport",
    "register",
    "split_list",
]
