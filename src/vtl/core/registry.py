"""The registry of installed transport functions, by role, name and version.

Built-in TFs register on import of ``vtl.tfs``; third-party TFs are found
through the ``vtl.tfs`` entry-point group (each entry point names a TF class
or a module whose import registers its TFs)."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator

from vtl.core.errors import CompositionError
from vtl.tfs.base import TransportFunction

log = logging.getLogger(__name__)

ROLES = (
    "reliability",
    "congestion",
    "ordering",
    "flow",
    "framing",
    "fec",
    "integrity",
    "security",
)
#: roles a composition may leave out: they then take their default TF and
#: are not written in the composition (so older compositions and peers that
#: predate these roles stay unchanged)
OPTIONAL_ROLES = ("fec", "integrity", "security")
ENTRY_POINT_GROUP = "vtl.tfs"


def version_key(version: str) -> tuple:
    """Order versions numerically where possible ("1.10" > "1.9")."""
    return tuple(int(p) if p.isdigit() else p for p in version.split("."))


class Registry:
    """Installed TFs: ``role -> name -> version -> class``."""

    def __init__(self) -> None:
        self._tfs: dict[str, dict[str, dict[str, type[TransportFunction]]]] = {}

    def register(self, cls: type[TransportFunction]) -> type[TransportFunction]:
        """Install a TF class (usable as a decorator)."""
        if cls.ROLE not in ROLES:
            raise CompositionError(f"TF {cls.__name__}: unknown role {cls.ROLE!r}")
        if not cls.NAME:
            raise CompositionError(f"TF {cls.__name__}: missing NAME")
        self._tfs.setdefault(cls.ROLE, {}).setdefault(cls.NAME, {})[cls.VERSION] = cls
        return cls

    def unregister(self, role: str, name: str, version: str | None = None) -> None:
        versions = self._tfs.get(role, {}).get(name)
        if not versions:
            raise CompositionError(f"{role} {name!r} is not installed")
        if version is None:
            del self._tfs[role][name]
        else:
            versions.pop(version, None)
            if not versions:
                del self._tfs[role][name]

    def get(self, role: str, name: str, version: str | None = None) -> type[TransportFunction]:
        """The TF class; the newest version when ``version`` is None."""
        if role not in ROLES:
            raise CompositionError(f"unknown role {role!r}; roles are {list(ROLES)}")
        versions = self._tfs.get(role, {}).get(name)
        if not versions:
            known = sorted(self._tfs.get(role, {}))
            raise CompositionError(f"{role} {name!r} is not installed; installed: {known}")
        if version is None:
            return versions[max(versions, key=version_key)]
        if version not in versions:
            raise CompositionError(
                f"{role} {name!r} version {version} is not installed; "
                f"installed: {sorted(versions, key=version_key)}"
            )
        return versions[version]

    def has(self, role: str, name: str, version: str | None = None) -> bool:
        try:
            self.get(role, name, version)
        except CompositionError:
            return False
        return True

    def __iter__(self) -> Iterator[type[TransportFunction]]:
        for role in ROLES:
            for name in sorted(self._tfs.get(role, {})):
                versions = self._tfs[role][name]
                for version in sorted(versions, key=version_key):
                    yield versions[version]

    def inventory(self) -> dict[str, dict[str, list[str]]]:
        """What is installed, as advertised in the handshake."""
        return {
            role: {name: sorted(v, key=version_key) for name, v in sorted(names.items())}
            for role, names in self._tfs.items()
        }

    def load_entry_points(self) -> list[str]:
        """Import third-party TFs; a broken plug-in is logged, not fatal."""
        loaded = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not stop VTL
                log.warning("cannot load TF entry point %s: %s", ep.name, exc)
                continue
            if isinstance(obj, type) and issubclass(obj, TransportFunction):
                self.register(obj)
            loaded.append(ep.name)
        return loaded


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry with the built-in and plug-in TFs."""
    global _default
    if _default is None:
        _default = Registry()
        from vtl.tfs import register_builtins

        register_builtins(_default)
        _default.load_entry_points()
    return _default
