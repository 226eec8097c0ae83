"""Wire format: round trips of every packet type and body codec, number
expansion, and robustness of the decoders against arbitrary input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from crc32c import crc32c
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from vtl.core import wire
from vtl.core.errors import WireError
from vtl.core.ranges import RangeSet
from vtl.core.wire import (
    HEADER_SIZE,
    MAX_DATAGRAM,
    OVERHEAD,
    U32,
    AckFrame,
    HsField,
    OptionType,
    PacketType,
)

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, U32 - 1)
u64 = st.integers(0, (1 << 64) - 1)
big = st.integers(0, 1 << 62)  # full (unbounded) engine numbers
packet_types = st.sampled_from(list(PacketType))
known_noncritical = st.sampled_from([OptionType.PADDING, OptionType.TIMESTAMP])
unknown_noncritical = st.integers(0, 0x7F).filter(lambda o: o not in (1, 2))
unknown_critical = st.integers(0x80, 0xFF).filter(lambda o: o != OptionType.CHECKSUM_COVERAGE)
bodies = st.binary(max_size=3000)


NONCRITICAL = st.one_of(known_noncritical, unknown_noncritical)


def options_strategy(kinds=NONCRITICAL):
    return st.dictionaries(kinds, st.binary(max_size=40), max_size=4)


# ============================================================ header


def test_header_layout_matches_the_documentation() -> None:
    d = wire.encode(
        PacketType.ACK, 0x0102030405060708, 0x1112131415161718, 0x2122232425, b"BODY", 0x5A
    )
    assert len(d) == HEADER_SIZE + 4 + 4 == OVERHEAD + 4
    assert d[0] == wire.VERSION == 1
    assert d[1] == PacketType.ACK == 5
    assert d[2] == 0x5A  # flags
    assert d[3] == 0  # reserved
    assert d[4:12] == bytes.fromhex("0102030405060708")  # destination connection ID
    assert d[12:20] == bytes.fromhex("1112131415161718")  # source connection ID
    assert d[20:24] == bytes.fromhex("22232425")  # packet number, truncated to 32 bits
    assert d[24:26] == b"\0\0"  # option bytes
    assert d[26:28] == b"\0\4"  # body bytes
    assert d[28:32] == b"BODY"
    assert d[32:] == struct.pack("!I", crc32c(d[:32]))
    assert wire.peek_dcid(d) == 0x0102030405060708


@given(packet_types, u64, u64, big, u8, bodies, options_strategy())
def test_packet_round_trip(ptype, dcid, scid, pn, flags, body, options) -> None:
    datagram = wire.encode(ptype, dcid, scid, pn, body, flags, options)
    assert len(datagram) == OVERHEAD + len(body) + sum(2 + len(v) for v in options.values())
    p = wire.decode(datagram)
    assert (p.type, p.dcid, p.scid, p.pn, p.flags, p.body) == (
        ptype,
        dcid,
        scid,
        pn % U32,
        flags,
        body,
    )
    assert p.options == options  # unknown non-critical options are carried, not fatal
    assert wire.decode(bytearray(datagram)) == p
    assert wire.decode(memoryview(datagram)) == p


@given(packet_types, u64, u64, u32, bodies, unknown_critical, st.binary(max_size=8))
def test_unknown_critical_option_rejected(ptype, dcid, scid, pn, body, otype, value) -> None:
    datagram = wire.encode(ptype, dcid, scid, pn, body, 0, {otype: value})
    with pytest.raises(WireError) as info:
        wire.decode(datagram)
    assert info.value.reason == "option"


def test_header_errors_have_reasons() -> None:
    good = wire.encode(PacketType.PROBE, 1, 2, 3)
    cases = {
        "version": bytes([2]) + good[1:],
        "type": good[:1] + bytes([99]) + good[2:],
        "checksum": good[:-1] + bytes([good[-1] ^ 1]),
        "malformed": good[:-1],
    }
    for reason, datagram in cases.items():
        if reason in ("version", "type"):  # re-checksum so only the field is wrong
            datagram = datagram[:-4] + struct.pack("!I", crc32c(datagram[:-4]))
        with pytest.raises(WireError) as info:
            wire.decode(datagram)
        assert info.value.reason == reason, reason
    with pytest.raises(WireError):
        wire.peek_dcid(b"short")


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(WireError):
        wire.encode(PacketType.DATA, 1, 2, 3, bytes(MAX_DATAGRAM))
    with pytest.raises(WireError):
        wire.encode(PacketType.DATA, 1, 2, 3, b"", 0, {OptionType.PADDING: bytes(256)})
    with pytest.raises(WireError):
        wire.encode_fields({HsField.INVENTORY: bytes(0x10000)})


# ======================================================== checksums


@given(packet_types, u64, u64, u32, st.binary(min_size=0, max_size=1500), st.data())
def test_single_bit_flip_always_detected(ptype, dcid, scid, pn, body, data) -> None:
    datagram = wire.encode(ptype, dcid, scid, pn, body)
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    flipped = bytearray(datagram)
    flipped[bit >> 3] ^= 1 << (bit & 7)
    with pytest.raises(WireError):
        wire.decode(bytes(flipped))


@given(st.binary(min_size=1, max_size=1500), st.data())
def test_double_and_triple_bit_flips_detected(body, data) -> None:
    datagram = wire.encode_data(7, 8, 9, 10, 11, body)
    nbits = len(datagram) * 8
    bits = data.draw(st.lists(st.integers(0, nbits - 1), min_size=2, max_size=3, unique=True))
    flipped = bytearray(datagram)
    for bit in bits:
        flipped[bit >> 3] ^= 1 << (bit & 7)
    with pytest.raises(WireError):
        wire.decode(bytes(flipped))


@given(st.binary(min_size=10, max_size=500), st.data())
def test_checksum_coverage_option(body, data) -> None:
    covered = data.draw(st.integers(0, len(body) - 1))
    value = covered.to_bytes(2, "big")
    datagram = wire.encode(PacketType.DATA, 1, 2, 3, body, 0, {OptionType.CHECKSUM_COVERAGE: value})
    start = HEADER_SIZE + 4  # header + the 4-byte option
    assert datagram[-4:] == struct.pack("!I", crc32c(datagram[: start + covered]))
    p = wire.decode(datagram)
    assert p.body == body and p.options == {OptionType.CHECKSUM_COVERAGE: value}
    # damage beyond the covered part goes unnoticed (that is the point) ...
    pos = data.draw(st.integers(start + covered, start + len(body) - 1))
    damaged = bytearray(datagram)
    damaged[pos] ^= 0xFF
    assert wire.decode(bytes(damaged)).body != body
    # ... damage inside it does not
    pos = data.draw(st.integers(0, start + covered - 1))
    damaged = bytearray(datagram)
    damaged[pos] ^= 0x01
    with pytest.raises(WireError):
        wire.decode(bytes(damaged))
    # a coverage beyond the packet covers the whole packet
    whole = wire.encode(
        PacketType.DATA, 1, 2, 3, body, 0, {OptionType.CHECKSUM_COVERAGE: b"\xff\xff"}
    )
    assert wire.decode(whole).body == body


def test_checksum_coverage_option_must_be_two_bytes() -> None:
    d = wire.encode(PacketType.PROBE, 1, 2, 3, b"", 0, {OptionType.CHECKSUM_COVERAGE: b"\0"})
    with pytest.raises(WireError):
        wire.decode(d)


# ============================================================ bodies


@given(big, big, st.binary(max_size=1500), u8)
def test_data_round_trip(seq, una, payload, flags) -> None:
    d = wire.encode_data(5, 6, 7, seq, una, payload, flags)
    p = wire.decode(d)
    assert p.type is PacketType.DATA and p.flags == flags and not p.options
    assert wire.decode_data(p.body) == (seq % U32, una % U32, payload)


@given(big, big, big, st.integers(0, 1 << 40), st.lists(st.tuples(big, big), max_size=40))
def test_ack_round_trip(cum, limit, largest, delay, ranges) -> None:
    frame = AckFrame(cum, limit, largest, delay, ranges)
    body = wire.encode_ack(frame)
    back = wire.decode_ack(body)
    assert back.cum == cum % U32 and back.window_limit == limit % U32
    assert back.largest_pn == largest % U32
    assert back.ack_delay_us == min(delay, U32 - 1)
    assert back.ranges == [(s % U32, e % U32) for s, e in ranges[: wire.ACK_MAX_RANGES]]
    assert len(body) == 17 + 8 * min(len(ranges), 32)


@given(st.binary(max_size=400))
def test_ack_length_must_match_range_count(body) -> None:
    try:
        frame = wire.decode_ack(body)
    except WireError:
        return
    assert len(body) == 17 + 8 * len(frame.ranges)


@given(big, big)
def test_close_round_trip(final, una) -> None:
    body = wire.encode_close(final, una)
    assert len(body) == 8
    assert wire.decode_close(body) == (final % U32, una % U32)


@pytest.mark.parametrize("size", [0, 4, 7, 9, 16])
def test_close_body_must_be_eight_bytes(size: int) -> None:
    with pytest.raises(WireError):
        wire.decode_close(bytes(size))


@given(u16, st.text(max_size=600))
def test_error_body_round_trip(code, reason) -> None:
    body = wire.encode_error(code, reason)
    got_code, got_reason = wire.decode_error(body)
    assert got_code == code
    raw = reason.encode("utf-8")
    if len(raw) <= 1024:
        assert got_reason == reason
    else:  # cut at 1024 bytes, a split character is replaced
        assert raw[:1024].decode("utf-8", errors="replace") == got_reason


def test_error_reason_invalid_utf8_is_replaced() -> None:
    assert wire.decode_error(b"\0\1\0\2\xff\xfe") == (1, "\ufffd\ufffd")
    with pytest.raises(WireError):
        wire.decode_error(b"\0\1\0\5abc")


@given(st.dictionaries(u16, st.binary(max_size=300), max_size=12))
def test_handshake_fields_round_trip(fields) -> None:
    assert wire.decode_fields(wire.encode_fields(fields)) == fields


def test_handshake_field_accessors() -> None:
    fields = {
        HsField.INITIAL_SEQ: (0xFFFFFFFE).to_bytes(4, "big"),
        HsField.MAX_DATAGRAM: (1200).to_bytes(2, "big"),
        HsField.COMPOSITIONS: wire.to_json([{"reliability": {"name": "none"}}]),
        HsField.INVENTORY: b"{not json",
        HsField.WINDOW: b"\0\0",  # wrong size
        HsField.NONCE: b"[" * 50_000,  # nesting deep enough to overflow the parser
    }
    decoded = wire.decode_fields(wire.encode_fields(fields))
    assert wire.field_int(decoded, HsField.INITIAL_SEQ, 4) == 0xFFFFFFFE
    assert wire.field_int(decoded, HsField.MAX_DATAGRAM, 2, default=1) == 1200
    assert wire.field_int(decoded, HsField.IDLE_TIMEOUT_MS, 4, default=7) == 7
    assert wire.field_json(decoded, HsField.COMPOSITIONS) == [{"reliability": {"name": "none"}}]
    for call in (
        lambda: wire.field_int(decoded, HsField.WINDOW, 4),
        lambda: wire.field_int(decoded, HsField.CHOSEN, 1),  # missing, no default
        lambda: wire.field_json(decoded, HsField.INVENTORY),
        lambda: wire.field_json(decoded, HsField.NONCE),
        lambda: wire.field_json(decoded, HsField.RECONFIG_ID),
    ):
        with pytest.raises(WireError):
            call()


def test_to_json_is_canonical() -> None:
    assert wire.to_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


# ========================================================= expansion


#: expand() keeps results below 2**62 (RFC 9000's ceiling); engine numbers never get near it
expandable = st.integers(0, (1 << 62) - U32 - 1)


@given(expandable, st.integers(-(2**31) + 1, 2**31 - 1))
@example(0, 0)
@example(2**32, -(2**31) + 1)
@example(2**32 - 1, 2**31 - 1)
def test_expand_recovers_any_value_near_the_expected_one(value, offset) -> None:
    expected = value + offset
    assume(expected >= 0)
    assert wire.expand(value % U32, expected) == value


@given(u32, expandable)
def test_expand_lands_within_half_a_window(truncated, expected) -> None:
    v = wire.expand(truncated, expected)
    assert v % U32 == truncated and v >= 0
    assert abs(v - expected) <= 2**31 or v < U32  # only clamped near zero


# ====================================================== robustness


DECODERS = [
    wire.decode,
    wire.decode_ack,
    wire.decode_data,
    wire.decode_close,
    wire.decode_error,
    wire.decode_fields,
    wire.peek_dcid,
]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_error(data) -> None:
    for decoder in DECODERS:
        with contextlib.suppress(WireError):
            decoder(data)


def fix_crc(datagram: bytearray) -> bytes:
    datagram[-4:] = struct.pack("!I", crc32c(bytes(datagram[:-4])))
    return bytes(datagram)


@st.composite
def mutated_packets(draw):
    ptype = draw(packet_types)
    if ptype is PacketType.ACK:
        body = wire.encode_ack(
            AckFrame(
                *draw(st.tuples(u32, u32, u32, u32)),
                draw(st.lists(st.tuples(u32, u32), max_size=4)),
            )
        )
    elif ptype in (PacketType.OFFER, PacketType.ACCEPT):
        body = wire.encode_fields(
            draw(st.dictionaries(st.sampled_from(list(HsField)), st.binary(max_size=20)))
        )
    elif ptype is PacketType.CLOSE:
        body = wire.encode_close(draw(u32), draw(u32))
    elif ptype in (PacketType.RESET, PacketType.REFUSE):
        body = wire.encode_error(draw(u16), draw(st.text(max_size=20)))
    else:
        body = draw(bodies)
    datagram = bytearray(
        wire.encode(
            ptype, draw(u64), draw(u64), draw(u32), body, draw(u8), draw(options_strategy())
        )
    )
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "cut", "extend", "splice"]))
        if kind == "flip" and datagram:
            bit = draw(st.integers(0, len(datagram) * 8 - 1))
            datagram[bit >> 3] ^= 1 << (bit & 7)
        elif kind == "byte" and datagram:
            datagram[draw(st.integers(0, len(datagram) - 1))] = draw(u8)
        elif kind == "cut":
            del datagram[draw(st.integers(0, len(datagram))) :]
        elif kind == "extend":
            datagram += draw(st.binary(min_size=1, max_size=20))
        elif kind == "splice" and datagram:
            pos = draw(st.integers(0, len(datagram) - 1))
            datagram[pos : pos + 2] = draw(st.binary(max_size=4))
    if draw(st.booleans()) and len(datagram) >= 4:
        return fix_crc(datagram)  # reach the structural checks behind the CRC
    return bytes(datagram)


@settings(max_examples=500)
@given(mutated_packets())
def test_mutated_packets_raise_only_wire_error(datagram) -> None:
    try:
        p = wire.decode(datagram)
    except WireError:
        return
    for decoder in DECODERS[1:-1]:  # every body codec on whatever body it has
        with contextlib.suppress(WireError):
            decoder(p.body)
    try:
        fields = wire.decode_fields(p.body)
    except WireError:
        return
    for ftype in HsField:
        with contextlib.suppress(WireError):
            wire.field_int(fields, ftype, 4, default=0)
        with contextlib.suppress(WireError):
            wire.field_json(fields, ftype, default=[])


# ============================================================ ranges


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=40), st.integers(0, 230)
)
def test_rangeset_matches_a_set(adds, cut) -> None:
    rs, model = RangeSet(), set()
    for start, length in adds:
        new = rs.add(start, start + length)
        fresh = set(range(start, start + length)) - model
        assert {x for a, b in new for x in range(a, b)} == fresh
        model |= fresh
    ranges = rs.ranges()
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))  # disjoint, merged
    assert {x for a, b in ranges for x in range(a, b)} == model
    assert rs.first() == (ranges[0] if ranges else None)
    assert rs.last() == (ranges[-1] if ranges else None)
    rs.remove_below(cut)
    model = {x for x in model if x >= cut}
    assert {x for a, b in rs for x in range(a, b)} == model
    assert all((x in rs) == (x in model) for x in range(0, 240))
