"""Ordering TFs: in-order or immediate delivery to the application."""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import TransportFunction


class Ordering(TransportFunction):
    ROLE: ClassVar[str] = "ordering"
    ordered: ClassVar[bool] = True
    # the receiver's buffers are laid out per ordering: switch when it holds
    # nothing out of order (see docs/reconfiguration.md)
    SWITCH_AT: ClassVar[str] = "quiescent"


class Ordered(Ordering):
    """Deliver in sequence order; a gap holds back what follows until it is
    filled or (unreliable compositions) abandoned by the sender."""

    NAME = "ordered"


class Unordered(Ordering):
    """Deliver each segment (or complete message) as soon as it arrives:
    no head-of-line blocking; duplicates are still suppressed."""

    NAME = "unordered"
    ordered = False


BUILTIN = [Ordered, Unordered]
