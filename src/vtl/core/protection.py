"""Per-packet protection: AEAD sealing and opening, and replay detection.

A :class:`PacketProtection` is installed on a connection once the secure
handshake (:mod:`vtl.core.secure_handshake`) has derived its keys.  The
engine stays unaware of it except for two narrow hooks: every datagram a
connection emits goes through :meth:`PacketProtection.seal`, and every
packet it receives through :meth:`PacketProtection.open` before dispatch.

Layout of a protected packet (docs/wire-format.md)::

    header (28) | options | AEAD(body) = ciphertext || tag (16) | CRC32C (4)

The header and options (with ``bodylen`` counting the tag) are the
associated data, so nothing in them can be changed unnoticed.  The nonce is
the per-direction IV xor the full (expanded) packet number, which a sender
never reuses.  The CRC32C is kept, computed over the protected datagram, so
the endpoint's single decode pass and its drop counters work unchanged and
corruption is still told apart from forgery.  The primitives are the
``cryptography`` package's; nothing here is home-made cryptography.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from crc32c import crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from vtl.core import wire
from vtl.core.wire import CRC, CRC_SIZE, HEADER, HEADER_SIZE, OPT_TLV, PacketType

TAG_SIZE = 16
IV_SIZE = 12

#: cipher name -> (key length, AEAD class)
CIPHERS: dict[str, tuple[int, Callable]] = {
    "chacha20-poly1305": (32, ChaCha20Poly1305),
    "aes-128-gcm": (16, AESGCM),
    "aes-256-gcm": (32, AESGCM),
}

#: packets that cannot be protected: they carry the key exchange itself
#: (OFFER, ACCEPT) or come from a responder that has no keys (REFUSE).
#: Every other type, including ones added later, is sealed once keys exist.
UNPROTECTED = frozenset((int(PacketType.OFFER), int(PacketType.ACCEPT), int(PacketType.REFUSE)))

_U32 = 1 << 32
_MASK32 = _U32 - 1
_PN_OFFSET = 20  # pn, optlen, bodylen: the last 8 bytes of the common header
_PN_LENS = struct.Struct("!IHH")
_LENS_OFFSET = 24
_LENS = struct.Struct("!HH")


class ProtectionDrop(Exception):
    """A received packet failed protection; ``reason`` names the counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplayWindow:
    """Which packet numbers were received, up to ``size`` behind the
    largest: a sliding bitmap (bit ``i`` = largest - i), as IPsec ESP and
    DTLS keep it.  A number seen before, or too old to tell, is refused."""

    __slots__ = ("size", "largest", "_bits", "_mask")

    def __init__(self, size: int) -> None:
        self.size = size
        self.largest = -1
        self._bits = 0
        self._mask = (1 << size) - 1

    def check(self, pn: int) -> str | None:
        """``None`` if ``pn`` is new, else the drop reason."""
        if pn > self.largest:
            return None
        age = self.largest - pn
        if age >= self.size:
            return "replay_too_old"
        if (self._bits >> age) & 1:
            return "replay_duplicate"
        return None

    def mark(self, pn: int) -> None:
        """Record ``pn`` (call only once the packet is authenticated)."""
        if pn > self.largest:
            shift = pn - self.largest
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self.largest = pn
        else:
            self._bits |= 1 << (self.largest - pn)


class PacketProtection:
    """The AEAD keys of one connection: one key and IV per direction.

    ``seal`` protects our outgoing datagrams, ``open`` checks and decrypts
    the peer's packets.  ``tx_option`` is an optional header option added
    to packets chosen by ``tx_option_for`` (the initiator's identity proof
    on its handshake confirmation)."""

    def __init__(
        self,
        cipher: str,
        tx_key: bytes,
        tx_iv: bytes,
        rx_key: bytes,
        rx_iv: bytes,
        replay_window: int = 4096,
    ) -> None:
        klen, aead = CIPHERS[cipher]
        if len(tx_key) != klen or len(rx_key) != klen:
            raise ValueError(f"{cipher} needs {klen}-byte keys")
        self.cipher = cipher
        self._tx = aead(tx_key)
        self._rx = aead(rx_key)
        self._tx_iv = int.from_bytes(tx_iv, "big")
        self._rx_iv = int.from_bytes(rx_iv, "big")
        self._tx_largest = -1
        self.replay = ReplayWindow(replay_window)
        self.tx_option: bytes | None = None
        self.sealed = 0
        self.opened = 0

    # ------------------------------------------------------------ sending

    def seal(self, datagram: bytes) -> bytes:
        """Protect one encoded datagram (unprotected types pass through)."""
        ptype = datagram[1]
        if ptype in UNPROTECTED:
            return datagram
        tpn, optlen, bodylen = _PN_LENS.unpack_from(datagram, _PN_OFFSET)
        nxt = self._tx_largest + 1
        pn = nxt if tpn == nxt & _MASK32 else wire.expand(tpn, nxt)
        if pn > self._tx_largest:
            self._tx_largest = pn
        start = HEADER_SIZE + optlen
        opts = datagram[HEADER_SIZE:start]
        extra = self.tx_option
        if extra is not None and self._wants_option(ptype, datagram[2]):
            opts += OPT_TLV.pack(wire.OptionType.PEER_AUTH, len(extra)) + extra
        # the header as sent: unchanged but for optlen and bodylen (+ the tag)
        head = datagram[:_LENS_OFFSET] + _LENS.pack(len(opts), bodylen + TAG_SIZE) + opts
        nonce = (self._tx_iv ^ pn).to_bytes(IV_SIZE, "big")
        sealed = head + self._tx.encrypt(nonce, datagram[start : start + bodylen], head)
        self.sealed += 1
        return sealed + CRC.pack(crc32c(sealed))

    @staticmethod
    def _wants_option(ptype: int, flags: int) -> bool:
        """The identity proof rides on the initiator's handshake confirmation."""
        return ptype == PacketType.ACK and bool(flags & wire.AckFlags.HANDSHAKE_DONE)

    # ---------------------------------------------------------- receiving

    def open(self, packet: wire.Packet, pn: int, datagram: bytes | None) -> None:
        """Authenticate and decrypt ``packet`` in place (its expanded packet
        number is ``pn``); raise :class:`ProtectionDrop` if it is a replay,
        was tampered with, or was never protected."""
        body = packet.body
        if len(body) < TAG_SIZE:
            raise ProtectionDrop("auth_failed")
        why = self.replay.check(pn)
        if why is not None:
            raise ProtectionDrop(why)
        if datagram is not None:
            aad = datagram[: len(datagram) - CRC_SIZE - len(body)]
        else:
            aad = _rebuild_header(packet)
        nonce = (self._rx_iv ^ pn).to_bytes(IV_SIZE, "big")
        try:
            plain = self._rx.decrypt(nonce, body, aad)
        except InvalidTag:
            raise ProtectionDrop("auth_failed") from None
        self.replay.mark(pn)
        self.opened += 1
        packet.body = plain


def _rebuild_header(packet: wire.Packet) -> bytes:
    """The header and options as sent, from a decoded packet (for callers
    that no longer hold the datagram; the reserved byte is taken as 0)."""
    opts = b"".join(OPT_TLV.pack(t, len(v)) + v for t, v in packet.options.items())
    return (
        HEADER.pack(
            wire.VERSION,
            int(packet.type),
            packet.flags,
            0,
            packet.dcid,
            packet.scid,
            packet.pn % _U32,
            len(opts),
            len(packet.body),
        )
        + opts
    )
