"""Security parameters of a Preconnection (TAPS ``SecurityParameters``).

TAPS (RFC 9622 section 6.3) configures security apart from the selection
properties: identities (a local key pair) and how to verify the peer (here:
a set of trusted Ed25519 public keys, pinned as SSH pins host keys; there
are no certificates).  ``security=Require`` in the transport properties
selects an encrypting composition; these parameters give it its keys.

Key files (written by ``vtl keygen``):

* identity: an unencrypted PKCS#8 PEM Ed25519 private key (mode 0600);
* public key / trusted keys: one key per line, ``vtl-ed25519 <base64> [comment]``
  (or the bare base64 of the 32-byte key); ``#`` starts a comment.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vtl.core.errors import VtlError
from vtl.core.secure_handshake import KEY_SIZE, SecurityConfig, key_text, public_bytes

__all__ = [
    "KeyFileError",
    "SecurityParameters",
    "generate_identity",
    "load_identity",
    "load_trusted_keys",
    "parse_public_key",
    "public_key_line",
    "save_identity",
]

KEY_PREFIX = "vtl-ed25519"


class KeyFileError(VtlError):
    """A key file or key text cannot be read (says which and why)."""


def generate_identity() -> Ed25519PrivateKey:
    """A fresh Ed25519 identity key (from the OS CSPRNG)."""
    return Ed25519PrivateKey.generate()


def public_key_line(key: Ed25519PrivateKey | bytes, comment: str = "") -> str:
    """The line for a public-key / trusted-keys file."""
    raw = key if isinstance(key, bytes) else public_bytes(key)
    return f"{KEY_PREFIX} {key_text(raw)}" + (f" {comment}" if comment else "")


def save_identity(key: Ed25519PrivateKey, path: str | Path) -> Path:
    """Write the private key (PEM, mode 0600) and ``<path>.pub`` beside it."""
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)
    pub = path.with_name(path.name + ".pub")
    pub.write_text(public_key_line(key, path.name) + "\n")
    return pub


def load_identity(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key written by :func:`save_identity`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read identity key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def parse_public_key(text: str) -> bytes:
    """One public key: ``vtl-ed25519 <base64> [comment]`` or bare base64."""
    parts = text.split()
    if parts and parts[0] == KEY_PREFIX:
        parts = parts[1:]
    if not parts:
        raise KeyFileError(f"no key in {text!r}")
    try:
        raw = base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{parts[0]!r} is not base64") from None
    if len(raw) != KEY_SIZE:
        raise KeyFileError(f"{parts[0]!r} is {len(raw)} bytes, an Ed25519 key has {KEY_SIZE}")
    return raw


def load_trusted_keys(source: str | Path) -> frozenset[bytes]:
    """Trusted keys from a file (one per line), or a single key given inline."""
    path = Path(source)
    if not path.is_file():
        if isinstance(source, str) and (source.startswith(KEY_PREFIX) or len(source) == 44):
            return frozenset({parse_public_key(source)})
        raise KeyFileError(f"trusted keys: {source} is neither a file nor a public key")
    keys = set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.add(parse_public_key(line))
        except KeyFileError as exc:
            raise KeyFileError(f"{path}:{n}: {exc}") from None
    if not keys:
        raise KeyFileError(f"{path} holds no keys")
    return frozenset(keys)


@dataclass(frozen=True)
class SecurityParameters:
    """Local identity and trusted peer keys for encrypting compositions.

    A listener needs ``identity`` to accept ``security=aead``; an initiator
    needs ``trusted_keys`` (the listeners' public keys it will talk to).
    With ``security=aead(mutual=true)`` it is both ways round as well."""

    identity: Ed25519PrivateKey | None = None
    trusted_keys: frozenset[bytes] = field(default_factory=frozenset)

    @classmethod
    def from_files(
        cls, identity: str | Path | None = None, trusted: Iterable[str | Path] = ()
    ) -> SecurityParameters:
        """Load ``identity`` (a private key file) and ``trusted`` (files or inline keys)."""
        keys: set[bytes] = set()
        for source in trusted:
            keys |= load_trusted_keys(source)
        return cls(load_identity(identity) if identity else None, frozenset(keys))

    @property
    def public_key(self) -> bytes | None:
        return public_bytes(self.identity) if self.identity is not None else None

    def to_config(self) -> SecurityConfig:
        return SecurityConfig(self.identity, frozenset(self.trusted_keys))
