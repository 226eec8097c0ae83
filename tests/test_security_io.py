"""security=aead over real sockets: the service API (SecurityParameters,
security: Require) and ``vtl keygen`` / ``vtl send/recv --key/--trust``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vtl.core.config import ConnectionConfig
from vtl.core.errors import ErrorCode
from vtl.core.registry import Registry
from vtl.core.secure_handshake import key_text, public_bytes
from vtl.service import (
    EstablishmentError,
    KeyFileError,
    Preconnection,
    SecurityParameters,
    TransportProperties,
)
from vtl.service.security import load_identity, load_trusted_keys, save_identity
from vtl.testbed.conditions import set_ingress_loss
from vtl.tfs import register_builtins

pytestmark = pytest.mark.timeout(90)

PY = sys.executable
LOOPBACK = ("127.0.0.1", 0)
SERVER = Ed25519PrivateKey.generate()
REQUIRE = TransportProperties(security="require")


async def _echo(listener) -> None:
    conn = await listener.accept()
    while data := await conn.receive():
        await conn.send(data)
    conn.close()
    await conn.wait_closed()


async def test_require_selects_aead_and_echoes_over_udp():
    listener = await Preconnection(
        local=LOOPBACK, security=SecurityParameters(identity=SERVER)
    ).listen()
    server = asyncio.create_task(_echo(listener))
    try:
        pre = Preconnection(
            remote=listener.local_address,
            properties=REQUIRE,
            security=SecurityParameters(trusted_keys=frozenset({public_bytes(SERVER)})),
        )
        conn = await pre.initiate(timeout=5)
        assert conn.composition["security"].name == "aead"
        status = conn.properties_honoured()["security"]
        assert status.honoured is True and "aead" in status.detail
        payload = os.urandom(400_000)
        await conn.send(payload)
        conn.close()
        echoed = bytearray()
        while chunk := await conn.receive():
            echoed += chunk
        assert bytes(echoed) == payload
        assert conn.peer_identity == public_bytes(SERVER)
        await asyncio.wait_for(server, 10)
    finally:
        await listener.close()


async def test_untrusted_listener_is_a_clear_establishment_error():
    listener = await Preconnection(
        local=LOOPBACK, security=SecurityParameters(identity=SERVER)
    ).listen()
    try:
        other = public_bytes(Ed25519PrivateKey.generate())
        pre = Preconnection(
            remote=listener.local_address,
            properties=REQUIRE,
            security=SecurityParameters(trusted_keys=frozenset({other})),
        )
        with pytest.raises(EstablishmentError, match="not trusted") as info:
            await pre.initiate(timeout=5)
        assert info.value.error_code == ErrorCode.PEER_NOT_TRUSTED
        assert key_text(public_bytes(SERVER)) in str(info.value)
    finally:
        await listener.close()


async def test_require_against_a_listener_without_the_tf_fails_with_the_reason():
    registry = Registry()
    register_builtins(registry)
    registry.unregister("security", "aead")
    listener = await Preconnection(
        local=LOOPBACK, config=ConnectionConfig(registry=registry)
    ).listen()
    try:
        pre = Preconnection(
            remote=listener.local_address,
            properties=REQUIRE,
            security=SecurityParameters(trusted_keys=frozenset({public_bytes(SERVER)})),
        )
        with pytest.raises(EstablishmentError, match="security=Require") as info:
            await pre.initiate(timeout=5)
        # the listener counter-offers its clear choice; Require rejects it
        assert info.value.error_code == ErrorCode.COUNTER_OFFER_REJECTED
        # Prefer takes the clear composition instead
        pre = Preconnection(
            remote=listener.local_address,
            properties=TransportProperties(security="prefer"),
            security=SecurityParameters(trusted_keys=frozenset({public_bytes(SERVER)})),
        )
        server = asyncio.create_task(_echo(listener))
        conn = await pre.initiate(timeout=5)
        assert conn.composition["security"].name == "none"
        assert conn.properties_honoured()["security"].honoured is False
        conn.close()
        assert await conn.receive() == b""
        await asyncio.wait_for(server, 10)
    finally:
        await listener.close()


async def test_listener_requiring_security_needs_an_identity():
    with pytest.raises(Exception, match="identity"):
        await Preconnection(local=LOOPBACK, properties=REQUIRE).listen()


def test_key_files_round_trip(tmp_path):
    key = Ed25519PrivateKey.generate()
    pub = save_identity(key, tmp_path / "id.key")
    assert (tmp_path / "id.key").stat().st_mode & 0o777 == 0o600
    assert public_bytes(load_identity(tmp_path / "id.key")) == public_bytes(key)
    trusted = tmp_path / "trusted"
    trusted.write_text("# peers\n" + pub.read_text() + "\n" + key_text(public_bytes(SERVER)) + "\n")
    assert load_trusted_keys(trusted) == {public_bytes(key), public_bytes(SERVER)}
    assert load_trusted_keys(pub.read_text().strip()) == {public_bytes(key)}
    trusted.write_text("vtl-ed25519 notbase64!\n")
    with pytest.raises(KeyFileError, match="trusted:1"):
        load_trusted_keys(trusted)
    with pytest.raises(KeyFileError, match="PEM"):
        load_identity(trusted)


# ------------------------------------------------------------------ CLI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vtl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vtl", *args], capture_output=True, text=True, **kw)


def _keygen(path) -> str:
    cp = _vtl("keygen", "-o", str(path))
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.strip()


def _recv(addr: str, out, *extra: str, popen=subprocess.Popen) -> subprocess.Popen:
    proc = popen(
        [PY, "-m", "vtl", "recv", addr, "-o", str(out), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.8)
    return proc


def test_cli_keygen_send_recv_encrypted(tmp_path):
    line = _keygen(tmp_path / "server.key")
    assert line.startswith("vtl-ed25519 ") and (tmp_path / "server.key.pub").exists()
    assert _vtl("keygen", "-o", str(tmp_path / "server.key")).returncode == 2  # no overwrite
    payload = os.urandom(1_000_000)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(payload)
    port = _free_port()
    recv = _recv(
        f"127.0.0.1:{port}", dst, "--key", str(tmp_path / "server.key"), "--security", "require"
    )
    cp = _vtl(
        "send",
        f"127.0.0.1:{port}",
        str(src),
        "--json",
        "--security",
        "require",
        "--trust",
        str(tmp_path / "server.key.pub"),
        timeout=60,
    )
    out, err = recv.communicate(timeout=30)
    assert cp.returncode == 0, cp.stderr
    sent, got = json.loads(cp.stdout), json.loads(out)
    assert sent["verified"] is True and dst.read_bytes() == payload
    assert got["sha256"] == hashlib.sha256(payload).hexdigest()
    assert "security=aead" in sent["composition"] == got["composition"]
    assert sent["peer_key"] == line.split()[1]


def test_cli_wrong_trust_fails_the_handshake(tmp_path):
    _keygen(tmp_path / "server.key")
    line = _keygen(tmp_path / "other.key")
    port = _free_port()
    recv = _recv(f"127.0.0.1:{port}", tmp_path / "out", "--key", str(tmp_path / "server.key"))
    try:
        cp = _vtl(
            "send",
            f"127.0.0.1:{port}",
            "/dev/null",
            "-c",
            "security=aead",
            "--trust",
            line,
            timeout=60,
        )
        assert cp.returncode == 1
        assert "PEER_NOT_TRUSTED" in cp.stderr and "not trusted" in cp.stderr
        # a secure composition without any trusted key fails before any traffic
        cp = _vtl("send", f"127.0.0.1:{port}", "/dev/null", "--security", "require")
        assert cp.returncode == 2 and "--trust" in cp.stderr
    finally:
        recv.kill()
        recv.communicate()


@pytest.mark.netns
def test_cli_encrypted_transfer_between_namespaces_with_loss(netns_pair_factory, tmp_path):
    pair = netns_pair_factory(disable_offloads=True)
    set_ingress_loss(pair.b, pair.b.ifname, 3.0)
    set_ingress_loss(pair.a, pair.a.ifname, 3.0)
    _keygen(tmp_path / "server.key")
    payload = os.urandom(2 * 1024 * 1024)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(payload)
    recv = _recv(
        f"{pair.b.ip4}:7000",
        dst,
        "--key",
        str(tmp_path / "server.key"),
        "-c",
        "security=aead(cipher=aes-128-gcm)",
        popen=pair.b.popen,
    )
    cp = pair.a.run(
        [
            PY,
            "-m",
            "vtl",
            "send",
            f"{pair.b.ip4}:7000",
            str(src),
            "--json",
            "-c",
            "security=aead(cipher=aes-128-gcm)",
            "--trust",
            str(tmp_path / "server.key.pub"),
        ],
        check=False,
        timeout=120,
    )
    out, err = recv.communicate(timeout=60)
    assert cp.returncode == 0, cp.stderr
    sent = json.loads(cp.stdout)
    assert sent["verified"] is True and dst.read_bytes() == payload
    assert sent["retransmissions"] > 0  # the loss happened, recovery ran encrypted


def test_blocking_api_with_security():
    from vtl.service.blocking import connect, listen

    received = bytearray()

    def serve(listener) -> None:
        with listener.accept(timeout=10) as conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    with listen(LOOPBACK, security=SecurityParameters(identity=SERVER)) as listener:
        server = threading.Thread(target=serve, args=(listener,))
        server.start()
        with connect(
            listener.address,
            REQUIRE,
            security=SecurityParameters(trusted_keys=frozenset({public_bytes(SERVER)})),
        ) as conn:
            assert conn.composition["security"].name == "aead"
            conn.sendall(b"blocking and sealed")
        server.join(10)
    assert bytes(received) == b"blocking and sealed"
