"""Hooker carriers on their own (both kinds) and the whole flow path between
two test-bed namespaces, over a clean veth and over an emulated lossy link
(net3: 10 Mbit/s, 20 ms RTT, 2 % loss each way).  Every role runs as its own
process (tests/hooker_netns_peer.py) in its namespace."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hooker_helpers import run, unused_udp_port
from vtl.hooker import CarrierReset, CarrierUnavailable, get_carrier
from vtl.hooker.carriers import carrier_names, register_carrier
from vtl.testbed import Topology

PEER = str(Path(__file__).with_name("hooker_netns_peer.py"))
CARRIERS = ["vtl", "quic"]
CARRIER_PORT = 4790


# --------------------------------------------------------------- carriers alone


def test_registry() -> None:
    assert {"vtl", "quic"} <= set(carrier_names())
    assert get_carrier("vtl").name == "vtl"
    with pytest.raises(KeyError, match="unknown carrier"):
        get_carrier("carrier-pigeon")
    with pytest.raises(ValueError):
        register_carrier("bad name", lambda: None)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("carrier", CARRIERS)
def test_connect_to_a_host_without_carrier_fails_fast(carrier: str) -> None:
    async def main() -> None:
        c = get_carrier(carrier)
        try:
            t0 = time.monotonic()
            with pytest.raises(CarrierUnavailable):
                await c.connect(("127.0.0.1", unused_udp_port()), timeout=5.0)
            assert time.monotonic() - t0 < 0.5  # ICMP port unreachable, not the timeout
        finally:
            await c.close()

    run(main())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_connect_to_a_silent_port_fails_after_the_timeout(carrier: str) -> None:
    import socket

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))

    async def main() -> None:
        c = get_carrier(carrier)
        try:
            t0 = time.monotonic()
            with pytest.raises(CarrierUnavailable):
                await c.connect(silent.getsockname(), timeout=0.4)
            assert 0.35 < time.monotonic() - t0 < 1.0
        finally:
            await c.close()

    try:
        run(main())
    finally:
        silent.close()


@pytest.mark.parametrize("carrier", CARRIERS)
def test_stream_eof_abort_and_counters(carrier: str) -> None:
    """write_eof is an orderly end after the data; abort is a reset."""
    got: dict[str, Any] = {}

    async def main() -> None:
        server, client = get_carrier(carrier), get_carrier(carrier)
        done = asyncio.Event()

        async def handler(stream: Any, peer: Any) -> None:
            data = bytearray()
            try:
                while chunk := await stream.read(1 << 16):
                    data += chunk
                got["data"] = bytes(data)
                await stream.write(b"thanks")
                stream.write_eof()
                got["server_bytes"] = (stream.bytes_received, stream.bytes_sent)
                await stream.aclose(5.0)
            except CarrierReset as exc:
                got.setdefault("resets", []).append(str(exc))
            done.set()

        addr = await server.listen("127.0.0.1", 0, handler)
        try:
            s = await client.connect(("127.0.0.1", addr[1]), timeout=3.0)
            await s.write(b"\0" * 100_000 + b"end")
            s.write_eof()
            reply = bytearray()
            while chunk := await s.read(1000):
                reply += chunk
            await s.aclose(5.0)
            await asyncio.wait_for(done.wait(), 5)
            assert bytes(reply) == b"thanks"
            assert got["data"] == b"\0" * 100_000 + b"end"
            assert got["server_bytes"] == (100_003, 6)
            assert (s.bytes_sent, s.bytes_received) == (100_003, 6)
            # an abort reaches the peer's read as CarrierReset
            done.clear()
            s = await client.connect(("127.0.0.1", addr[1]), timeout=3.0)
            await s.write(b"partial")
            await asyncio.sleep(0.2)
            s.abort("test abort")
            await asyncio.wait_for(done.wait(), 5)
            assert len(got["resets"]) == 1
        finally:
            await client.close()
            await server.close()

    run(main())


# ----------------------------------------------------------------- namespaces


def _line(proc: subprocess.Popen, prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"expected {prefix!r}, got {line!r}\n{err[-3000:]}")
    return line.split()[1]


def _json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, text[-2000:]
    return json.loads(lines[-1])


def _spawn(host: Any, *args: str) -> subprocess.Popen:
    return host.popen(
        [sys.executable, PEER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate(input="", timeout=30)
    assert proc.returncode == 0, err[-3000:]
    return _json(out)


def _transfer(
    net: Any, carrier: str | None, *, flows: int, up: int, down: int
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """Client on a -> Hooker a -> (carrier) -> Hooker b -> server on b.
    ``carrier=None``: no Hooker on b (a's Hooker runs VTL and must fall back)."""
    a, b = net.hosts["a"], net.hosts["b"]
    srv = _spawn(b, "server", "--bind", b.ip4)
    hb = None
    try:
        sport = _line(srv, "PORT")
        if carrier is not None:
            hb = _spawn(b, "hooker", "--carrier", carrier, "--bind", b.ip4,
                        "--port", str(CARRIER_PORT), "--forward-to", f"{a.ip4}:9")  # fmt: skip
            _line(hb, "READY")
        ha = _spawn(a, "hooker", "--carrier", carrier or "vtl", "--bind", a.ip4,
                    "--port", str(CARRIER_PORT), "--forward-to", f"{b.ip4}:{sport}")  # fmt: skip
        hook_port = _line(ha, "READY")
        cl = a.run(
            [sys.executable, PEER, "client", "--to", f"127.0.0.1:{hook_port}",
             "--flows", str(flows), "--up", str(up), "--down", str(down), "--timeout", "100"],
            timeout=120,
        )  # fmt: skip
        result = _json(cl.stdout)
        stats_a = _stop(ha)
        stats_b = _stop(hb) if hb is not None else None
        return result, stats_a, stats_b
    finally:
        for proc in (srv, hb):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.netns
@pytest.mark.parametrize("carrier", CARRIERS)
def test_flows_over_a_lossy_link(requires_root_netns: None, carrier: str) -> None:
    flows, up, down = 4, 512 << 10, 512 << 10
    with Topology.pair("net3", loss=2).up() as net:
        result, sa, sb = _transfer(net, carrier, flows=flows, up=up, down=down)
    assert sb is not None
    print(f"{carrier} over net3 2% loss: {flows} x {up >> 10} KiB each way in "
          f"{result['seconds']} s, retransmissions a={sa.get('retransmissions')} "
          f"b={sb.get('retransmissions')}")  # fmt: skip
    assert result["results"] == ["ok"] * flows
    ea, eb = sa["engine"], sb["engine"]
    assert ea["flows_clean"] == eb["flows_clean"] == flows
    assert "fallbacks" not in ea
    # every byte of the flows went over the carrier, and each side agrees
    request = 16 + up  # REQ header + payload
    reply = 32 + down
    assert ea["bytes_to_peer_carrier"] == eb["bytes_to_app_carrier"] == flows * request
    assert eb["bytes_to_peer_carrier"] == ea["bytes_to_app_carrier"] == flows * reply
    if carrier == "vtl":
        assert sa["retransmissions"] + sb["retransmissions"] > 0  # the loss was real


@pytest.mark.netns
def test_peer_host_without_hooker_falls_back_to_tcp(requires_root_netns: None) -> None:
    """Across a real link the ICMP port unreachable comes from the peer host:
    fallback costs no timeout, and the peer is remembered."""
    with Topology.pair().up() as net:
        result, sa, _ = _transfer(net, None, flows=6, up=100_000, down=100_000)
    assert result["results"] == ["ok"] * 6
    assert result["seconds"] < 3.0
    ea = sa["engine"]
    assert ea["fallbacks"] == 6
    assert sa["carrier"]["connects"] == 1
    assert sa["carrier"]["icmp_refused"] == 1
    assert ea["bytes_to_peer_fallback"] == 6 * (16 + 100_000)


_KILL_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"no end of request yet")
print("SENT", flush=True)
sys.stdin.readline()
try:
    data = s.recv(100)
    print("EOF" if not data else "DATA", flush=True)
