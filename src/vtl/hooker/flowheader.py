"""The per-flow header a Hooker sends first on a carrier stream, and the reply.

The peer Hooker must learn which TCP connection a carrier stream stands for
(the application's original client and server addresses) before it can
connect to the real server, and the initiating Hooker must learn whether that
worked before it lets the application's bytes through: a refused connect has
to reach the application as a reset, as it would have without the Hooker.

Wire format (network byte order)::

    FlowHeader:  "VTLH" | version u8 | family u8 (4 or 6) | flags u16 (0)
                 | client port u16 | server port u16 | client ip | server ip
    FlowReply:   "VTLR" | version u8 | status u8

Decoding is strict: anything malformed raises :class:`FlowHeaderError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

VERSION = 1
HEADER_MAGIC = b"VTLH"
REPLY_MAGIC = b"VTLR"
_FIXED = struct.Struct("!4sBBHHH")  # magic, version, family, flags, client port, server port
#: bytes to read before the header's total length is known
HEADER_PREFIX_LEN = _FIXED.size
_REPLY = struct.Struct("!4sBB")
REPLY_LEN = _REPLY.size
_IP_LEN = {4: 4, 6: 16}

Address = tuple[str, int]


class FlowHeaderError(ValueError):
    """A flow header or reply that is not valid."""


class FlowStatus(IntEnum):
    """What the peer Hooker reports after trying to reach the server."""

    OK = 0
    REFUSED = 1  # the server refused the connection or is unreachable
    TIMEOUT = 2  # the server did not answer in time
    POLICY = 3  # the peer Hooker does not allow this flow


def _ip(host: str, family: int, what: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except (ValueError, TypeError) as exc:
        raise FlowHeaderError(f"{what}: not an IP address: {host!r}") from exc
    if ip.version != family:
        raise FlowHeaderError(f"{what}: {host} is not IPv{family}")
    return ip.packed


def _port(port: object, what: str) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise FlowHeaderError(f"{what}: bad port {port!r}")
    return port


@dataclass(frozen=True)
class FlowHeader:
    """The original addresses of one hooked TCP connection."""

    client: Address
    server: Address

    @property
    def family(self) -> int:
        """4 or 6 (both addresses must be of the same family)."""
        try:
            return ipaddress.ip_address(self.server[0]).version
        except ValueError as exc:
            raise FlowHeaderError(f"server: not an IP address: {self.server[0]!r}") from exc

    def encode(self) -> bytes:
        if len(self.client) < 2 or len(self.server) < 2:
            raise FlowHeaderError("addresses must be (ip, port)")
        fam = self.family
        cport = _port(self.client[1], "client")
        sport = _port(self.server[1], "server")
        return (
            _FIXED.pack(HEADER_MAGIC, VERSION, fam, 0, cport, sport)
            + _ip(self.client[0], fam, "client")
            + _ip(self.server[0], fam, "server")
        )

    @staticmethod
    def total_length(prefix: bytes) -> int:
        """Length of the whole header, from its first :data:`HEADER_PREFIX_LEN` bytes."""
        if len(prefix) < HEADER_PREFIX_LEN:
            raise FlowHeaderError(f"flow header truncated ({len(prefix)} bytes)")
        magic, version, fam, flags, _, _ = _FIXED.unpack_from(prefix)
        if magic != HEADER_MAGIC:
            raise FlowHeaderError(f"bad flow header magic {magic!r}")
        if version != VERSION:
            raise FlowHeaderError(f"unsupported flow header version {version}")
        if fam not in _IP_LEN:
            raise FlowHeaderError(f"bad address family {fam}")
        if flags:
            raise FlowHeaderError(f"unknown flow header flags {flags:#x}")
        return HEADER_PREFIX_LEN + 2 * _IP_LEN[fam]

    @classmethod
    def decode(cls, data: bytes) -> FlowHeader:
        """Exactly one header (no trailing bytes)."""
        data = bytes(data)
        need = cls.total_length(data)
        if len(data) != need:
            raise FlowHeaderError(f"flow header is {len(data)} bytes, expected {need}")
        _, _, fam, _, cport, sport = _FIXED.unpack_from(data)
        if not cport or not sport:
            raise FlowHeaderError("port 0 in flow header")
        n = _IP_LEN[fam]
        cip = ipaddress.ip_address(data[HEADER_PREFIX_LEN : HEADER_PREFIX_LEN + n])
        sip = ipaddress.ip_address(data[HEADER_PREFIX_LEN + n :])
        if sip.is_unspecified or sip.is_multicast:
            raise FlowHeaderError(f"server address {sip} cannot be connected to")
        return cls((str(cip), cport), (str(sip), sport))


def encode_reply(status: FlowStatus) -> bytes:
    return _REPLY.pack(REPLY_MAGIC, VERSION, int(FlowStatus(status)))


def decode_reply(data: bytes) -> FlowStatus:
    if len(data) != REPLY_LEN:
        raise FlowHeaderError(f"flow reply is {len(data)} bytes, expected {REPLY_LEN}")
    magic, version, status = _REPLY.unpack(bytes(data))
    if magic != REPLY_MAGIC:
        raise FlowHeaderError(f"bad flow reply magic {magic!r}")
    if version != VERSION:
        raise FlowHeaderError(f"unsupported flow reply version {version}")
    try:
        return FlowStatus(status)
    except ValueError as exc:
        raise FlowHeaderError(f"unknown flow status {status}") from exc


__all__ = [
    "HEADER_PREFIX_LEN",
    "REPLY_LEN",
    "VERSION",
    "FlowHeader",
    "FlowHeaderError",
    "FlowStatus",
    "decode_reply",
    "encode_reply",
]
