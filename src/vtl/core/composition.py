"""Compositions: a protocol declared as data.

A composition picks one TF per role with its parameters, for example::

    {"reliability": {"name": "selective-repeat", "window": 256},
     "congestion": "newreno", "ordering": true}

It can come from a dict, a TOML document or a compact string
(``"reliability=selective-repeat(window=256) congestion=newreno"``); it is
validated against a :class:`Registry` and instantiated once per connection.
Roles that are left out take the defaults below.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from vtl.core.errors import CompositionError
from vtl.core.registry import OPTIONAL_ROLES, ROLES, Registry, default_registry

DEFAULTS: dict[str, str] = {
    "reliability": "selective-repeat",
    "congestion": "newreno",
    "ordering": "ordered",
    "flow": "window",
    "framing": "stream",
    "fec": "none",
    "integrity": "crc32c",
    "security": "none",
}


@dataclass(frozen=True)
class TFSpec:
    """One role filled: TF name, optional pinned version, raw parameters."""

    role: str
    name: str
    version: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, **self.params}
        if self.version is not None:
            out["version"] = self.version
        return out

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        ver = f"@{self.version}" if self.version else ""
        return f"{self.name}{ver}({args})" if args else f"{self.name}{ver}"


@dataclass(frozen=True)
class Composition:
    """A validated, instantiable protocol: one :class:`TFSpec` per role."""

    specs: tuple[TFSpec, ...]

    def __getitem__(self, role: str) -> TFSpec:
        for spec in self.specs:
            if spec.role == role:
                return spec
        if role in OPTIONAL_ROLES:
            return TFSpec(role, DEFAULTS[role])
        raise KeyError(role)

    def to_dict(self) -> dict[str, Any]:
        return {spec.role: spec.to_dict() for spec in self._shown()}

    def __str__(self) -> str:
        return " ".join(f"{s.role}={s}" for s in self._shown())

    def _shown(self) -> list[TFSpec]:
        return [s for s in self.specs if not _is_default_optional(s)]

    def replace(self, role: str, spec: TFSpec | str | dict) -> Composition:
        """A copy with one role changed (used by reconfiguration and
        counter-offers)."""
        data = self.to_dict()
        data[role] = spec.to_dict() if isinstance(spec, TFSpec) else spec
        return Composition.from_dict(data)

    def instantiate(self, registry: Registry | None = None, **context: Any) -> dict[str, Any]:
        """Create this connection's TF objects: ``role -> instance``.
        ``context`` gives role constructors what they need beyond parameters
        (e.g. ``max_datagram_size`` for congestion control)."""
        reg = registry or default_registry()
        out = {}
        for spec in self.specs:
            cls = reg.get(spec.role, spec.name, spec.version)
            out[spec.role] = cls(spec.params, **context.get(spec.role, {}))
        return out

    def validate(self, registry: Registry | None = None) -> Composition:
        """Check every TF is installed and every parameter valid; return self."""
        reg = registry or default_registry()
        for spec in self.specs:
            reg.get(spec.role, spec.name, spec.version).validate_params(spec.params)
        return self

    def satisfiable_by(self, inventory: dict[str, dict[str, list[str]]]) -> list[str]:
        """Which TFs a peer with this inventory lacks (empty: it has them all;
        an optional role at its default needs nothing from the peer)."""
        missing = []
        for spec in self._shown():
            versions = inventory.get(spec.role, {}).get(spec.name)
            if not versions or (spec.version is not None and spec.version not in versions):
                missing.append(
                    f"{spec.role}={spec.name}" + (f"@{spec.version}" if spec.version else "")
                )
        return missing

    # ------------------------------------------------------------ parsing

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Composition:
        if not isinstance(data, dict):
            raise CompositionError(
                f"a composition is a mapping of roles, got {type(data).__name__}"
            )
        unknown = set(data) - set(ROLES)
        if unknown:
            raise CompositionError(f"unknown role(s) {sorted(unknown)}; roles are {list(ROLES)}")
        specs = []
        for role in ROLES:
            spec = _spec(role, data.get(role, DEFAULTS[role]))
            if role in OPTIONAL_ROLES and spec == TFSpec(role, DEFAULTS[role]):
                continue  # the default of an optional role is left out
            specs.append(spec)
        comp = cls(tuple(specs))
        _check_compatible(comp)
        return comp

    @classmethod
    def from_toml(cls, text: str) -> Composition:
        try:
            return cls.from_dict(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise CompositionError(f"composition is not valid TOML: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> Composition:
        """Parse the compact form ``role=name[@version][(k=v,...)] ...``
        (also accepts TOML or JSON)."""
        text = text.strip()
        if text.startswith("{"):
            import json

            try:
                return cls.from_dict(json.loads(text))
            except ValueError as exc:
                raise CompositionError(f"composition is not valid JSON: {exc}") from None
        if "\n" in text or text.startswith("["):
            return cls.from_toml(text)
        data: dict[str, Any] = {}
        for item in _split_items(text):
            m = _ITEM.fullmatch(item)
            if not m:
                raise CompositionError(
                    f"cannot parse {item!r}; expected role=name[@version][(param=value,...)]"
                )
            role, name, version, args = m.group("role", "name", "version", "args")
            spec: dict[str, Any] = {"name": name}
            if version:
                spec["version"] = version
            for arg in filter(None, (a.strip() for a in (args or "").split(","))):
                if "=" not in arg:
                    raise CompositionError(f"{role} {name!r}: bad parameter {arg!r}, expected k=v")
                k, v = (s.strip() for s in arg.split("=", 1))
                spec[k] = v
            data[role] = spec
        return cls.from_dict(data)


_ITEM = re.compile(
    r"(?P<role>[a-z_]+)=(?P<name>[A-Za-z0-9_.\-]+)(?:@(?P<version>[0-9A-Za-z.]+))?"
    r"(?:\((?P<args>[^()]*)\))?"
)


def _split_items(text: str) -> list[str]:
    """Split on spaces/semicolons outside parentheses."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if depth == 0 and ch in " ;\t":
            if cur:
                items.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        items.append("".join(cur))
    return items


def _check_compatible(comp: Composition) -> None:
    """Refuse combinations of roles that contradict each other."""
    names = {spec.role: spec.name for spec in comp.specs}
    security = names.get("security")
    if names.get("integrity") == "partial" and security not in (None, "none"):
        raise CompositionError(
            f"integrity=partial cannot be combined with security={security}: AEAD "
            "encryption authenticates every byte, so damaged payload is never delivered"
        )


def _is_default_optional(spec: TFSpec) -> bool:
    return (
        spec.role in OPTIONAL_ROLES
        and spec.name == DEFAULTS[spec.role]
        and spec.version is None
        and not spec.params
    )


def _spec(role: str, value: Any) -> TFSpec:
    if role == "ordering" and isinstance(value, bool):
        value = "ordered" if value else "unordered"
    if role == "framing" and isinstance(value, bool):
        value = "message" if value else "stream"
    if isinstance(value, str):
        return TFSpec(role, value)
    if isinstance(value, dict):
        params = dict(value)
        name = params.pop("name", None)
        if not isinstance(name, str) or not name:
            raise CompositionError(f"{role}: missing TF name")
        version = params.pop("version", None)
        if version is not None:
            version = str(version)
        return TFSpec(role, name, version, params)
    raise CompositionError(f"{role}: expected a TF name or a table, got {value!r}")
