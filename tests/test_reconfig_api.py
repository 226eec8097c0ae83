"""Live reconfiguration through the service API (asyncio and blocking) and
the CLI, over real UDP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from vtl.core.errors import ErrorCode
from vtl.core.events import ReconfigureDone, ReconfigureRefused
from vtl.service import Preconnection, TransportProperties
from vtl.service.blocking import connect, listen

pytestmark = pytest.mark.timeout(60)
LOOPBACK = ("127.0.0.1", 0)


async def _echo(listener, out: list) -> None:
    conn = await listener.accept()
    while data := await conn.receive():
        await conn.send(data)
    out.append(conn)
    conn.close()
    await conn.wait_closed()


async def test_service_reconfigure_mid_stream_and_refusal() -> None:
    listener = await Preconnection(local=LOOPBACK).listen()
    served: list = []
    server = asyncio.create_task(_echo(listener, served))
    try:
        conn = await Preconnection(remote=listener.local_address).initiate(timeout=5)
        first, second = os.urandom(400_000), os.urandom(400_000)
        echoed = bytearray()

        async def reader() -> None:
            while chunk := await conn.receive():
                echoed.extend(chunk)

        reading = asyncio.create_task(reader())
        await conn.send(first)
        done = await conn.reconfigure("reliability=go-back-n(window=48)", timeout=10)
        assert isinstance(done, ReconfigureDone) and not done.by_peer
        assert conn.composition["reliability"].name == "go-back-n"
        assert conn.datapath.core.reliability.params["window"] == 48
        refused = await conn.reconfigure("framing=message", timeout=10)
        assert isinstance(refused, ReconfigureRefused)
        assert refused.error_code == ErrorCode.RECONFIG_NOT_LIVE
        await conn.send(second)
        conn.close()
        await asyncio.wait_for(reading, 20)
        await conn.wait_closed()
        await asyncio.wait_for(server, 10)
        assert echoed == first + second
        peer = served[0]
        assert peer.composition["reliability"].name == "go-back-n"  # refreshed on the peer
        assert peer.stats()["reconfig"][0]["by_peer"] is True
    finally:
        server.cancel()
        await listener.close()


def test_blocking_reconfigure() -> None:
    props = TransportProperties.reliable_messages()
    errors: list[BaseException] = []
    with listen(LOOPBACK, props) as listener:

        def serve() -> None:
            try:
                with listener.accept(timeout=5) as conn:
                    while (m := conn.recv_message()) is not None:
                        conn.send_message(m[::-1])
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        server = threading.Thread(target=serve)
        server.start()
        with connect(listener.address, props, timeout=5) as conn:
            conn.send_message(b"before")
            assert conn.recv_message() == b"erofeb"
            done = conn.reconfigure("congestion=fixed-rate(rate_mbps=50)", timeout=5)
            assert isinstance(done, ReconfigureDone)
            assert conn.composition["congestion"].name == "fixed-rate"
            conn.send_message(b"after")
            assert conn.recv_message() == b"retfa"
        server.join(5)
    assert not errors


def test_cli_send_reconfigure_after(tmp_path) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(payload)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    port = 47000 + os.getpid() % 1000
    recv = subprocess.Popen(
        [sys.executable, "-m", "vtl", "recv", f"127.0.0.1:{port}", "-o", str(dst), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        time.sleep(1.0)
        cp = subprocess.run(
            [sys.executable, "-m", "vtl", "send", f"127.0.0.1:{port}", str(src), "--json"]
            + ["-c", "reliability=go-back-n(window=64)"]
            + ["--reconfigure-after", "1MiB", "reliability=selective-repeat(window=256)"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        out, _ = recv.communicate(timeout=30)
    finally:
        recv.kill()
    assert cp.returncode == 0, cp.stderr
    sent, got = json.loads(cp.stdout), json.loads(out)
    assert sent["verified"] and dst.read_bytes() == payload
    assert "selective-repeat(window=256)" in sent["composition"] == got["composition"]
    (mine,) = sent["reconfigure"]["history"]
    (theirs,) = got["reconfigurations"]
    assert not mine["by_peer"] and theirs["by_peer"]
    assert theirs["switch_seq"] == mine["peer_switch_seq"]
    bad = subprocess.run(
        [sys.executable, "-m", "vtl", "send", "127.0.0.1:9", str(src)]
        + ["--reconfigure-after", "lots", "reliability=selective-repeat"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert bad.returncode != 0 and "lots" in bad.stderr


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_switch_over_the_net3_testbed(tmp_path) -> None:
    """vtl send/recv across an emulated net3 link (10 Mbit/s, 20 ms RTT, 1 %
    loss each way), go-back-n -> selective repeat after 1 MiB."""
    from vtl.testbed import Topology

    payload = os.urandom(3 * 1024 * 1024)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(payload)
    os.chmod(tmp_path, 0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = "reliability=go-back-n(window=64)"
    with Topology.pair("net3", loss=1.0).up() as net:
        b_ip = net.addr("b")
        recv = net.hosts["b"].popen(
            [sys.executable, "-m", "vtl", "recv", f"{b_ip}:7300", "-o", str(dst), "--json"]
            + ["-c", start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        time.sleep(0.7)
        cp = net.hosts["a"].run(
            [sys.executable, "-m", "vtl", "send", f"{b_ip}:7300", str(src), "--json"]
            + ["-c", start, "--reconfigure-after", "1MiB", "reliability=selective-repeat"],
            check=False,
            timeout=150,
            env=env,
        )
        out, _ = recv.communicate(timeout=60)
    assert cp.returncode == 0, cp.stderr
    sent, got = json.loads(cp.stdout), json.loads(out)
    assert sent["verified"] and dst.read_bytes() == payload
    assert "reliability=selective-repeat" in got["composition"]
    (rec,) = got["reconfigurations"]
    assert rec["by_peer"] and rec["pause"] is not None and rec["elapsed"] > 0
