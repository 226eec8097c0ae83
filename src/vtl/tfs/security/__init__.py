"""Security TFs: whether (and how) a connection's packets are protected.

``none`` leaves packets in clear (the default).  ``aead`` runs an
authenticated key exchange inside the OFFER/ACCEPT handshake and protects
every later packet with an AEAD (see ``docs/security.md``); the
cryptography itself lives in :mod:`vtl.core.protection` and
:mod:`vtl.core.secure_handshake`, this role only carries the negotiated
choice and its parameters."""

from __future__ import annotations

from typing import ClassVar

from vtl.core.protection import CIPHERS, TAG_SIZE
from vtl.tfs.base import Param, TransportFunction


class SecurityNone(TransportFunction):
    """No protection: packets travel in clear (the default).

    Integrity comes only from the CRC32C (accidental corruption).  Being the
    default, existing compositions and peers without the security role keep
    working unchanged."""

    ROLE = "security"
    NAME = "none"
    encrypted: ClassVar[bool] = False

    @property
    def overhead(self) -> int:
        return 0


class Aead(TransportFunction):
    """Encryption and peer authentication of every packet after the handshake.

    For applications that must not trust the path: an ephemeral X25519
    exchange in OFFER/ACCEPT, the responder (and with ``mutual`` the
    initiator) proving its Ed25519 identity by signing the transcript,
    per-connection per-direction keys from HKDF-SHA256, AEAD per packet and
    a replay window."""

    ROLE = "security"
    NAME = "aead"
    SERVICE_TRAITS: ClassVar[dict] = {"encrypted": True}
    encrypted: ClassVar[bool] = True
    PARAMS = {
        "cipher": Param(
            str, "chacha20-poly1305", "the AEAD algorithm", choices=tuple(sorted(CIPHERS))
        ),
        "mutual": Param(
            bool, False, "the initiator must authenticate too (its key trusted by the responder)"
        ),
        "replay_window": Param(
            int, 4096, "packet numbers remembered behind the largest one received", 64, 1 << 16
        ),
    }

    @property
    def overhead(self) -> int:
        """Bytes the protection adds to every protected packet (the tag)."""
        return TAG_SIZE


BUILTIN = [SecurityNone, Aead]
