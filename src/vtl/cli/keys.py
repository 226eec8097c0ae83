"""``vtl keygen``: create an Ed25519 identity for ``security=aead``.

The private key goes to FILE (PEM, mode 0600), the public key to FILE.pub as
one line ``vtl-ed25519 <base64> <comment>``: give that file (or the line) to
peers, who pass it with ``--trust``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtl.cli.common import fail


def add_parser(sub) -> None:
    p = sub.add_parser("keygen", help="create an identity key pair for encrypted connections")
    p.add_argument(
        "-o", "--output", required=True, help="private key file (FILE.pub gets the public key)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.set_defaults(func=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    from vtl.service.security import generate_identity, public_key_line, save_identity

    path = Path(args.output)
    if path.exists() and not args.force:
        return fail(f"{path} exists (use --force to overwrite it)")
    key = generate_identity()
    try:
        pub = save_identity(key, path)
    except OSError as exc:
        return fail(f"cannot write {path}: {exc.strerror}", 1)
    sys.stderr.write(f"private key: {path}\npublic key:  {pub}\n")
    sys.stdout.write(public_key_line(key, path.name) + "\n")
    return 0
