"""VTL wire format: encode and decode datagrams (see docs/wire-format.md).

Every datagram is one packet:

    common header (28 bytes) | header options (TLV) | body | CRC32C (4 bytes)

All integers are big-endian.  Sequence and packet numbers travel truncated to
32 bits and are expanded by the receiver against what it expects
(:func:`expand`), so the engine works on unbounded integers and wrap-around is
handled here, in one place.  Anything that does not parse raises
:class:`WireError` and nothing else, so the caller can count and drop it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from crc32c import crc32c

from vtl.core.errors import WireError

VERSION = 1

HEADER = struct.Struct("!BBBBQQIHH")  # version type flags reserved dcid scid pn optlen bodylen
HEADER_SIZE = HEADER.size  # 28
CRC = struct.Struct("!I")
CRC_SIZE = CRC.size
OVERHEAD = HEADER_SIZE + CRC_SIZE  # bytes of VTL framing in every datagram

DATA_PREFIX = struct.Struct("!II")  # seq, sender's una
DATA_OVERHEAD = OVERHEAD + DATA_PREFIX.size  # framing of one DATA packet (40 bytes)
ACK_FIXED = struct.Struct("!IIIIB")  # cum, window limit, largest pn, ack delay us, nranges
ACK_RANGE = struct.Struct("!II")  # start, end (exclusive)
ACK_MAX_RANGES = 32
REPAIR_FIXED = struct.Struct("!IBBBB")  # first seq, n source, m repair, index, scheme
CLOSE_BODY = struct.Struct("!II")  # final seq (exclusive), sender's una
ERROR_FIXED = struct.Struct("!HH")  # code, reason length
HS_TLV = struct.Struct("!HH")  # handshake body TLV: type, length
OPT_TLV = struct.Struct("!BB")  # header option TLV: type, length

U32 = 1 << 32
MAX_DATAGRAM = 65507


class PacketType(IntEnum):
    OFFER = 1
    ACCEPT = 2
    REFUSE = 3
    DATA = 4
    ACK = 5
    RECONFIGURE = 6
    CLOSE = 7
    RESET = 8
    PROBE = 9
    REPAIR = 10  # FEC repair symbol over a block of DATA packets
    FORWARD = 11  # partial reliability: the sender abandoned data (core/partial.py)


class DataFlags:
    """Header flags of a DATA packet."""

    MSG_START = 0x01  # first segment of a message
    MSG_END = 0x02  # last segment of a message


class AckFlags:
    """Header flags of an ACK packet."""

    CLOSE_ACKED = 0x01  # the peer's CLOSE has been received and all its data delivered
    HANDSHAKE_DONE = 0x02  # confirms the ACCEPT (third leg of the handshake)


class ForwardFlags:
    """Header flags of a FORWARD packet."""

    MESSAGES = 0x01  # records name messages (id = message number), else stream byte ranges


class HsFlags:
    """Header flags of ACCEPT / RECONFIGURE packets."""

    COUNTER_OFFER = 0x01  # ACCEPT carries a composition that was not in the offer


class OptionType(IntEnum):
    """Header options.  Types >= 0x80 are critical: a receiver that does not
    know a critical option must drop the packet; unknown others are skipped."""

    PADDING = 0x01
    TIMESTAMP = 0x02  # u64 microseconds, echoed for diagnostics
    FEC_LOSS = 0x03  # u16 on ACK: loss rate the receiver measures, in 1/65535
    CHECKSUM_COVERAGE = 0x81  # u16: CRC covers header + first N body bytes
    PEER_AUTH = 0x20  # initiator's Ed25519 key + transcript signature (security TF)


class HsField(IntEnum):
    """TLV fields of handshake and reconfiguration bodies."""

    COMPOSITIONS = 1  # JSON list of compositions (preferred first)
    INVENTORY = 2  # JSON {role: {name: [versions]}} of installed TFs
    INITIAL_SEQ = 3  # u32
    WINDOW = 4  # u32 receive window in segments
    MAX_DATAGRAM = 5  # u16
    IDLE_TIMEOUT_MS = 6  # u32
    CHOSEN = 7  # u8 index of the accepted offer, 255 = counter-offer
    RECONFIG_ID = 8  # u32
    SWITCH_SEQ = 9  # u32
    NONCE = 10  # u64, matches an ACCEPT to its OFFER
    RECONFIG_OP = 11  # u8: RECONFIGURE message kind (vtl.core.reconfig.Op)
    RECONFIG_ERROR = 12  # u16 code + UTF-8 reason: why a RECONFIGURE was refused
    RECONFIG_SEEN = 13  # u32: highest id of the receiver's requests the sender has seen
    KEY_SHARE = 20  # 32-byte X25519 ephemeral public key (security TF)
    IDENTITY = 21  # 32-byte Ed25519 static public key of the responder
    SIGNATURE = 22  # Ed25519 signature of the handshake transcript (last field)


@dataclass(slots=True)
class Packet:
    """A decoded packet.  ``body`` is the type-specific part, still raw."""

    type: PacketType
    dcid: int
    scid: int
    pn: int  # truncated 32-bit packet number as on the wire
    flags: int = 0
    body: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------- numbers


def expand(truncated: int, expected: int, bits: int = 32) -> int:
    """Expand a ``bits``-wide truncated number to the full value closest to
    ``expected`` (RFC 9000 appendix A.3, with a fixed window)."""
    win = 1 << bits
    hwin = win >> 1
    mask = win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate + win < (1 << 62):
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


# ---------------------------------------------------------------- encoding


def _finish(head: bytes, covered: int | None = None) -> bytes:
    return head + CRC.pack(crc32c(head if covered is None else head[:covered]))


def encode(
    ptype: int,
    dcid: int,
    scid: int,
    pn: int,
    body: bytes = b"",
    flags: int = 0,
    options: dict[int, bytes] | None = None,
) -> bytes:
    """Encode one packet; ``pn`` and all numbers are truncated as needed."""
    opts = b""
    if options:
        parts = []
        for otype, value in options.items():
            if len(value) > 255:
                raise WireError(f"option {otype} too long ({len(value)} bytes)")
            parts.append(OPT_TLV.pack(otype, len(value)) + value)
        opts = b"".join(parts)
    if len(body) + len(opts) + OVERHEAD > MAX_DATAGRAM:
        raise WireError("packet larger than a UDP datagram")
    head = HEADER.pack(VERSION, ptype, flags, 0, dcid, scid, pn % U32, len(opts), len(body))
    covered = None
    cov = options.get(OptionType.CHECKSUM_COVERAGE) if options else None
    if cov is not None and len(cov) == 2:  # as decode() checks it
        covered = HEADER_SIZE + len(opts) + int.from_bytes(cov, "big")
    return _finish(head + opts + body, covered)


def encode_data(
    dcid: int, scid: int, pn: int, seq: int, una: int, payload: bytes, flags: int = 0
) -> bytes:
    """Hot path: a DATA packet without options (one copy of the payload:
    the CRC runs incrementally over header and payload, then one join)."""
    head = _DATA_HEAD.pack(
        VERSION,
        _DATA,
        flags,
        0,
        dcid,
        scid,
        pn & _MASK32,
        0,
        DATA_PREFIX.size + len(payload),
        seq & _MASK32,
        una & _MASK32,
    )
    return b"".join((head, payload, _CRC_PACK(crc32c(payload, crc32c(head)))))


_DATA_HEAD = struct.Struct("!BBBBQQIHHII")  # HEADER + DATA_PREFIX in one pack
_DATA = int(PacketType.DATA)
_MASK32 = U32 - 1
_CRC_PACK = CRC.pack


def peek_dcid(datagram: bytes) -> int:
    """Destination connection ID, read without validating the packet."""
    if len(datagram) < OVERHEAD:
        raise WireError("datagram shorter than a header")
    return int.from_bytes(datagram[4:12], "big")


def decode(datagram: bytes | bytearray | memoryview) -> Packet:
    """Parse and verify one datagram; raise :class:`WireError` if it is not a
    valid VTL packet of a version we speak."""
    n = len(datagram)
    if n < OVERHEAD:
        raise WireError("datagram shorter than a header")
    version, raw_type, flags, _reserved, dcid, scid, pn, optlen, bodylen = HEADER.unpack_from(
        datagram, 0
    )
    ptype = raw_type
    if version != VERSION:
        raise WireError(f"unsupported version {version}", reason="version")
    if HEADER_SIZE + optlen + bodylen + CRC_SIZE != n:
        raise WireError("length fields do not match the datagram size")
    ptype = _TYPES.get(ptype)
    if ptype is None:
        raise WireError(f"unknown packet type {raw_type}", reason="type")
    options: dict[int, bytes] = {}
    if optlen:
        pos = HEADER_SIZE
        end = HEADER_SIZE + optlen
        while pos < end:
            if pos + 2 > end:
                raise WireError("truncated option")
            otype, olen = OPT_TLV.unpack_from(datagram, pos)
            pos += 2
            if pos + olen > end:
                raise WireError("option overruns the option area")
            options[otype] = bytes(datagram[pos : pos + olen])
            pos += olen
        for otype in options:
            if otype >= 0x80 and otype not in _KNOWN_OPTIONS:
                raise WireError(f"unknown critical option {otype}", reason="option")
    covered = n - CRC_SIZE
    cov = options.get(OptionType.CHECKSUM_COVERAGE)
    if cov is not None:
        if len(cov) != 2:
            raise WireError("bad checksum coverage option")
        covered = min(covered, HEADER_SIZE + optlen + int.from_bytes(cov, "big"))
    (crc,) = CRC.unpack_from(datagram, n - CRC_SIZE)
    if crc32c(memoryview(datagram)[:covered]) != crc:
        raise WireError("checksum mismatch", reason="checksum")
    start = HEADER_SIZE + optlen
    body = bytes(datagram[start : start + bodylen])
    return Packet(ptype, dcid, scid, pn, flags, body, options)


_KNOWN_OPTIONS = frozenset(int(o) for o in OptionType)
_TYPES = {int(t): t for t in PacketType}


# ---------------------------------------------------------------- bodies


@dataclass(slots=True)
class AckFrame:
    """Acknowledgement.  Numbers are truncated on the wire; the receiver of an
    ACK expands them with :func:`expand` against its own send state."""

    cum: int  # every segment below has been received (or abandoned by the sender)
    window_limit: int  # the sender may send segments below this
    largest_pn: int  # largest packet number received so far
    ack_delay_us: int  # time between receiving largest_pn and sending this ACK
    ranges: list[tuple[int, int]] = field(default_factory=list)  # SACK [start, end) above cum


def encode_ack(frame: AckFrame) -> bytes:
    ranges = frame.ranges[:ACK_MAX_RANGES]
    out = [
        ACK_FIXED.pack(
            frame.cum % U32,
            frame.window_limit % U32,
            frame.largest_pn % U32,
            min(frame.ack_delay_us, U32 - 1),
            len(ranges),
        )
    ]
    out.extend(ACK_RANGE.pack(s % U32, e % U32) for s, e in ranges)
    return b"".join(out)


def decode_ack(body: bytes) -> AckFrame:
    if len(body) < ACK_FIXED.size:
        raise WireError("ACK body too short")
    cum, limit, largest, delay, nranges = ACK_FIXED.unpack_from(body, 0)
    if len(body) != ACK_FIXED.size + nranges * ACK_RANGE.size:
        raise WireError("ACK range count does not match its length")
    ranges = [
        ACK_RANGE.unpack_from(body, ACK_FIXED.size + i * ACK_RANGE.size) for i in range(nranges)
    ]
    return AckFrame(cum, limit, largest, delay, ranges)


def decode_data(body: bytes) -> tuple[int, int, bytes]:
    """Return (truncated seq, truncated una, payload)."""
    if len(body) < DATA_PREFIX.size:
        raise WireError("DATA body too short")
    seq, una = DATA_PREFIX.unpack_from(body, 0)
    return seq, una, body[DATA_PREFIX.size :]


@dataclass(slots=True)
class RepairFrame:
    """Body of a REPAIR packet (see docs/wire-format.md)."""

    first_seq: int  # truncated sequence number of the block's first DATA packet
    n: int  # DATA packets in the block (1..255)
    m: int  # repair packets of the block (1..255)
    index: int  # this repair's index, 0..m-1
    scheme: int  # 1 XOR, 2 Reed-Solomon
    symbol: bytes  # repair symbol, as long as the block's longest source symbol


def encode_repair(frame: RepairFrame) -> bytes:
    return (
        REPAIR_FIXED.pack(frame.first_seq % U32, frame.n, frame.m, frame.index, frame.scheme)
        + frame.symbol
    )


def decode_repair(body: bytes) -> RepairFrame:
    if len(body) < REPAIR_FIXED.size + 3:
        raise WireError("REPAIR body too short")
    first, n, m, index, scheme = REPAIR_FIXED.unpack_from(body, 0)
    if n == 0 or m == 0 or index >= m or n + m > 256:
        raise WireError("REPAIR block geometry out of range")
    return RepairFrame(first, n, m, index, scheme, body[REPAIR_FIXED.size :])


FORWARD_FIXED = struct.Struct("!IH")  # new cumulative point, record count
FORWARD_RECORD = struct.Struct("!IIQI")  # start seq, end seq (exclusive), id, bytes


def encode_forward(new_cum: int, records: list[tuple[int, int, int, int]]) -> bytes:
    """Body of FORWARD: everything below ``new_cum`` is received or abandoned;
    ``records`` (start, end, id, bytes) describe the abandoned units."""
    out = [FORWARD_FIXED.pack(new_cum % U32, len(records))]
    out.extend(FORWARD_RECORD.pack(s % U32, e % U32, i % (1 << 64), b) for s, e, i, b in records)
    return b"".join(out)


def decode_forward(body: bytes) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Return (truncated new cum, [(truncated start, truncated end, id, bytes)])."""
    if len(body) < FORWARD_FIXED.size:
        raise WireError("FORWARD body too short")
    cum, n = FORWARD_FIXED.unpack_from(body, 0)
    if len(body) != FORWARD_FIXED.size + n * FORWARD_RECORD.size:
        raise WireError("FORWARD record count does not match its length")
    recs = [
        FORWARD_RECORD.unpack_from(body, FORWARD_FIXED.size + i * FORWARD_RECORD.size)
        for i in range(n)
    ]
    return cum, recs


