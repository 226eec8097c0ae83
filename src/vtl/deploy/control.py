"""A local control socket for a running endpoint (or, later, the host daemon).

Unix stream socket, one JSON object per line each way::

    -> {"op": "deploy", "path": "/srv/tfs/mycc.py", "sig": null}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "package sha256 ... is not on the allowlist ..."}

Operations: ``deploy`` (path, sig), ``upgrade`` (path, sig, replaces),
``remove`` (ref, force), ``list``, ``status``.  Paths are read by the
endpoint, so they are paths on its host.  The socket is created with mode
0600: whoever can connect can load code into the endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtl.deploy.deployer import Deployer
from vtl.deploy.errors import DeployError

MAX_LINE = 64 * 1024


def _result(dep) -> dict[str, Any]:
    return {
        "id": dep.id, "name": dep.name, "version": dep.version, "sha256": dep.digest,
        "tfs": dep.tf_names(), "verified_by": dep.verified_by,
        "deploy_ms": {k: round(v, 3) for k, v in dep.timing_ms.items()},
    }  # fmt: skip


def handle(deployer: Deployer, request: Any, status: Callable[[], dict] | None = None) -> dict:
    """Run one control request; errors become ``{"ok": false, "error": ...}``."""
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return {"ok": False, "error": 'a request is a JSON object with an "op"'}
    op = request["op"]
    try:
        if op == "deploy":
            dep = deployer.deploy(_path(request), request.get("sig"))
            return {"ok": True, "result": _result(dep)}
        if op == "upgrade":
            new, retired = deployer.upgrade(
                _path(request), request.get("sig"), replaces=request.get("replaces")
            )
            return {"ok": True, "result": {**_result(new), "retired": retired}}
        if op == "remove":
            ref = request.get("ref")
            if not isinstance(ref, str):
                raise DeployError('remove needs "ref": a package id or name[@version]')
            return {"ok": True, "result": deployer.remove(ref, force=bool(request.get("force")))}
        if op == "list":
            return {"ok": True, "result": deployer.list()}
        if op == "status":
            out = {"deployments": deployer.list(), "inventory": deployer.inventory()}
            if status is not None:
                out["endpoint"] = status()
            return {"ok": True, "result": out}
        return {"ok": False, "error": f"unknown op {op!r}; ops: deploy upgrade remove list status"}
    except DeployError as exc:
        return {"ok": False, "error": str(exc), "kind": type(exc).__name__}


def _path(request: dict) -> str:
    path = request.get("path")
    if not isinstance(path, str) or not path:
        raise DeployError(f'{request["op"]} needs "path": the package file')
    return path


class ControlServer:
    """Serves :func:`handle` on a unix socket on the running loop."""

    def __init__(
        self, path: str | Path, deployer: Deployer, status: Callable[[], dict] | None = None
    ) -> None:
        self.path = Path(path)
        self.deployer = deployer
        self.status = status
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> ControlServer:
        if self.path.exists():
            if not stat.S_ISSOCK(self.path.stat().st_mode):
                raise DeployError(f"{self.path} exists and is not a socket")
            if _alive(self.path):
                raise DeployError(f"control socket {self.path} is in use")
            self.path.unlink()  # left behind by an endpoint that died
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = handle(self.deployer, json.loads(line), self.status)
                except ValueError as exc:
                    reply = {"ok": False, "error": f"not JSON: {exc}"}
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away or sent an oversized line
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def __aenter__(self) -> ControlServer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


def request(path: str | Path, message: dict, timeout: float = 30.0) -> dict:
    """Send one request to a control socket and return the reply (blocking;
    for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise DeployError(f"cannot reach control socket {path}: {exc}") from None
        s.sendall(json.dumps(message).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    try:
        return json.loads(buf)
    except ValueError:
        raise DeployError(f"control socket {path} sent no valid reply") from None
