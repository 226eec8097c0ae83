"""The authenticated key exchange of the ``security=aead`` TF (SIGMA style).

It rides on the existing OFFER / ACCEPT / confirmation exchange, adding no
round trip (design and threat model: docs/security.md):

1. OFFER: if any offered composition is secure, the initiator adds an
   ephemeral X25519 public key (``KEY_SHARE``).  The composition is not
   chosen yet; the responder uses the share only if it picks a secure one.
2. ACCEPT of a secure composition: the responder adds its own ephemeral key
   and its static Ed25519 public key (``IDENTITY``), then signs the
   transcript -- both connection IDs, the whole OFFER body and the ACCEPT
   body so far (so both key shares, every offer and the choice) -- and
   appends the signature as the last field (``SIGNATURE``).
3. The initiator checks the identity against its trusted keys and the
   signature against *its own* OFFER, so a path that rewrote the OFFER (a
   downgrade to a weaker offer, a swapped key share) is caught.
4. Both derive keys with HKDF-SHA256 from the X25519 secret, salted with
   the transcript hash: one key and IV per direction, fresh per connection.
5. With ``mutual``, the initiator proves its own Ed25519 identity by
   signing the transcript (and the responder's signature) in a header
   option of its first protected packet, the handshake confirmation; the
   responder takes no other packet until that proof checks out.

Every check that fails ends the handshake with an :class:`ErrorCode` in
16..18 and a reason naming the key, never with an exception escaping.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtl.core import wire
from vtl.core.composition import Composition
from vtl.core.errors import ErrorCode, WireError
from vtl.core.protection import CIPHERS, IV_SIZE, UNPROTECTED, PacketProtection, ProtectionDrop
from vtl.core.records import State
from vtl.core.wire import HS_TLV, HsField, PacketType

if TYPE_CHECKING:
    from vtl.core.connection import Connection

KEY_SIZE = 32  # X25519 and Ed25519 public keys
SIG_SIZE = 64
_LABEL = b"vtl-sec-v1"
_SIG_FIELD = HS_TLV.size + SIG_SIZE  # a SIGNATURE TLV on the wire

Failure = tuple[int, str]


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Raw 32-byte Ed25519 public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_text(raw: bytes) -> str:
    """How a public key is written in key files, options and errors."""
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class SecurityConfig:
    """Credentials of one endpoint: its own identity (a listener needs one to
    accept secure compositions; an initiator needs one for ``mutual``) and
    the Ed25519 public keys it trusts as peers (an initiator needs them to
    accept any responder; a responder needs them for ``mutual``)."""

    identity: Ed25519PrivateKey | None = None
    trusted_keys: frozenset[bytes] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        keys = frozenset(bytes(k) for k in self.trusted_keys)
        bad = [k for k in keys if len(k) != KEY_SIZE]
        if bad:
            raise ValueError(f"{len(bad)} trusted key(s) are not 32-byte Ed25519 public keys")
        object.__setattr__(self, "trusted_keys", keys)

    @classmethod
    def create(
        cls, identity: Ed25519PrivateKey | None = None, trusted: Iterable[bytes] = ()
    ) -> SecurityConfig:
        return cls(identity, frozenset(trusted))


def _is_secure(comp: Composition) -> bool:
    return comp["security"].name != "none"


def _security_params(conn: Connection, comp: Composition) -> dict:
    spec = comp["security"]
    return conn.registry.get("security", spec.name, spec.version).validate_params(spec.params)


def _transcript(initiator_cid: int, responder_cid: int, offer: bytes, accept: bytes) -> bytes:
    h = hashlib.sha256(_LABEL)
    h.update(struct.pack("!QQI", initiator_cid, responder_cid, len(offer)))
    h.update(offer)
    h.update(struct.pack("!I", len(accept)))
    h.update(accept)
    return h.digest()


def _tlv(ftype: int, value: bytes) -> bytes:
    return HS_TLV.pack(ftype, len(value)) + value


class ConnectionSecurity:
    """Security state of one connection and the hooks the engine calls.

    ``protection`` is None until keys exist (and forever on a composition
    with ``security=none``), which is all the engine's hot paths check."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.protection: PacketProtection | None = None
        self.peer_identity: bytes | None = None
        self._eph: X25519PrivateKey | None = None
        self._await_peer_auth: bytes | None = None  # transcript the initiator must sign

    @property
    def config(self) -> SecurityConfig:
        return self.conn.config.security or SecurityConfig()

    # --------------------------------------------------- initiator: OFFER

    def offer_fields(self, offers: list[Composition]) -> dict[int, bytes]:
        """A key share if any offer is secure (the responder may pick it)."""
        if not any(_is_secure(c) for c in offers):
            return {}
        self._eph = X25519PrivateKey.generate()
        return {HsField.KEY_SHARE: self._eph.public_key().public_bytes_raw()}

    # --------------------------------------------------- responder: ACCEPT

    def cannot_take(self, comp: Composition, offer: dict[int, bytes]) -> str | None:
        """Why this responder cannot run ``comp`` with this OFFER (None: it can)."""
        if not _is_secure(comp):
            return None
        if len(offer.get(HsField.KEY_SHARE, b"")) != KEY_SIZE:
            return "secure composition but the OFFER carries no key share"
        if self.config.identity is None:
            return "this responder has no identity key for security=aead"
        if _security_params(self.conn, comp)["mutual"] and not self.config.trusted_keys:
            return "security=aead(mutual) but this responder trusts no initiator keys"
        return None

    def finish_accept(self, comp: Composition, offer: wire.Packet, accept: bytes) -> bytes:
        """Complete the ACCEPT body of ``comp`` (checked by
        :meth:`cannot_take`): key share, identity and the signature over
        the transcript; install this side's keys."""
        if not _is_secure(comp):
            return accept
        identity = self.config.identity
        assert identity is not None
        peer_share = wire.decode_fields(offer.body)[HsField.KEY_SHARE]
        eph = X25519PrivateKey.generate()
        try:
            shared = eph.exchange(X25519PublicKey.from_public_bytes(peer_share))
        except ValueError:  # a low-order point: the shared secret would be all zeros
            raise WireError("invalid X25519 key share in the OFFER") from None
        accept += _tlv(HsField.KEY_SHARE, eph.public_key().public_bytes_raw())
        accept += _tlv(HsField.IDENTITY, public_bytes(identity))
        th = _transcript(offer.scid, self.conn.local_cid, offer.body, accept)
        signature = identity.sign(_LABEL + b" responder" + th)
        params = _security_params(self.conn, comp)
        self.protection = _derive(params, shared, th, initiator=False)
        if params["mutual"]:
            self._await_peer_auth = th + signature
        return accept + _tlv(HsField.SIGNATURE, signature)

    # ------------------------------------------------- initiator: verify

    def verify_accept(
        self, comp: Composition, p: wire.Packet, fields: dict[int, bytes]
    ) -> Failure | None:
        """Check the ACCEPT of ``comp`` and install our keys; a failure is
        ``(code, reason)`` for the handshake to end with."""
        if not _is_secure(comp):
            return None
        if self._eph is None:
            return (
                ErrorCode.SECURITY_UNAVAILABLE,
                f"peer counter-offered secure '{comp}' but we sent no key share",
            )
        share = fields.get(HsField.KEY_SHARE, b"")
        ident = fields.get(HsField.IDENTITY, b"")
        sig = fields.get(HsField.SIGNATURE, b"")
        body = p.body
        if (
            len(share) != KEY_SIZE
            or len(ident) != KEY_SIZE
            or len(sig) != SIG_SIZE
            or body[-_SIG_FIELD:] != _tlv(HsField.SIGNATURE, sig)
        ):
            return ErrorCode.AUTHENTICATION_FAILED, "ACCEPT lacks well-formed security fields"
        cfg = self.config
        if not cfg.trusted_keys:
            return (
                ErrorCode.PEER_NOT_TRUSTED,
                f"responder key {key_text(ident)} cannot be checked: no trusted keys configured",
            )
        if ident not in cfg.trusted_keys:
            return (
                ErrorCode.PEER_NOT_TRUSTED,
                f"responder key {key_text(ident)} is not trusted "
                f"({len(cfg.trusted_keys)} trusted key(s))",
            )
        th = _transcript(self.conn.local_cid, p.scid, self.conn._offer_fields, body[:-_SIG_FIELD])
        try:
            Ed25519PublicKey.from_public_bytes(ident).verify(sig, _LABEL + b" responder" + th)
        except InvalidSignature:
            return (
                ErrorCode.AUTHENTICATION_FAILED,
                "responder's transcript signature does not verify (handshake altered in transit?)",
            )
        params = _security_params(self.conn, comp)
        if params["mutual"] and cfg.identity is None:
            return (
                ErrorCode.SECURITY_UNAVAILABLE,
                "security=aead(mutual) needs an identity key on the initiator",
            )
        try:
            shared = self._eph.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError:  # an all-zero (low order) shared secret
            return ErrorCode.AUTHENTICATION_FAILED, "invalid responder key share"
        self.peer_identity = ident
        self.protection = _derive(params, shared, th, initiator=True)
        if params["mutual"]:
            assert cfg.identity is not None
            proof = cfg.identity.sign(_LABEL + b" initiator" + th + sig)
            self.protection.tx_option = public_bytes(cfg.identity) + proof
        self._eph = None
        return None

    # ---------------------------------------------------------- datapath

    def seal(self, out: list[bytes]) -> list[bytes]:
        prot = self.protection
        assert prot is not None
        sealed = [prot.seal(d) for d in out]
        # the engine counted the datagrams before sealing: add what sealing added
        self.conn.stats["bytes_sent"] += sum(map(len, sealed)) - sum(map(len, out))
        return sealed

    def open(self, packet: wire.Packet, datagram: bytes | None) -> bool:
        """Authenticate one received packet; False if it must be dropped
        (counted in ``stats``).  Called only once keys exist."""
        conn = self.conn
        prot = self.protection
        assert prot is not None
        if packet.type in _PASS:
            return True
        pn = conn._expand_pn_rx(packet.pn)
        try:
            prot.open(packet, pn, datagram)
        except ProtectionDrop as drop:
            if packet.type is PacketType.RESET and self._accept_clear_reset(packet):
                return True
            self._count(drop.reason)
            return False
        if self._await_peer_auth is not None:
            return self._check_peer_auth(packet)
        return True

    def _accept_clear_reset(self, packet: wire.Packet) -> bool:
        """An unauthenticated RESET is believed only where it cannot hurt:
        during the handshake (the peer may not have keys yet) or when all
        data both ways is delivered and only the ACK of our CLOSE is missing
        (the peer finished and forgot the connection)."""
        conn = self.conn
        if conn.state is State.ACCEPTING:
            return True
        if conn._only_close_unconfirmed():
            code, _ = wire.decode_error(packet.body)
            return code == ErrorCode.UNKNOWN_CONNECTION
        return False

    def _check_peer_auth(self, packet: wire.Packet) -> bool:
        """Responder with ``mutual``: nothing counts until the initiator's
        identity proof (on its handshake confirmation) checks out."""
        conn = self.conn
        raw = packet.options.get(wire.OptionType.PEER_AUTH)
        if raw is None or conn.state is State.TERMINATED:  # no proof, or already refused
            self._count("awaiting_peer_auth")
            return False
        key, proof = raw[:KEY_SIZE], raw[KEY_SIZE:]
        if len(key) != KEY_SIZE or len(proof) != SIG_SIZE:
            return self._fail(ErrorCode.AUTHENTICATION_FAILED, "malformed initiator identity proof")
        if key not in self.config.trusted_keys:
            return self._fail(
                ErrorCode.PEER_NOT_TRUSTED, f"initiator key {key_text(key)} is not trusted"
            )
        transcript = self._await_peer_auth
        assert transcript is not None
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(
                proof, _LABEL + b" initiator" + transcript
            )
        except InvalidSignature:
            return self._fail(
                ErrorCode.AUTHENTICATION_FAILED, "initiator's identity proof does not verify"
            )
        self.peer_identity = key
        self._await_peer_auth = None
        conn.stats["peer_authenticated"] = 1
        return True

    def _fail(self, code: int, reason: str) -> bool:
        conn = self.conn
        self._count("peer_auth_failed")
        conn._reset_out = (int(code), reason)
        conn._handshake_failed(code, reason)
        return False

    def _count(self, reason: str) -> None:
        stats = self.conn.stats
        stats["dropped_invalid"] += 1
        stats[reason] = stats.get(reason, 0) + 1


# OFFER / ACCEPT / REFUSE are never sealed; everything else is opened
_PASS = frozenset(PacketType(t) for t in UNPROTECTED)


def _derive(params: dict, shared: bytes, th: bytes, *, initiator: bool) -> PacketProtection:
    """Per-connection, per-direction keys and IVs (HKDF-SHA256, salted with
    the transcript hash, the cipher named in the label)."""
    cipher = params["cipher"]
    klen, _ = CIPHERS[cipher]
    size = klen + IV_SIZE
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * size,
        salt=th,
        info=_LABEL + b" keys " + cipher.encode("ascii"),
    ).derive(shared)
    i2r, r2i = okm[:size], okm[size:]
    tx, rx = (i2r, r2i) if initiator else (r2i, i2r)
    return PacketProtection(
        cipher, tx[:klen], tx[klen:], rx[:klen], rx[klen:], params["replay_window"]
    )