def encode_close(final_seq: int, una: int) -> bytes:
    return CLOSE_BODY.pack(final_seq % U32, una % U32)


def decode_close(body: bytes) -> tuple[int, int]:
    """Return (truncated final seq, truncated una)."""
    if len(body) != CLOSE_BODY.size:
        raise WireError("bad CLOSE body")
    return CLOSE_BODY.unpack(body)


def encode_error(code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8")[:1024]
    return ERROR_FIXED.pack(code, len(raw)) + raw


def decode_error(body: bytes) -> tuple[int, str]:
    """Body of REFUSE and RESET: an error code and a human-readable reason."""
    if len(body) < ERROR_FIXED.size:
        raise WireError("error body too short")
    code, rlen = ERROR_FIXED.unpack_from(body, 0)
    if len(body) != ERROR_FIXED.size + rlen:
        raise WireError("error reason length mismatch")
    return code, body[ERROR_FIXED.size :].decode("utf-8", errors="replace")


def encode_fields(fields: dict[int, bytes]) -> bytes:
    """Body of OFFER / ACCEPT / RECONFIGURE: a list of TLV fields."""
    out = []
    for ftype, value in fields.items():
        if len(value) > 0xFFFF:
            raise WireError(f"handshake field {ftype} too long")
        out.append(HS_TLV.pack(ftype, len(value)) + value)
    return b"".join(out)


def decode_fields(body: bytes) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    n = len(body)
    while pos < n:
        if pos + HS_TLV.size > n:
            raise WireError("truncated handshake field")
        ftype, flen = HS_TLV.unpack_from(body, pos)
        pos += HS_TLV.size
        if pos + flen > n:
            raise WireError("handshake field overruns the body")
        fields[ftype] = body[pos : pos + flen]
        pos += flen
    return fields


def field_int(fields: dict[int, bytes], ftype: int, size: int, default: int | None = None) -> int:
    """Read a fixed-size unsigned integer field, with a default if absent."""
    raw = fields.get(ftype)
    if raw is None:
        if default is None:
            raise WireError(f"missing handshake field {HsField(ftype).name}")
        return default
    if len(raw) != size:
        raise WireError(f"handshake field {HsField(ftype).name} has the wrong size")
    return int.from_bytes(raw, "big")


def field_json(fields: dict[int, bytes], ftype: int, default=None):
    """Read a JSON field; malformed JSON is a :class:`WireError`."""
    raw = fields.get(ftype)
    if raw is None:
        if default is None:
            raise WireError(f"missing handshake field {HsField(ftype).name}")
        return default
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        raise WireError(f"handshake field {HsField(ftype).name} is not valid JSON") from exc


def to_json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
