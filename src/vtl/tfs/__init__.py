"""Built-in transport functions, one module (or folder) per role."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtl.core.registry import Registry


def register_builtins(registry: Registry) -> None:
    """Install every built-in TF into ``registry``."""
    from vtl.tfs import (
        congestion,
        fec,
        flow,
        framing,
        integrity,
        ordering,
        reliability,
        security,
    )

    for module in (reliability, congestion, ordering, flow, framing, fec, integrity, security):
        for cls in module.BUILTIN:
            registry.register(cls)
