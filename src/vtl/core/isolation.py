"""Failure isolation: find the transport function that raised.

A TF is third-party code running inside the datapath.  When it raises, only
the connection that uses it may fail (with ``TF_FAILURE`` and a message that
names the TF); the endpoint and every other connection carry on.  The engine
catches at its entry points and asks :func:`culprit` whether a TF frame is
on the traceback: an exception with no TF frame is an engine bug and is
raised as before."""

from __future__ import annotations

from types import TracebackType

from vtl.tfs.base import TransportFunction


def culprit(exc: BaseException) -> tuple[TransportFunction, str] | None:
    """The innermost TF instance (and its function name) on ``exc``'s
    traceback, or None when no TF method was running."""
    found = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        obj = frame.f_locals.get("self")
        if isinstance(obj, TransportFunction):
            found = (obj, frame.f_code.co_name)
        tb = tb.tb_next
    return found


def describe(exc: BaseException, tf: TransportFunction, func: str, where: str) -> str:
    """A reason for RESET/termination that names the TF and the exception."""
    cls = type(tf)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    reason = (
        f"transport function {cls.ROLE} {cls.NAME!r} version {cls.VERSION} "
        f"raised {text} (in {func}(), {where} path)"
    )
    return reason[:1000]  # a RESET reason is at most 1024 bytes
