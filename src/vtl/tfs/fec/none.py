"""No forward error correction (the default)."""

from __future__ import annotations

from typing import ClassVar

from vtl.tfs.base import Param
from vtl.tfs.fec.base import Fec


class NoFec(Fec):
    """No FEC: lost DATA packets are only repaired by retransmission."""

    NAME: ClassVar[str] = "none"
    VERSION: ClassVar[str] = "1.0"
    PARAMS: ClassVar[dict[str, Param]] = {}
    SCHEME: ClassVar[int] = 0
