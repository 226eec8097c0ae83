"""security=aead: key exchange in the handshake, AEAD per packet, replay
protection and trust decisions, on the simulated network (deterministic)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from crc32c import crc32c
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.endpoint import EndpointCore
from vtl.core.errors import ErrorCode
from vtl.core.events import HandshakeFailed
from vtl.core.protection import TAG_SIZE, PacketProtection, ProtectionDrop, ReplayWindow
from vtl.core.registry import Registry
from vtl.core.secure_handshake import SecurityConfig, key_text, public_bytes
from vtl.core.wire import CRC, HEADER_SIZE, PacketType
from vtl.sim.harness import Transfer, TransferResult, run_transfer
from vtl.sim.network import LinkConditions
from vtl.tfs import register_builtins

SERVER = Ed25519PrivateKey.generate()
CLIENT = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
SECRET = b"TOP-SECRET-PAYLOAD:"  # recognisable plaintext
DATA = SECRET * 30_000  # ~570 KB
AEAD = Composition.parse("security=aead")


def cfg(seed: int, security: SecurityConfig | None = None, **kw) -> ConnectionConfig:
    return ConnectionConfig(rng=random.Random(seed), security=security, **kw)


def client(trust=(SERVER,), identity=None) -> SecurityConfig:
    return SecurityConfig(identity, frozenset(public_bytes(k) for k in trust))


def server(identity=SERVER, trust=()) -> SecurityConfig:
    return SecurityConfig(identity, frozenset(public_bytes(k) for k in trust))


def secure_run(offers, *, config_a=None, config_b=None, **kw) -> TransferResult:
    return run_transfer(
        offers,
        config_a=config_a or cfg(1, client()),
        config_b=config_b or cfg(2, server()),
        **kw,
    )


class Tap:
    """Node wrapper: ``hook(datagram) -> list of datagrams`` decides what the
    wrapped endpoint receives (drop, rewrite, duplicate, replay)."""

    def __init__(self, inner: EndpointCore, hook: Callable[[bytes], list[bytes]]) -> None:
        self.inner = inner
        self.hook = hook

    def receive(self, datagram: bytes, addr, now: float) -> None:
        for d in self.hook(datagram):
            self.inner.receive(d, addr, now)

    def datagrams_to_send(self, now: float):
        return self.inner.datagrams_to_send(now)

    def next_timer(self):
        return self.inner.next_timer()

    def handle_timer(self, now: float) -> None:
        self.inner.handle_timer(now)


def ptype(datagram: bytes) -> int:
    return datagram[1]


def refresh_crc(datagram: bytes | bytearray) -> bytes:
    """What an active attacker does after changing a packet: a valid CRC."""
    body = bytes(datagram[: -wire.CRC_SIZE])
    return body + CRC.pack(crc32c(body))


def failed(side) -> HandshakeFailed:
    assert isinstance(side.handshake, HandshakeFailed), side.handshake
    return side.handshake


# ------------------------------------------------------------ transfers


@pytest.mark.parametrize("cipher", ["chacha20-poly1305", "aes-128-gcm", "aes-256-gcm"])
def test_transfer_is_byte_exact_with_each_cipher(cipher: str) -> None:
    comp = Composition.parse(f"security=aead(cipher={cipher})")
    back = bytes(range(256)) * 400
    result = secure_run(
        [comp], data_ab=DATA, data_ba=back, forward=LinkConditions(delay=0.01, loss=0.03)
    )
    assert result.completed
    assert result.b.data == DATA and result.a.data == back
    assert result.a.stats["composition"] == str(comp)
    assert result.a.stats["retransmissions"] > 0  # loss recovery ran under encryption
    assert result.b.stats["dropped_invalid"] == 0
    # the largest datagram still fits max_datagram_size despite the tag
    assert result.a.stats["bytes_sent"] <= result.a.stats["packets_sent"] * 1452


def test_wire_carries_no_plaintext() -> None:
    seen: dict[str, list[bytes]] = {"secure": [], "clear": []}

    def capture(kind):
        def wrap(ep):
            return Tap(ep, lambda d: seen[kind].append(d) or [d])

        return wrap

    secure_run([AEAD], data_ab=DATA, wrap_b=capture("secure"))
    run_transfer("security=none", data_ab=DATA, wrap_b=capture("clear"))
    marker = SECRET[:12]
    assert any(marker in d for d in seen["clear"])  # the check can see plaintext ...
    data = [d for d in seen["secure"] if ptype(d) == PacketType.DATA]
    assert len(data) > 300
    assert not any(marker in d for d in seen["secure"])  # ... and there is none
    # every packet after the handshake is sealed: body = ciphertext + 16-byte tag
    sizes = {len(d) for d in data}
    assert max(sizes) == 1452


def test_offer_has_a_key_share_only_when_a_secure_composition_is_offered() -> None:
    offers: list[dict[int, bytes]] = []

    def grab(ep):
        def hook(d):
            if ptype(d) == PacketType.OFFER:
                offers.append(wire.decode_fields(wire.decode(d).body))
            return [d]

        return Tap(ep, hook)

    run_transfer("security=none", data_ab=b"x", wrap_b=grab)
    secure_run([Composition.parse("security=none"), AEAD], data_ab=b"x", wrap_b=grab)
    assert wire.HsField.KEY_SHARE not in offers[0]
    assert len(offers[1][wire.HsField.KEY_SHARE]) == 32


def test_responder_uses_the_key_share_only_if_it_picks_a_secure_composition() -> None:
    # preferred clear offer first: the responder takes it and ignores the share
    result = secure_run([Composition.parse("security=none"), AEAD], data_ab=DATA)
    assert result.b.data == DATA
    assert "security" not in result.a.stats["composition"]
    assert result.a.stats["packets_sent"] > 0 and result.b.stats["dropped_invalid"] == 0


# ------------------------------------------------------------ tampering


@pytest.mark.parametrize("where", ["body", "flags", "reserved", "pn", "tag"])
def test_tampered_packets_are_dropped_and_counted(where: str) -> None:
    tampered = [0]

    def flip(d: bytes) -> list[bytes]:
        if ptype(d) != PacketType.DATA or tampered[0] >= 20:
            return [d]
        b = bytearray(d)
        offset = {
            "body": HEADER_SIZE + 20,
            "flags": 2,
            "reserved": 3,
            "pn": 23,
            "tag": len(d) - wire.CRC_SIZE - 1,
        }[where]
        b[offset] ^= 0x04
        tampered[0] += 1
        return [refresh_crc(b)]

    t = Transfer(
        [AEAD],
        data_ab=DATA,
        config_a=cfg(1, client()),
        config_b=cfg(2, server()),
        wrap_b=lambda ep: Tap(ep, flip),
        forward=LinkConditions(delay=0.005),
    )
    result = t.run()
    assert result.completed and result.b.data == DATA
    assert tampered[0] == 20
    stats = result.b.stats
    # a changed packet number may also name one already received: a replay
    assert stats["auth_failed"] + stats.get("replay_duplicate", 0) == 20
    assert stats["auth_failed"] >= 15
    assert stats["dropped_invalid"] == 20
    assert t.ep_b.drops["invalid_for_connection"] == 20
    assert result.a.stats["retransmissions"] >= 20  # recovered by retransmission


def test_corruption_without_crc_fix_is_still_a_checksum_drop() -> None:
    result = secure_run(
        [AEAD], data_ab=DATA, forward=LinkConditions(delay=0.005, corrupt=0.02), seed=3
    )
    assert result.b.data == DATA
    assert result.b.endpoint["drops"].get("checksum", 0) > 0
    assert result.b.stats.get("auth_failed", 0) == 0


def test_forged_reset_cannot_kill_a_secure_connection() -> None:
    """An on-path attacker who saw the connection IDs forges a RESET: it is
    not authenticated, so it is dropped (in clear it would end the connection)."""
    captured: list[bytes] = []

    def record(ep):
        def hook(d):
            captured.append(d)
            return [d]

        return Tap(ep, hook)

    def forge(t: Transfer) -> None:
        p = wire.decode(next(d for d in reversed(captured) if ptype(d) == PacketType.DATA))
        forged = wire.encode(
            PacketType.RESET, p.dcid, p.scid, p.pn + 5, wire.encode_error(1, "forged")
        )
        t.ep_b.receive(forged, t.addr_a, t.net.now)

    for comp, survives in ((AEAD, True), (Composition.parse("security=none"), False)):
        captured.clear()
        result = secure_run(
            [comp],
            data_ab=DATA,
            wrap_b=record,
            forward=LinkConditions(delay=0.01, rate_bps=20e6),
            schedule=[(0.1, forge)],
        )
        if survives:
            assert result.b.data == DATA
            assert result.b.stats["auth_failed"] == 1
            assert result.b.terminated.error_code == ErrorCode.NO_ERROR
        else:
            assert result.b.terminated.error_code == 1 and len(result.b.data) < len(DATA)


# ------------------------------------------------------------- replays


def test_replayed_packets_are_dropped() -> None:
    history: list[bytes] = []
    replayed = [0]

    def replay(d: bytes) -> list[bytes]:
        out = [d]
        if ptype(d) in (PacketType.DATA, PacketType.ACK, PacketType.PROBE, PacketType.CLOSE):
            history.append(d)
            if len(history) % 7 == 0:
                out.append(d)  # an immediate duplicate
                out.append(history[-3])  # and a recent one again
                replayed[0] += 2
        return out

    t = Transfer(
        [Composition.parse("security=aead(replay_window=64)")],
        data_ab=DATA,
        config_a=cfg(1, client()),
        config_b=cfg(2, server()),
        wrap_b=lambda ep: Tap(ep, replay),
        forward=LinkConditions(delay=0.005),
    )
    result = t.run()
    assert result.completed and result.b.data == DATA
    stats = result.b.stats
    assert stats["replay_duplicate"] == replayed[0] > 50
    assert stats["duplicate_segments"] == 0  # none reached the engine
    # a packet from long ago, beyond the window, is too old to tell: dropped
    conn = t.conn_b
    before = conn.stats["dropped_invalid"]
    conn.receive(history[0], t.net.now)
    assert conn.stats["replay_too_old"] == 1
    assert conn.stats["dropped_invalid"] == before + 1


def test_link_duplicates_are_replays_to_the_receiver() -> None:
    result = secure_run([AEAD], data_ab=DATA, forward=LinkConditions(delay=0.005, duplicate=0.05))
    assert result.b.data == DATA
    assert result.b.stats["replay_duplicate"] > 0


# --------------------------------------------------------------- trust


def test_untrusted_responder_key_fails_the_handshake_cleanly() -> None:
    result = secure_run([AEAD], data_ab=DATA, config_a=cfg(1, client(trust=(OTHER,))))
    fail = failed(result.a)
    assert fail.error_code == ErrorCode.PEER_NOT_TRUSTED
    assert key_text(public_bytes(SERVER)) in fail.reason and "not trusted" in fail.reason
    assert result.b.data == b""
    assert result.completed  # the responder learned it too (RESET) and forgot the connection


def test_initiator_without_trusted_keys_fails_with_a_reason() -> None:
    result = secure_run([AEAD], data_ab=b"x", config_a=cfg(1, None))
    fail = failed(result.a)
    assert fail.error_code == ErrorCode.PEER_NOT_TRUSTED
    assert "no trusted keys" in fail.reason


def test_responder_without_identity_refuses_the_secure_offer() -> None:
    result = secure_run([AEAD], data_ab=b"x", config_b=cfg(2, None))
    fail = failed(result.a)
    assert fail.error_code == ErrorCode.NO_COMMON_COMPOSITION and fail.by_peer
    assert "no identity key" in fail.reason


def test_altered_offer_is_detected_by_the_signature() -> None:
    """A path that rewrites the OFFER (here: the idle timeout, which the
    responder cannot tell is wrong) makes the responder sign a transcript the
    initiator does not have: the handshake fails, nothing is sent in clear."""

    def alter(d: bytes) -> list[bytes]:
        if ptype(d) != PacketType.OFFER:
            return [d]
        p = wire.decode(d)
        fields = wire.decode_fields(p.body)
        fields[wire.HsField.IDLE_TIMEOUT_MS] = (999_999).to_bytes(4, "big")
        return [wire.encode(p.type, p.dcid, p.scid, p.pn, wire.encode_fields(fields))]

    result = secure_run([AEAD], data_ab=DATA, wrap_b=lambda ep: Tap(ep, alter))
    fail = failed(result.a)
    assert fail.error_code == ErrorCode.AUTHENTICATION_FAILED
    assert "signature" in fail.reason
    assert result.b.data == b""


def test_swapped_key_share_in_accept_is_detected() -> None:
    attacker = Ed25519PrivateKey.generate()  # any 32 bytes would do

    def swap(d: bytes) -> list[bytes]:
        if ptype(d) != PacketType.ACCEPT:
            return [d]
        p = wire.decode(d)
        fields = wire.decode_fields(p.body)
        fields[wire.HsField.KEY_SHARE] = public_bytes(attacker)
        body = wire.encode_fields(fields)
        return [wire.encode(p.type, p.dcid, p.scid, p.pn, body, p.flags)]

    result = secure_run([AEAD], data_ab=DATA, wrap_a=lambda ep: Tap(ep, swap))
    assert failed(result.a).error_code == ErrorCode.AUTHENTICATION_FAILED


# -------------------------------------------------------------- mutual


MUTUAL = Composition.parse("security=aead(mutual=true)")


def test_mutual_authentication() -> None:
    result = secure_run(
        [MUTUAL],
        data_ab=DATA,
        config_a=cfg(1, client(identity=CLIENT)),
        config_b=cfg(2, server(trust=(CLIENT,))),
        forward=LinkConditions(delay=0.01, loss=0.05),
        seed=4,
    )
    assert result.completed and result.b.data == DATA
    assert result.b.stats["peer_authenticated"] == 1


def test_mutual_with_untrusted_initiator_fails_on_both_sides() -> None:
    result = secure_run(
        [MUTUAL],
        data_ab=DATA,
        config_a=cfg(1, client(identity=OTHER)),
        config_b=cfg(2, server(trust=(CLIENT,))),
    )
    assert result.b.data == b""
    assert result.a.terminated.error_code == ErrorCode.PEER_NOT_TRUSTED
    assert result.a.terminated.by_peer  # told by the responder's (sealed) RESET
    assert result.b.stats == {} and result.completed  # the responder never accepted it
    assert key_text(public_bytes(OTHER)) in result.a.terminated.reason


def test_mutual_without_initiator_identity_fails_with_a_reason() -> None:
    result = secure_run(
        [MUTUAL], data_ab=b"x", config_a=cfg(1, client()), config_b=cfg(2, server(trust=(CLIENT,)))
    )
    fail = failed(result.a)
    assert fail.error_code == ErrorCode.SECURITY_UNAVAILABLE
    assert "identity" in fail.reason


def test_mutual_needs_trusted_keys_on_the_responder() -> None:
    result = secure_run([MUTUAL], data_ab=b"x", config_a=cfg(1, client(identity=CLIENT)))
    fail = failed(result.a)
    assert fail.error_code == ErrorCode.NO_COMMON_COMPOSITION
    assert "trusts no initiator keys" in fail.reason


def test_lost_identity_proof_is_resent() -> None:
    """The proof rides on the handshake confirmation; if that is lost the
    responder repeats its ACCEPT and the initiator confirms again."""
    dropped = [0]

    def drop_confirmation(d: bytes) -> list[bytes]:
        p = wire.decode(d)
        if p.options.get(wire.OptionType.PEER_AUTH) and dropped[0] < 2:
            dropped[0] += 1
            return []
        return [d]

    result = secure_run(
        [MUTUAL],
        data_ab=DATA,
        config_a=cfg(1, client(identity=CLIENT)),
        config_b=cfg(2, server(trust=(CLIENT,))),
        wrap_b=lambda ep: Tap(ep, drop_confirmation),
    )
    assert dropped[0] == 2
    assert result.completed and result.b.data == DATA
    assert result.b.stats["peer_authenticated"] == 1


# ---------------------------------------------------- peer without the TF


def registry_without_aead() -> Registry:
    reg = Registry()
    register_builtins(reg)
    reg.unregister("security", "aead")
    return reg


def test_peer_without_the_security_tf_refuses_with_the_reason() -> None:
    b = cfg(2, server(), registry=registry_without_aead())
    result = secure_run([AEAD], data_ab=b"x", config_b=b)
    fail = failed(result.a)
    assert fail.error_code == ErrorCode.NO_COMMON_COMPOSITION
    assert "security 'aead' is not installed" in fail.reason


def test_peer_without_the_security_tf_takes_the_clear_alternative() -> None:
    b = cfg(2, server(), registry=registry_without_aead())
    result = secure_run([AEAD, Composition.parse("security=none")], data_ab=DATA, config_b=b)
    assert result.b.data == DATA
    assert "security" not in result.a.stats["composition"]


def test_insecure_counter_offer_can_be_rejected() -> None:
    b = cfg(
        2,
        server(),
        registry=registry_without_aead(),
        counter_offers=[Composition.parse("security=none")],
    )
    a = cfg(1, client(), accept_counter_offer=lambda c: c["security"].name != "none")
    result = secure_run([AEAD], data_ab=b"x", config_a=a, config_b=b)
    assert failed(result.a).error_code == ErrorCode.COUNTER_OFFER_REJECTED


# ------------------------------------------------------------ unit level


def test_composition_text_and_dict_leave_out_the_default_security() -> None:
    comp = Composition.parse("reliability=go-back-n")
    assert "security" not in comp.to_dict() and "security" not in str(comp)
    assert comp["security"].name == "none"
    assert Composition.from_dict(AEAD.to_dict()) == AEAD
    assert AEAD.to_dict()["security"] == {"name": "aead"}


def test_replay_window() -> None:
    w = ReplayWindow(64)
    for pn in (5, 3, 70, 69):
        assert w.check(pn) is None
        w.mark(pn)
    assert w.check(5) == "replay_too_old"  # 70 - 5 >= 64
    assert w.check(69) == "replay_duplicate"
    assert w.check(7) is None and w.check(71) is None
    w.mark(1000)
    assert w.check(999) is None and w.check(1000) == "replay_duplicate"
    assert w.check(936) == "replay_too_old"


def _pair(cipher: str = "chacha20-poly1305") -> tuple[PacketProtection, PacketProtection]:
    k1, k2, iv1, iv2 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 12, b"\x04" * 12
    return (
        PacketProtection(cipher, k1, iv1, k2, iv2, 64),
        PacketProtection(cipher, k2, iv2, k1, iv1, 64),
    )


def test_seal_open_round_trip_and_nonce_per_packet_number() -> None:
    a, b = _pair()
    payload = b"same payload"
    d1 = a.seal(wire.encode_data(7, 9, 1, 100, 100, payload))
    d2 = a.seal(wire.encode_data(7, 9, 2, 100, 100, payload))
    assert len(d1) == len(wire.encode_data(7, 9, 1, 100, 100, payload)) + TAG_SIZE
    assert d1[HEADER_SIZE:] != d2[HEADER_SIZE:]  # a fresh nonce per packet number
    for pn, d in ((1, d1), (2, d2)):
        p = wire.decode(d)
        b.open(p, pn, d)
        assert wire.decode_data(p.body)[2] == payload
    p = wire.decode(d1)
    with pytest.raises(ProtectionDrop, match="replay_duplicate"):
        b.open(p, 1, d1)
    # wrong direction key: a packet of our own cannot be opened by ourselves
    with pytest.raises(ProtectionDrop, match="auth_failed"):
        a.open(wire.decode(d2), 2, d2)
    # unprotected packet types pass through unchanged
    offer = wire.encode(PacketType.OFFER, 0, 9, 0, b"x")
    assert a.seal(offer) == offer


def test_open_without_the_datagram_rebuilds_the_header() -> None:
    a, b = _pair("aes-256-gcm")
    d = a.seal(wire.encode(PacketType.PROBE, 7, 9, 3, options={0x02: b"12345678"}))
    p = wire.decode(d)
    b.open(p, 3, None)
    assert p.body == b""


def test_low_order_key_share_is_a_malformed_offer() -> None:
    ep = EndpointCore(cfg(2, server()), listen=True)
    fields = {
        wire.HsField.COMPOSITIONS: wire.to_json([AEAD.to_dict()]),
        wire.HsField.INITIAL_SEQ: (1).to_bytes(4, "big"),
        wire.HsField.KEY_SHARE: bytes(32),  # the all-zero point: no shared secret
    }
    offer = wire.encode(PacketType.OFFER, 0, 77, 0, wire.encode_fields(fields))
    ep.receive(offer, ("10.0.0.1", 1), 0.0)
    assert ep.drops["malformed_offer"] == 1 and not ep.connections
    out = ep.datagrams_to_send(0.0)
    assert len(out) == 1 and wire.decode(out[0][0]).type is PacketType.RESET


def test_bytes_sent_counts_the_tags() -> None:
    """bytes_sent matches the wire as well with protection as without (the
    engine leaves its last ACK after termination uncounted either way)."""
    missing = []
    for comp in (AEAD, Composition.parse("security=none")):
        wire_bytes = [0]

        def count(ep, wire_bytes=wire_bytes):
            def hook(d):
                wire_bytes[0] += len(d)
                return [d]

            return Tap(ep, hook)

        result = secure_run([comp], data_ab=DATA, wrap_b=count)  # lossless: all arrive
        missing.append(wire_bytes[0] - result.a.stats["bytes_sent"])
    assert missing[0] == missing[1] < 100


def test_peer_predating_the_security_role_still_satisfies_clear_compositions() -> None:
    old_inventory = {
        role: names for role, names in _builtins().inventory().items() if role != "security"
    }
    assert Composition.parse("reliability=go-back-n").satisfiable_by(old_inventory) == []
    assert AEAD.satisfiable_by(old_inventory) == ["security=aead"]


def _builtins() -> Registry:
    reg = Registry()
    register_builtins(reg)
    return reg


def test_keys_are_fresh_per_connection() -> None:
    """Two connections with identical IDs, numbers and data: in clear their
    first DATA packets are identical, sealed they differ (fresh keys)."""

    def first_data(comp: Composition) -> bytes:
        seen: list[bytes] = []

        def grab(ep):
            return Tap(ep, lambda d: (ptype(d) == PacketType.DATA and seen.append(d)) or [d])

        secure_run([comp], data_ab=DATA[:5000], wrap_b=grab)
        return seen[0]

    clear = Composition.parse("security=none")
    assert first_data(clear) == first_data(clear)
    a, b = first_data(AEAD), first_data(AEAD)
    assert a[:HEADER_SIZE] == b[:HEADER_SIZE]  # same header: same IDs and packet number
    assert a[HEADER_SIZE:] != b[HEADER_SIZE:]


def test_mutated_protected_packets_never_crash_or_deliver() -> None:
    """Random rewrites (with a valid CRC) of a secure connection's packets:
    every one is refused and counted; the delivered bytes stay exact."""
    rng = random.Random(7)
    mutated = [0]

    def mutate(d: bytes) -> list[bytes]:
        if ptype(d) in (PacketType.OFFER, PacketType.ACCEPT) or rng.random() > 0.1:
            return [d]
        b = bytearray(d[: -wire.CRC_SIZE])
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(HEADER_SIZE, len(b)) if rng.random() < 0.8 else rng.randrange(1, 4)
            b[pos] = rng.randrange(256)
        if bytes(b) == d[: -wire.CRC_SIZE] or b[1] in (PacketType.OFFER, PacketType.ACCEPT):
            # (a forged ACCEPT or OFFER is not protected: the former makes the
            # initiator repeat its confirmation, the latter is ignored)
            return [d]
        mutated[0] += 1
        return [refresh_crc(b + bytes(4)), d]  # the forgery, then the real packet

    t = Transfer(
        [AEAD],
        data_ab=DATA,
        data_ba=DATA[:50_000],
        config_a=cfg(1, client()),
        config_b=cfg(2, server()),
        wrap_a=lambda ep: Tap(ep, mutate),
        wrap_b=lambda ep: Tap(ep, mutate),
        forward=LinkConditions(delay=0.005),
    )
    result = t.run()
    assert result.completed
    assert result.b.data == DATA and result.a.data == DATA[:50_000]
    refused = sum(sum(ep.drops.values()) for ep in (t.ep_a, t.ep_b))
    assert mutated[0] > 50 and refused == mutated[0]
