"""What every transport function (TF) is: a role, a name, a version and typed
parameters.  Role-specific interfaces live beside the TFs of that role
(``tfs/reliability/base.py``, ``tfs/congestion/base.py``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vtl.core.errors import CompositionError


@dataclass(frozen=True)
class Param:
    """A typed, validated TF parameter."""

    type: type  # int, float, bool or str
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def validate(self, where: str, name: str, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise a
        :class:`CompositionError` that names the TF and the parameter."""
        t = self.type
        ok = isinstance(value, t) and not (t is not bool and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok and isinstance(value, str) and t is not str:
            try:  # values written on a command line arrive as strings
                value = {"true": True, "false": False}[value.lower()] if t is bool else t(value)
                ok = True
            except (KeyError, ValueError):
                ok = False
        if not ok or value != value:  # NaN passes every range check below
            raise CompositionError(
                f"{where}: parameter {name!r} must be {t.__name__}, got {value!r}"
            )
        if self.min is not None and value < self.min:
            raise CompositionError(
                f"{where}: parameter {name!r} must be >= {self.min}, got {value}"
            )
        if self.max is not None and value > self.max:
            raise CompositionError(
                f"{where}: parameter {name!r} must be <= {self.max}, got {value}"
            )
        if self.choices is not None and value not in self.choices:
            raise CompositionError(
                f"{where}: parameter {name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        return value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type.__name__, "default": self.default}
        for key in ("min", "max", "choices"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.doc:
            out["doc"] = self.doc
        return out


class TransportFunction:
    """Base class of all TFs.

    Subclasses set ``ROLE``, ``NAME``, ``VERSION``, ``PARAMS`` and a one-line
    docstring; instances are created per connection with validated
    parameters (``self.params``) and must not do any I/O."""

    ROLE: ClassVar[str] = ""
    NAME: ClassVar[str] = ""
    VERSION: ClassVar[str] = "1.0"
    PARAMS: ClassVar[dict[str, Param]] = {}
    #: live reconfiguration (see docs/reconfiguration.md): may a running
    #: connection switch to or from this TF?  None: the role's default
    #: (every role but "security").
    LIVE_SWITCH: ClassVar[bool | None] = None
    #: when an end installs the new TF: "commit" (at once when it commits),
    #: "boundary" (once it has delivered everything the peer sent under the
    #: old composition) or "quiescent" (boundary, and nothing held out of order)
    SWITCH_AT: ClassVar[str] = "commit"

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = self.validate_params(params or {})

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        where = f"{cls.ROLE} {cls.NAME!r}"
        unknown = set(params) - set(cls.PARAMS)
        if unknown:
            raise CompositionError(
                f"{where}: unknown parameter(s) {sorted(unknown)}; "
                f"known: {sorted(cls.PARAMS) or 'none'}"
            )
        out = {}
        for name, spec in cls.PARAMS.items():
            out[name] = spec.validate(where, name, params[name]) if name in params else spec.default
        return out

    @classmethod
    def live_switch_refusal(cls, old: type[TransportFunction]) -> str | None:
        """Why a running connection cannot switch from ``old`` (same role) to
        this TF, or None if it can.  A switch is allowed only if any mix of
        the old and the new TF across the two ends stays correct, since the
        ends switch at different instants."""
        return None

    def inherit(self, old: TransportFunction, **context: Any) -> None:
        """Carry over the state of ``old`` that still makes sense when this
        TF replaces it on a running connection (``context`` holds engine
        state such as ``rtt``, ``now``, ``bytes_in_flight``)."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "role": cls.ROLE,
            "name": cls.NAME,
            "version": cls.VERSION,
            "doc": (cls.__doc__ or "").strip().split("\n")[0],
            "params": {n: p.describe() for n, p in cls.PARAMS.items()},
        }
