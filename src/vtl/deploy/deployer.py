"""The lifecycle of deployed TF packages in one running endpoint.

``deploy`` verifies a package (allowlist or signature, on the bytes read
once, before any of its code runs), imports it and registers its TFs in the
endpoint's registry: new connections can negotiate them at once, existing
ones are untouched.  ``upgrade`` deploys a new version and retires the old
one: new connections no longer get it, connections that negotiated it keep
their TF instances (and the old code) until they end.  ``remove`` is refused
while live connections use a package's TFs unless forced, in which case
those connections are reset with ``TF_REMOVED``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtl.core.errors import ErrorCode
from vtl.core.registry import Registry, default_registry, version_key
from vtl.deploy import package as pkgmod
from vtl.deploy.errors import DeployError, InUseError
from vtl.deploy.trust import TrustPolicy, sha256_hex
from vtl.tfs.base import TransportFunction


@dataclass
class Deployment:
    """One package deployed into one endpoint."""

    id: str
    digest: str
    name: str
    version: str
    filename: str
    tfs: tuple[type[TransportFunction], ...]
    verified_by: str
    deployed_at: float
    timing_ms: dict[str, float]
    loaded: pkgmod.LoadedPackage
    state: str = "active"  # or "retiring": unregistered, kept for its connections
    replaced_by: str | None = None
    _classes: frozenset = field(default=frozenset(), repr=False)

    def tf_names(self) -> list[str]:
        return [f"{c.ROLE}={c.NAME}@{c.VERSION}" for c in self.tfs]


class Deployer:
    """Deploys, lists, upgrades and removes TF packages of one registry.

    ``connections`` returns the connections to account for (the endpoint's);
    ``on_change`` is called after connections were reset so the owner can
    flush (the asyncio endpoint schedules a send)."""

    def __init__(
        self,
        registry: Registry,
        trust: TrustPolicy,
        connections: Callable[[], Iterable[Any]],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.trust = trust
        self._connections = connections
        self._on_change = on_change
        self.deployments: dict[str, Deployment] = {}

    @classmethod
    def for_endpoint(
        cls, core: Any, trust: TrustPolicy, on_change: Callable[[], None] | None = None
    ) -> Deployer:
        """A deployer for an :class:`~vtl.core.endpoint.EndpointCore`.  An
        endpoint on the process-wide registry gets a private copy first, so
        what is deployed here does not leak into other endpoints."""
        if core.config.registry is None:
            private = Registry()
            for tf in default_registry():
                private.register(tf)
            core.config = dataclasses.replace(core.config, registry=private)
        return cls(core.config.registry, trust, lambda: list(core.connections.values()), on_change)

    # ------------------------------------------------------------- deploy

    def deploy(
        self,
        path: str | Path,
        signature: str | Path | None = None,
        *,
        data: bytes | None = None,
        sig_data: bytes | None = None,
    ) -> Deployment:
        """Verify, import and register a package (``signature`` defaults to
        ``PATH.sig`` when that file exists)."""
        self._reap()
        t0 = time.perf_counter()
        path = Path(path)
        if data is None:
            try:
                data = _read(path)
            except OSError as exc:
                raise DeployError(f"cannot read {path}: {exc}") from None
        if sig_data is None:
            sig_path = Path(signature) if signature else path.with_name(path.name + ".sig")
            if signature or sig_path.exists():
                try:
                    sig_data = sig_path.read_bytes()
                except OSError as exc:
                    raise DeployError(f"cannot read signature {sig_path}: {exc}") from None
        digest = sha256_hex(data)
        for dep in self.deployments.values():
            if dep.digest == digest:
                raise DeployError(f"{path.name}: already deployed as {dep.id} ({dep.state})")
        verified_by = self.trust.verify(data, sig_data)  # raises before any code runs
        t1 = time.perf_counter()
        loaded = pkgmod.acquire(data, digest, path.name)
        t2 = time.perf_counter()
        try:
            for cls in loaded.tfs:
                if self.registry.has(cls.ROLE, cls.NAME, cls.VERSION):
                    raise DeployError(
                        f"{path.name}: {cls.ROLE} {cls.NAME!r} version {cls.VERSION} "
                        "is already installed (deploy a new VERSION to upgrade)"
                    )
        except DeployError:
            pkgmod.release(loaded)
            raise
        for cls in loaded.tfs:
            self.registry.register(cls)
        t3 = time.perf_counter()
        dep = Deployment(
            id=digest[:12], digest=digest, name=loaded.name, version=loaded.version,
            filename=path.name, tfs=loaded.tfs, verified_by=verified_by,
            deployed_at=time.time(),
            timing_ms={
                "verify": (t1 - t0) * 1e3, "load": (t2 - t1) * 1e3,
                "register": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3,
            },
            loaded=loaded, _classes=frozenset(loaded.tfs),
        )  # fmt: skip
        self.deployments[dep.id] = dep
        return dep

    def upgrade(
        self,
        path: str | Path,
        signature: str | Path | None = None,
        *,
        replaces: str | None = None,
        data: bytes | None = None,
        sig_data: bytes | None = None,
    ) -> tuple[Deployment, list[dict[str, Any]]]:
        """Deploy a new version, then retire what it replaces: ``replaces``
        (a package reference), or else every active package with a TF of the
        same role and name at an older version.  A retired package that no
        connection uses is removed at once."""
        new = self.deploy(path, signature, data=data, sig_data=sig_data)
        if replaces is not None:
            olds = [self.find(replaces)]
        else:
            provided = {(c.ROLE, c.NAME): c.VERSION for c in new.tfs}
            olds = [
                d for d in self.deployments.values()
                if d is not new and d.state == "active" and any(
                    (c.ROLE, c.NAME) in provided
                    and version_key(c.VERSION) < version_key(provided[(c.ROLE, c.NAME)])
                    for c in d.tfs
                )
            ]  # fmt: skip
        if not olds:
            return new, []
        retired = []
        for old in olds:
            if old is new:
                continue
            self._unregister(old)
            old.state, old.replaced_by = "retiring", new.id
            users = self.users(old)
            if not users:
                self._unload(old)
            retired.append({"id": old.id, "connections": len(users),
                            "state": "removed" if not users else "retiring"})  # fmt: skip
        return new, retired

    # ------------------------------------------------------------- remove

    def remove(self, ref: str, *, force: bool = False) -> dict[str, Any]:
        """Unregister and unload a package; refused while connections use it
        unless ``force``, which resets them with ``TF_REMOVED``."""
        self._reap()
        dep = self.find(ref)
        users = self.users(dep)
        if users and not force:
            raise InUseError(
                f"package {dep.id} ({dep.name} {dep.version}) is used by "
                f"{len(users)} connection(s); retry when they end or use force"
            )
        for conn in users:
            used = self._used(conn, dep)
            names = ", ".join(f"{c.ROLE} {c.NAME!r} version {c.VERSION}" for c in used)
            conn.abort(
                ErrorCode.TF_REMOVED,
                f"transport function {names} was removed by the operator (forced)",
            )
        if dep.state == "active":
            self._unregister(dep)
        self._unload(dep)
        if users and self._on_change is not None:
            self._on_change()
        return {"id": dep.id, "removed": True, "connections_reset": len(users)}

    # -------------------------------------------------------------- query

    def find(self, ref: str) -> Deployment:
        """A deployment by id (digest prefix), ``name[@version]`` of the
        package or ``name[@version]`` of a TF it provides."""
        name, _, version = ref.partition("@")
        hits = [
            d for d in self.deployments.values()
            if (len(ref) >= 4 and d.digest.startswith(ref.lower()))
            or (d.name == name and (not version or d.version == version))
            or any(name == c.NAME and (not version or version == c.VERSION) for c in d.tfs)
        ]  # fmt: skip
        if not hits:
            raise DeployError(f"no deployed package {ref!r}; deployed: {sorted(self.deployments)}")
        if len(hits) > 1:
            active = [d for d in hits if d.state == "active"]
            if len(active) == 1 and not version:
                return active[0]
            raise DeployError(
                f"{ref!r} is ambiguous: {[f'{d.id} {d.name}@{d.version}' for d in hits]}"
            )
        return hits[0]

    def users(self, dep: Deployment) -> list[Any]:
        """Live connections holding an instance of one of the package's TFs."""
        return [c for c in self._connections() if not c.is_terminated and self._used(c, dep)]

    @staticmethod
    def _used(conn: Any, dep: Deployment) -> list[type]:
        return [
            type(v) for v in vars(conn).values()
            if isinstance(v, TransportFunction) and type(v) in dep._classes
        ]  # fmt: skip

    def list(self) -> list[dict[str, Any]]:
        self._reap()
        out = []
        for dep in self.deployments.values():
            users = self.users(dep)
            out.append({
                "id": dep.id, "name": dep.name, "version": dep.version,
                "file": dep.filename, "sha256": dep.digest, "state": dep.state,
                "replaced_by": dep.replaced_by, "verified_by": dep.verified_by,
                "tfs": dep.tf_names(), "connections": len(users),
                "connection_ids": [f"{c.local_cid:016x}" for c in users],
                "deploy_ms": {k: round(v, 3) for k, v in dep.timing_ms.items()},
                "deployed_at": dep.deployed_at,
            })  # fmt: skip
        return out

    def inventory(self) -> dict[str, dict[str, list[str]]]:
        """What new connections can negotiate (what the handshake advertises)."""
        return self.registry.inventory()

    # ----------------------------------------------------------- internals

    def _unregister(self, dep: Deployment) -> None:
        for cls in dep.tfs:
            reg = self.registry
            if reg.has(cls.ROLE, cls.NAME, cls.VERSION) and (
                reg.get(cls.ROLE, cls.NAME, cls.VERSION) is cls
            ):
                reg.unregister(cls.ROLE, cls.NAME, cls.VERSION)

    def _unload(self, dep: Deployment) -> None:
        if self.deployments.pop(dep.id, None) is not None:
            pkgmod.release(dep.loaded)

    def _reap(self) -> None:
        """Drop retired packages whose last connection has ended."""
        for dep in list(self.deployments.values()):
            if dep.state == "retiring" and not self.users(dep):
                self._unload(dep)

    def close(self) -> None:
        """Unload everything (the endpoint is going away)."""
        for dep in list(self.deployments.values()):
            if dep.state == "active":
                self._unregister(dep)
            self._unload(dep)


def _read(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(pkgmod.MAX_PACKAGE_BYTES + 1)
    if len(data) > pkgmod.MAX_PACKAGE_BYTES:
        raise DeployError(f"{path}: larger than {pkgmod.MAX_PACKAGE_BYTES} bytes")
    return data
