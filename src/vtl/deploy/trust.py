"""Who may deploy code into an endpoint: a SHA-256 allowlist and Ed25519 keys.

A package is trusted when its SHA-256 digest is on the allowlist, or when its
detached signature file (``PACKAGE.sig``) holds a valid Ed25519 signature of
that digest by a trusted public key.  Everything is checked on the bytes read
once into memory, before any of the package's code runs.

Files (all text, ``#`` starts a comment):

* allowlist: one hex SHA-256 digest per line (anything after it is a note);
* trusted keys: one base64 raw 32-byte Ed25519 public key per line (a name
  may follow), or a directory of such ``*.pub`` files;
* signature (``PACKAGE.sig``): JSON ``{"format": "vtl-tf-sig/1", "sha256":
  hex, "key": base64 public key, "signature": base64}``; the signed message
  is ``b"vtl-tf-package\\0" + digest`` (32 raw bytes), so a signature can
  never be mistaken for one over something else;
* private key: PKCS#8 PEM, written with mode 0600 by :func:`keygen`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from vtl.deploy.errors import TrustError

SIG_FORMAT = "vtl-tf-sig/1"
_DOMAIN = b"vtl-tf-package\x00"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(raw_public: bytes) -> str:
    """Short, stable name of a public key (for messages and listings)."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


@dataclass
class TrustPolicy:
    """The allowlist and trusted keys of one endpoint (empty: trust nothing)."""

    allowlist: set[str] = field(default_factory=set)
    keys: dict[str, bytes] = field(default_factory=dict)  # fingerprint -> raw public key

    @classmethod
    def load(
        cls, allowlist: str | Path | None = None, trusted_keys: str | Path | None = None
    ) -> TrustPolicy:
        policy = cls()
        if allowlist is not None:
            for line in _lines(Path(allowlist).read_text()):
                policy.allow(line.split()[0])
        if trusted_keys is not None:
            path = Path(trusted_keys)
            files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
            for f in files:
                for line in _lines(f.read_text()):
                    policy.trust(line.split()[0])
        return policy

    def allow(self, digest: str) -> None:
        digest = digest.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TrustError(f"allowlist entry {digest!r} is not a hex SHA-256 digest")
        self.allowlist.add(digest)

    def trust(self, public_key: str | bytes) -> str:
        """Trust a public key (base64 text or 32 raw bytes); returns its fingerprint."""
        raw = _decode_key(public_key) if isinstance(public_key, str) else public_key
        if len(raw) != 32:
            raise TrustError("an Ed25519 public key is 32 bytes")
        fp = fingerprint(raw)
        self.keys[fp] = raw
        return fp

    def verify(self, data: bytes, signature: bytes | None) -> str:
        """How ``data`` is trusted (``"allowlist"`` or ``"signature <fp>"``),
        or :class:`TrustError` saying why not."""
        digest = sha256_hex(data)
        if digest in self.allowlist:
            return "allowlist"
        if signature is None:
            raise TrustError(
                f"package sha256 {digest} is not on the allowlist and has no signature"
            )
        sig = parse_signature(signature)
        if sig["sha256"] != digest:
            raise TrustError(
                f"digest mismatch: the signature is for sha256 {sig['sha256']}, "
                f"the package is {digest} (modified after signing?)"
            )
        fp = fingerprint(sig["key"])
        if fp not in self.keys:
            raise TrustError(f"package is signed by untrusted key {fp}")
        try:
            Ed25519PublicKey.from_public_bytes(sig["key"]).verify(
                sig["signature"], _DOMAIN + bytes.fromhex(digest)
            )
        except InvalidSignature:
            raise TrustError(f"bad signature by key {fp} on sha256 {digest}") from None
        return f"signature {fp}"


def _decode_key(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TrustError(f"public key {text[:20]!r} is not base64") from None


def parse_signature(blob: bytes) -> dict:
    try:
        doc = json.loads(blob.decode("utf-8"))
        if doc.get("format") != SIG_FORMAT:
            raise ValueError(f"format is not {SIG_FORMAT}")
        out = {
            "sha256": str(doc["sha256"]).lower(),
            "key": base64.b64decode(doc["key"], validate=True),
            "signature": base64.b64decode(doc["signature"], validate=True),
        }
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise TrustError(f"malformed signature file: {exc}") from None
    if len(out["key"]) != 32 or len(out["signature"]) != 64:
        raise TrustError("malformed signature file: wrong key or signature length")
    return out


# ------------------------------------------------------------- operator tools


def keygen(path: str | Path) -> tuple[Path, Path, str]:
    """Write a new private key (``path``, mode 0600) and its public key
    (``path.pub``); returns both paths and the key's fingerprint."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = _raw_public(key.public_key())
    pub = path.with_name(path.name + ".pub")
    fp = fingerprint(raw)
    pub.write_text(f"{base64.b64encode(raw).decode()} {fp}\n")
    return path, pub, fp


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"{path} is not an Ed25519 private key")
    return key


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The detached signature file content for a package's bytes."""
    digest = sha256_hex(data)
    doc = {
        "format": SIG_FORMAT,
        "sha256": digest,
        "key": base64.b64encode(_raw_public(key.public_key())).decode(),
        "signature": base64.b64encode(key.sign(_DOMAIN + bytes.fromhex(digest))).decode(),
    }
    return (json.dumps(doc) + "\n").encode()


def sign(package: str | Path, key_path: str | Path, out: str | Path | None = None) -> Path:
    """Write ``PACKAGE.sig`` (or ``out``) signing ``package`` with the key."""
    package = Path(package)
    target = Path(out) if out else package.with_name(package.name + ".sig")
    target.write_bytes(sign_bytes(package.read_bytes(), load_private_key(key_path)))
    return target
