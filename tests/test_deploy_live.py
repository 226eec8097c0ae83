"""Deployment against running endpoints over real UDP sockets (loopback):
deploy, use, upgrade, refuse tampered packages, survive a raising TF,
remove, and the control socket with its CLI -- always with live connections
moving data while it happens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy_helpers import write_module, write_wheel
from vtl.core.composition import Composition
from vtl.core.errors import ErrorCode
from vtl.deploy import DeployError, InUseError, TrustError, TrustPolicy, keygen, sign
from vtl.io import ConnectionClosedError, PeerResetError, UdpEndpoint, VtlConnection

NEWRENO = Composition.parse("congestion=newreno")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Server:
    """Accepts every connection and reads it to the end (then closes it)."""

    def __init__(self, ep: UdpEndpoint) -> None:
        self.ep = ep
        self.results: dict[int, asyncio.Future] = {}
        self.task = asyncio.get_running_loop().create_task(self._serve())
        self.readers: set[asyncio.Task] = set()

    def _future(self, cid: int) -> asyncio.Future:
        return self.results.setdefault(cid, asyncio.get_running_loop().create_future())

    async def _serve(self) -> None:
        while True:
            vc = await self.ep.accept()
            task = asyncio.get_running_loop().create_task(self._read(vc))
            self.readers.add(task)
            task.add_done_callback(self.readers.discard)

    async def _read(self, vc: VtlConnection) -> None:
        fut = self._future(vc.core.peer_cid)
        parts = []
        try:
            async for chunk in vc:
                parts.append(chunk)
            vc.close()
            fut.set_result((vc, b"".join(parts)))
        except Exception as exc:
            fut.set_exception(exc)

    async def received(self, client: VtlConnection, timeout: float = 20.0):
        """(server connection, bytes) of the peer of ``client``."""
        return await asyncio.wait_for(self._future(client.core.local_cid), timeout)

    async def close(self) -> None:
        for fut in self.results.values():  # an error nobody asked for is not logged at GC
            if fut.done() and not fut.cancelled():
                fut.exception()
        self.task.cancel()
        for t in list(self.readers):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def send_slowly(vc: VtlConnection, data: bytes, chunk: int = 16384, pause: float = 0.004):
    """Send with pauses so the connection stays live for a while."""
    for i in range(0, len(data), chunk):
        await vc.send(data[i : i + chunk])
        await asyncio.sleep(pause)
    vc.close()
    await vc.wait_closed()


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    priv, pub, fp = keygen(tmp_path / "op.key")
    return {"priv": priv, "pub": pub, "trust": TrustPolicy.load(trusted_keys=pub)}


@pytest.fixture
async def hosts(keys: dict):
    """A listening server and two clients, all deployment-enabled."""
    server = await UdpEndpoint.create(("127.0.0.1", 0), listen=True)
    clients = [await UdpEndpoint.create(("127.0.0.1", 0)) for _ in range(2)]
    for ep in (server, *clients):
        ep.enable_deployment(keys["trust"])
    srv = Server(server)
    yield server, clients, srv
    await srv.close()
    for ep in (server, *clients):
        ep.deployer.close()
        ep.close()


def signed_module(tmp_path: Path, keys: dict, **kw) -> Path:
    sub = tmp_path / f"pkg{random.randrange(1 << 30)}"
    sub.mkdir()
    path = write_module(sub, **kw)
    sign(path, keys["priv"])
    return path


async def test_deploy_and_use_while_connections_run(tmp_path: Path, keys: dict, hosts) -> None:
    server, (c1, c2), srv = hosts
    addr = server.local_address
    live = await c1.connect(addr, [NEWRENO], timeout=5)
    data = blob(1_500_000, 1)
    sending = asyncio.create_task(send_slowly(live, data))
    await asyncio.sleep(0.05)

    pkg = signed_module(tmp_path, keys)
    dep = c1.deployer.deploy(pkg)
    assert dep.verified_by.startswith("signature")
    # the server has not got toycc yet: offered first, the server takes newreno
    offers = [Composition.parse("congestion=toycc"), NEWRENO]
    old = await c1.connect(addr, offers, timeout=5)
    assert old.composition["congestion"].name == "newreno"
    server.deployer.deploy(pkg)
    assert not sending.done(), "the live transfer should still be running"
    # both have it now: negotiation picks it
    new = await c1.connect(addr, offers, timeout=5)
    assert new.composition["congestion"].name == "toycc"
    assert (type(new.core.cc).NAME, type(new.core.cc).VERSION) == ("toycc", "1.0")
    [listing] = c1.deployer.list()
    assert listing["connections"] == 1 and listing["tfs"] == ["congestion=toycc@1.0"]
    # c2 receives it now and can use it with the others that have it
    c2.deployer.deploy(pkg)
    newer = await c2.connect(addr, offers, timeout=5)
    assert newer.composition["congestion"].name == "toycc"

    payloads = {new: blob(300_000, 2), old: blob(100_000, 3), newer: blob(100_000, 4)}
    await asyncio.gather(*(send_slowly(vc, d, pause=0) for vc, d in payloads.items()))
    for vc, d in payloads.items():
        peer, got = await srv.received(vc)
        assert got == d
    peer, _ = await srv.received(new)
    assert type(peer.core.cc).NAME == "toycc"
    await sending
    assert (await srv.received(live))[1] == data


async def test_upgrade_keeps_old_version_on_running_connection(
    tmp_path: Path, keys: dict, hosts
) -> None:
    server, (c1, _), srv = hosts
    addr = server.local_address
    v1 = signed_module(tmp_path, keys, version="1.0")
    for ep in (server, c1):
        ep.deployer.deploy(v1)
    comp = Composition.parse("congestion=toycc")
    conn1 = await c1.connect(addr, [comp], timeout=5)
    assert type(conn1.core.cc).VERSION == "1.0"
    data1 = blob(1_500_000, 5)
    sending = asyncio.create_task(send_slowly(conn1, data1))
    await asyncio.sleep(0.05)

    wdir = tmp_path / "wheel"
    wdir.mkdir()
    v2 = write_wheel(wdir, name="toycc", version="2.0")
    sign(v2, keys["priv"])
    for ep in (server, c1):
        new, retired = ep.deployer.upgrade(v2)
        assert new.tf_names() == ["congestion=toycc@2.0"]
        assert retired == [{"id": retired[0]["id"], "connections": 1, "state": "retiring"}]
    assert not sending.done()
    assert c1.deployer.registry.inventory()["congestion"]["toycc"] == ["2.0"]

    conn2 = await c1.connect(addr, [comp], timeout=5)
    assert type(conn2.core.cc).VERSION == "2.0"
    data2 = blob(200_000, 6)
    await send_slowly(conn2, data2, pause=0)
    peer2, got2 = await srv.received(conn2)
    assert got2 == data2 and type(peer2.core.cc).VERSION == "2.0"

    await sending
    peer1, got1 = await srv.received(conn1)
    assert got1 == data1
    assert type(conn1.core.cc).VERSION == "1.0" and type(peer1.core.cc).VERSION == "1.0"
    # once the v1 connections are over, v1 is gone
    for _ in range(100):
        if [d["version"] for d in server.deployer.list()] == ["2.0"]:
            break
        await asyncio.sleep(0.02)
    assert [d["version"] for d in server.deployer.list()] == ["2.0"]
    assert [d["version"] for d in c1.deployer.list()] == ["2.0"]


async def test_tampered_packages_are_refused_and_never_run(
    tmp_path: Path, keys: dict, hosts
) -> None:
    server, (c1, _), srv = hosts
    live = await c1.connect(server.local_address, [NEWRENO], timeout=5)
    data = blob(800_000, 7)
    sending = asyncio.create_task(send_slowly(live, data))
    marker = tmp_path / "ran"

    tampered = signed_module(tmp_path, keys, marker=str(marker))
    tampered.write_text(tampered.read_text().replace("exploded on purpose", "exploded!!"))
    with pytest.raises(TrustError, match="digest mismatch"):
        server.deployer.deploy(tampered)

    badsig = signed_module(tmp_path, keys, marker=str(marker))
    sig = json.loads(Path(f"{badsig}.sig").read_text())
    sig["signature"] = (
        sig["signature"][:10]
        + ("A" if sig["signature"][10] != "A" else "B")
        + (sig["signature"][11:])
    )
    Path(f"{badsig}.sig").write_text(json.dumps(sig))
    with pytest.raises(TrustError, match="bad signature|malformed"):
        server.deployer.deploy(badsig)

    stranger, _, _ = keygen(tmp_path / "stranger.key")
    untrusted = signed_module(tmp_path, keys, marker=str(marker))
    sign(untrusted, stranger)
    with pytest.raises(TrustError, match="untrusted key"):
        server.deployer.deploy(untrusted)

    unsigned = signed_module(tmp_path, keys, marker=str(marker))
    Path(f"{unsigned}.sig").unlink()
    with pytest.raises(TrustError, match="not on the allowlist"):
        server.deployer.deploy(unsigned)

    assert not marker.exists(), "a refused package ran code"
    assert server.deployer.list() == []
    assert not sending.done()
    good = signed_module(tmp_path, keys, marker=str(marker))
    server.deployer.deploy(good)
    assert marker.read_text() == "toycc 1.0 imported\n"
    await sending
    assert (await srv.received(live))[1] == data


async def test_raising_tf_kills_only_its_connection(tmp_path: Path, keys: dict, hosts) -> None:
    server, (c1, c2), srv = hosts
    addr = server.local_address
    pkg = signed_module(tmp_path, keys)
    for ep in (server, c1):
        ep.deployer.deploy(pkg)
    healthy = [await c1.connect(addr, [NEWRENO], timeout=5), await c2.connect(addr, [NEWRENO])]
    data = [blob(1_000_000, 10), blob(1_000_000, 11)]
    tasks = [asyncio.create_task(send_slowly(vc, d)) for vc, d in zip(healthy, data, strict=True)]
    doomed = await c1.connect(addr, [Composition.parse("congestion=toycc(fail_after_acks=20)")])
    with pytest.raises(ConnectionClosedError) as info:
        await send_slowly(doomed, blob(2_000_000, 12), pause=0)
    err = info.value
    assert err.error_code == ErrorCode.TF_FAILURE
    assert "congestion 'toycc' version 1.0 raised RuntimeError: toycc exploded" in err.reason
    with pytest.raises(PeerResetError) as peer_info:
        await srv.received(doomed)
    assert peer_info.value.error_code == ErrorCode.TF_FAILURE
    assert "toycc" in peer_info.value.reason

    await asyncio.gather(*tasks)
    for vc, d in zip(healthy, data, strict=True):
        assert (await srv.received(vc))[1] == d
    # the endpoint with the failure keeps serving new connections
    again = await c1.connect(addr, [NEWRENO], timeout=5)
    await send_slowly(again, b"still alive" * 1000, pause=0)
    assert (await srv.received(again))[1] == b"still alive" * 1000
    assert c1.stats()["tf_failures"] == 1
    assert c1.stats().get("internal_errors", 0) == 0
    assert server.stats().get("internal_errors", 0) == 0


async def test_remove_refused_in_use_then_forced(tmp_path: Path, keys: dict, hosts) -> None:
    server, (c1, _), srv = hosts
    addr = server.local_address
    pkg = signed_module(tmp_path, keys)
    for ep in (server, c1):
        ep.deployer.deploy(pkg)
    comp = Composition.parse("congestion=toycc")
    conn = await c1.connect(addr, [comp], timeout=5)
    data = blob(1_000_000, 20)
    sending = asyncio.create_task(send_slowly(conn, data))
    await asyncio.sleep(0.02)
    for ep in (server, c1):
        with pytest.raises(InUseError, match="used by 1 connection"):
            ep.deployer.remove("toycc")
    await sending
    assert (await srv.received(conn))[1] == data
    for _ in range(100):  # the server side ends once its close is acknowledged
        if not server.deployer.users(server.deployer.find("toycc")):
            break
        await asyncio.sleep(0.02)
    assert server.deployer.remove("toycc")["connections_reset"] == 0
    assert c1.deployer.remove("toycc")["connections_reset"] == 0
    assert server.deployer.list() == [] and c1.deployer.list() == []

    # deploy again, then force removal under a live connection
    pkg2 = signed_module(tmp_path, keys, version="1.1")
    for ep in (server, c1):
        ep.deployer.deploy(pkg2)
    conn = await c1.connect(addr, [comp], timeout=5)
    bystander = await c1.connect(addr, [NEWRENO], timeout=5)
    other = blob(500_000, 21)
    side = asyncio.create_task(send_slowly(bystander, other))
    doomed = asyncio.create_task(send_slowly(conn, blob(3_000_000, 22)))
    await asyncio.sleep(0.05)
    assert c1.deployer.remove("toycc", force=True)["connections_reset"] == 1
    with pytest.raises(ConnectionClosedError) as info:
        await doomed
    assert info.value.error_code == ErrorCode.TF_REMOVED
    assert "removed by the operator" in info.value.reason
    with pytest.raises(PeerResetError) as peer:
        await srv.received(conn)
    assert peer.value.error_code == ErrorCode.TF_REMOVED
    await side
    assert (await srv.received(bystander))[1] == other
    assert not c1.deployer.registry.has("congestion", "toycc")


async def test_control_socket_and_cli(tmp_path: Path, keys: dict, hosts) -> None:
    server, (c1, _), srv = hosts
    sock = str(tmp_path / "ctl.sock")
    control = await server.serve_control(sock)
    assert os.stat(sock).st_mode & 0o777 == 0o600
    live = await c1.connect(server.local_address, [NEWRENO], timeout=5)
    data = blob(1_000_000, 30)
    sending = asyncio.create_task(send_slowly(live, data))

    async def vtl(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vtl", *argv, env=ENV,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        return proc.returncode, out.decode(), err.decode()

    key = tmp_path / "cli.key"
    rc, out, _ = await vtl("tf", "keygen", str(key))
    assert rc == 0 and "fingerprint" in out
    pkg = write_module(tmp_path)
    rc, out, _ = await vtl("tf", "sign", str(pkg), "--key", str(key))
    assert rc == 0 and out.strip().endswith(".sig")
    rc, _, err = await vtl("tf", "deploy", str(pkg), "--control", sock)
    assert rc == 1 and "untrusted key" in err  # the endpoint does not trust cli.key yet
    server.deployer.trust.trust(Path(f"{key}.pub").read_text().split()[0])
    rc, out, _ = await vtl("tf", "deploy", str(pkg), "--control", sock)
    assert rc == 0 and "congestion=toycc@1.0" in out
    rc, out, _ = await vtl("tf", "list", "--control", sock, "--json")
    [entry] = json.loads(out)
    assert entry["tfs"] == ["congestion=toycc@1.0"] and entry["state"] == "active"
    rc, out, _ = await vtl("tf", "status", "--control", sock)
    assert rc == 0 and "toycc" in out and "endpoint:" in out
    c1.deployer.deploy(pkg)  # (allowed: same trusted key)
    conn = await c1.connect(server.local_address, [Composition.parse("congestion=toycc")])
    rc, _, err = await vtl("tf", "remove", "toycc", "--control", sock)
    assert rc == 1 and "used by 1 connection" in err
    rc, out, _ = await vtl("tf", "remove", "toycc", "--force", "--control", sock)
    assert rc == 0 and "1 connections reset" in out
    with pytest.raises(PeerResetError) as info:  # the server removed it: RESET to us
        await send_slowly(conn, blob(2_000_000, 31), pause=0)
    assert info.value.error_code == ErrorCode.TF_REMOVED
    with pytest.raises(ConnectionClosedError) as info:
        await srv.received(conn)
    assert info.value.error_code == ErrorCode.TF_REMOVED and not info.value.by_peer
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(b'{"op": "nonsense"}\n')
    reply = json.loads(await reader.readline())
    writer.close()
    assert reply == {"ok": False, "error": reply["error"]} and "unknown op" in reply["error"]
    await sending
    assert (await srv.received(live))[1] == data
    await control.close()
    assert not os.path.exists(sock)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vtl_recv_control_and_send_deploy(tmp_path: Path, keys: dict) -> None:
    """The real commands: ``vtl recv --control`` gets a TF deployed by
    ``vtl tf deploy``; ``vtl send --deploy`` brings its own and uses it."""
    env = ENV
    vtl = [sys.executable, "-m", "vtl"]
    port = _free_port()
    sock = tmp_path / "recv.sock"
    pkg = write_module(tmp_path)
    sign(pkg, keys["priv"])
    recv = subprocess.Popen(
        [*vtl, "recv", f"127.0.0.1:{port}", "--count", "1", "-o", str(tmp_path / "out"),
         "--json", "--control", str(sock), "--trusted-keys", str(keys["pub"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        run = lambda *a: subprocess.run([*vtl, *a], env=env, capture_output=True, text=True)  # noqa: E731
        r = run("tf", "deploy", str(pkg), "--control", str(sock))
        assert r.returncode == 0, r.stderr
        assert "toycc" in run("tf", "list", "--control", str(sock)).stdout
        src = tmp_path / "in"
        src.write_bytes(blob(300_000, 40))
        r = run(
            "send", f"127.0.0.1:{port}", str(src), "--json", "--composition", "congestion=toycc",
            "--deploy", str(pkg), "--trusted-keys", str(keys["pub"]),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)
        assert record["verified"] and "congestion=toycc" in record["composition"]
        out, err = recv.communicate(timeout=20)
        assert recv.returncode == 0, err
        assert (tmp_path / "out").read_bytes() == src.read_bytes()
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


async def test_deploy_time_module_and_wheel(tmp_path: Path, keys: dict) -> None:
    """Deploy time (verify + load + register) into a running endpoint."""
    ep = await UdpEndpoint.create(("127.0.0.1", 0), listen=True)
    try:
        dep = ep.enable_deployment(keys["trust"])
        mod = signed_module(tmp_path, keys, name="timecc")
        whl = write_wheel(tmp_path, name="timewheel", version="3.0")
        sign(whl, keys["priv"])
        for path in (mod, whl):
            d = dep.deploy(path)
            t = d.timing_ms
            print(f"deploy {path.name}: " + " ".join(f"{k}={v:.2f}ms" for k, v in t.items()))
            assert t["total"] >= t["verify"] + t["load"] > 0
            assert t["total"] < 5000
    finally:
        ep.deployer.close()
        ep.close()


async def test_control_socket_refuses_to_clobber(tmp_path: Path, keys: dict) -> None:
    ep = await UdpEndpoint.create(("127.0.0.1", 0))
    try:
        precious = tmp_path / "notes.txt"
        precious.write_text("keep me")
        with pytest.raises(DeployError, match="not a socket"):
            await ep.serve_control(str(precious), keys["trust"])
        assert precious.read_text() == "keep me"
        sock = str(tmp_path / "c.sock")
        first = await ep.serve_control(sock)
        with pytest.raises(DeployError, match="in use"):
            await ep.serve_control(sock)
        await first.close()
    finally:
        ep.deployer.close()
        ep.close()