except ConnectionResetError:
    print("RESET", flush=True)
"""


@pytest.mark.netns
@pytest.mark.parametrize("carrier", CARRIERS)
def test_killed_hooker_resets_its_applications(requires_root_netns: None, carrier: str) -> None:
    """A Hooker process that dies must not look like a clean end of stream:
    its sockets are armed with SO_LINGER {1, 0}, so the kernel resets them."""
    with Topology.pair().up() as net:
        a, b = net.hosts["a"], net.hosts["b"]
        procs = []
        try:
            srv = _spawn(b, "server", "--bind", b.ip4)
            procs.append(srv)
            sport = _line(srv, "PORT")
            hb = _spawn(b, "hooker", "--carrier", carrier, "--bind", b.ip4,
                        "--port", str(CARRIER_PORT), "--forward-to", f"{a.ip4}:9")  # fmt: skip
            procs.append(hb)
            _line(hb, "READY")
            fwd = f"{b.ip4}:{sport}"
            ha = _spawn(a, "hooker", "--carrier", carrier, "--bind", a.ip4,
                        "--port", str(CARRIER_PORT), "--forward-to", fwd)  # fmt: skip
            procs.append(ha)
            hook_port = _line(ha, "READY")
            cl = a.popen([sys.executable, "-c", _KILL_CLIENT, hook_port], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
            procs.append(cl)
            assert cl.stdout is not None and cl.stdin is not None
            assert cl.stdout.readline().strip() == "SENT"
            time.sleep(0.5)  # the flow is spliced and waiting for the client's EOF
            ha.kill()
            ha.wait()
            cl.stdin.write("\n")
            cl.stdin.flush()
            assert cl.stdout.readline().strip() == "RESET"
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
