"""Errors of TF deployment."""

from __future__ import annotations

from vtl.core.errors import VtlError


class DeployError(VtlError):
    """A package cannot be deployed, upgraded or removed (the message says why)."""


class TrustError(DeployError):
    """A package is not trusted: not allowlisted, unsigned, tampered, or
    signed by an unknown key.  None of its code was run."""


class InUseError(DeployError):
    """Removal refused: live connections use the package's TFs."""
