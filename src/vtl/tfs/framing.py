"""Framing TFs: a byte stream, or messages with preserved boundaries."""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param, TransportFunction


class Framing(TransportFunction):
    ROLE: ClassVar[str] = "framing"
    messages: ClassVar[bool] = False

    @classmethod
    def live_switch_refusal(cls, old: type) -> str | None:
        if getattr(old, "messages", False) != cls.messages:
            return (
                f"framing {old.NAME!r} -> {cls.NAME!r}: stream and message framing cannot "
                "change on a running connection (queued data is already framed)"
            )
        return None


class StreamFraming(Framing):
    """Bytes in, bytes out: writes are coalesced into full segments."""

    NAME = "stream"


class MessageFraming(Framing):
    """Each send() is one message, delivered whole (or not at all)."""

    NAME = "message"
    messages = True
    PARAMS = {
        "max_message_size": Param(int, 1 << 24, "largest message accepted (bytes)", 1, 1 << 30)
    }


BUILTIN = [StreamFraming, MessageFraming]
