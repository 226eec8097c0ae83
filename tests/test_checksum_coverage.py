"""Partial checksum coverage (integrity TF ``partial``, UDP-Lite semantics)
over the simulated network: damage past the covered bytes is delivered,
damage inside them is dropped and resent, full coverage never delivers
damage, and the receiver refuses coverage it did not agree to."""

from __future__ import annotations

import pytest

from vtl.core import wire
from vtl.core.composition import Composition, TFSpec, _check_compatible
from vtl.core.coverage import OPTION_SIZE, encode_data_covered
from vtl.core.errors import CompositionError
from vtl.core.wire import DATA_OVERHEAD, PacketType
from vtl.sim import LinkConditions
from vtl.sim.harness import ADDR_A, ADDR_B, run_transfer

COVERAGE = 100
#: first payload byte of a DATA packet carrying the coverage option
PAYLOAD_AT = wire.HEADER_SIZE + OPTION_SIZE + wire.DATA_PREFIX.size
DATA = bytes(range(256)) * 400


def transfer(comp: str, where: tuple[int, int], seed: int = 0):
    return run_transfer(
        comp,
        data_ab=DATA,
        forward=LinkConditions(delay=0.005, corrupt=0.1, corrupt_range=where),
        backward=LinkConditions(delay=0.005),
        seed=seed,
        timeout=60.0,
    )


def corrupted(result) -> int:
    return result.net.stats(ADDR_A, ADDR_B).corrupted


@pytest.mark.parametrize("seed", [0, 1])
def test_damage_past_coverage_is_delivered(seed: int) -> None:
    where = (PAYLOAD_AT + COVERAGE + 20, -4)
    result = transfer(f"integrity=partial(coverage={COVERAGE})", where, seed)
    assert result.clean and corrupted(result) > 0
    got = result.b.data
    assert len(got) == len(DATA) and got != DATA
    mss = 1452 - DATA_OVERHEAD - OPTION_SIZE
    for start in range(0, len(DATA), mss):  # the covered bytes of each segment are intact
        assert got[start : start + COVERAGE + 20] == DATA[start : start + COVERAGE + 20]
    assert result.a.stats["retransmissions"] == 0
    assert result.b.endpoint["drops"].get("checksum", 0) == 0


def test_damage_inside_coverage_is_dropped_and_resent() -> None:
    where = (PAYLOAD_AT, PAYLOAD_AT + COVERAGE)
    result = transfer(f"integrity=partial(coverage={COVERAGE})", where)
    assert result.clean and corrupted(result) > 0
    assert result.b.data == DATA
    assert result.b.endpoint["drops"]["checksum"] == corrupted(result)
    assert result.a.stats["retransmissions"] > 0


def test_coverage_zero_protects_header_and_prefix() -> None:
    """coverage=0: sequence numbers are still protected (damage there drops)."""
    result = transfer("integrity=partial(coverage=0)", (wire.HEADER_SIZE, PAYLOAD_AT))
    assert result.clean and corrupted(result) > 0 and result.b.data == DATA


def test_full_coverage_never_delivers_damage() -> None:
    where = (PAYLOAD_AT + COVERAGE + 20, -4)
    result = transfer("integrity=crc32c", where)
    assert result.clean and corrupted(result) > 0
    assert result.b.data == DATA
    assert result.b.endpoint["drops"]["checksum"] == corrupted(result)


def test_partial_coverage_keeps_datagrams_within_the_limit() -> None:
    result = run_transfer("integrity=partial", data_ab=DATA)
    assert result.clean and result.b.data == DATA
    assert result.a.stats["bytes_sent"] <= 1452 * result.a.stats["packets_sent"]
    segments = result.a.stats["data_packets_sent"]
    assert segments == -(-len(DATA) // (1452 - DATA_OVERHEAD - OPTION_SIZE))


class CoverAll:
    """Rewrites A's DATA packets to carry a coverage option (of ``cov``
    payload bytes) the connection did not negotiate."""

    def __init__(self, inner, cov: int) -> None:
        self.inner = inner
        self.cov = cov

    def receive(self, datagram: bytes, addr, now: float) -> None:
        self.inner.receive(datagram, addr, now)

    def datagrams_to_send(self, now: float):
        out = []
        for datagram, addr in self.inner.datagrams_to_send(now):
            p = wire.decode(datagram)
            if p.type is PacketType.DATA:
                seq, una, payload = wire.decode_data(p.body)
                datagram = encode_data_covered(
                    p.dcid, p.scid, p.pn, seq, una, payload, p.flags, self.cov
                )
            out.append((datagram, addr))
        return out

    def next_timer(self):
        return self.inner.next_timer()

    def handle_timer(self, now: float) -> None:
        self.inner.handle_timer(now)


@pytest.mark.parametrize(
    ("comp", "cov"), [("integrity=crc32c", 1000), ("integrity=partial(coverage=200)", 100)]
)
def test_unnegotiated_or_too_small_coverage_is_refused(comp: str, cov: int) -> None:
    result = run_transfer(
        comp,
        data_ab=b"x" * 5000,
        wrap_a=lambda ep: CoverAll(ep, cov),
        timeout=3.0,
    )
    assert result.b.data == b""
    assert result.b.stats["dropped_invalid"] > 0


def test_partial_coverage_and_encryption_are_incompatible() -> None:
    comp = Composition((TFSpec("integrity", "partial"), TFSpec("security", "aead")))
    with pytest.raises(CompositionError, match="integrity=partial.*security"):
        _check_compatible(comp)
    _check_compatible(Composition((TFSpec("integrity", "crc32c"), TFSpec("security", "aead"))))
    _check_compatible(Composition((TFSpec("integrity", "partial"),)))


def test_default_integrity_is_left_out_of_compositions() -> None:
    plain = Composition.parse("reliability=selective-repeat")
    assert "integrity" not in plain.to_dict()
    assert Composition.parse("integrity=crc32c") == Composition.parse("")
    assert plain["integrity"].name == "crc32c"
    part = Composition.parse("integrity=partial(coverage=8)")
    assert part.to_dict()["integrity"] == {"name": "partial", "coverage": "8"}
    with pytest.raises(CompositionError):
        Composition.parse("integrity=partial(coverage=-1)").validate()


def test_partially_covered_offer_is_refused() -> None:
    from vtl.core.config import ConnectionConfig
    from vtl.core.connection import Connection
    from vtl.core.endpoint import EndpointCore
    from vtl.core.wire import OptionType

    client = Connection(is_client=True, offers=[Composition.parse("integrity=partial")])
    client.connect(0.0)
    offer = wire.decode(client.datagrams_to_send(0.0)[0])
    forged = wire.encode(
        PacketType.OFFER, 0, offer.scid, offer.pn, offer.body,
        options={OptionType.CHECKSUM_COVERAGE: (0).to_bytes(2, "big")},
    )  # fmt: skip
    server = EndpointCore(ConnectionConfig(), listen=True)
    server.receive(forged, ADDR_A, 0.0)
    assert server.drops["malformed_offer"] == 1 and not server.connections
