"""The network-namespace test bed: connectivity, processes and cleanup."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from vtl.testbed import NetnsPair, TestbedError, cleanup_stale, list_netns

pytestmark = pytest.mark.netns

# Binds to argv[1], prints its port, answers one datagram with b"pong:" + data,
# then prints what it got and from where.
UDP_RESPONDER = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
s.settimeout(20)
data, peer = s.recvfrom(2048)
s.sendto(b"pong:" + data, peer)
print(data.decode(), peer[0], flush=True)
"""

# Sends b"ping" to (argv[1], argv[2]) until it gets a reply; prints reply and source.
UDP_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(10):
    s.sendto(b"ping", (host, port))
    try:
        data, peer = s.recvfrom(2048)
        break
    except TimeoutError:
        continue
else:
    sys.exit("no reply")
print(data.decode(), peer[0])
"""

# Creates a NetnsPair, prints its namespace names, then waits to be killed.
CHILD_WITH_PAIR = r"""
import time
from vtl.testbed import NetnsPair
pair = NetnsPair().__enter__()
print(" ".join(pair.names), flush=True)
time.sleep(120)
"""


def test_pair_attributes(netns_pair: NetnsPair) -> None:
    a, b = netns_pair.a, netns_pair.b
    assert a.name.startswith("vtlt-") and a.name.endswith("-a")
    assert b.name.startswith("vtlt-") and b.name.endswith("-b")
    x = netns_pair.subnet
    assert (a.ip4, b.ip4) == (f"10.77.{x}.1", f"10.77.{x}.2")
    assert (a.ip6, b.ip6) == (f"fd77:{x}::1", f"fd77:{x}::2")
    assert a.peer is b and b.peer is a
    names = list_netns()
    assert a.name in names and b.name in names
    out = a.run(["ip", "-br", "addr", "show", "dev", a.ifname]).stdout
    assert f"{a.ip4}/24" in out and f"{a.ip6}/64" in out
    assert "UP" in out


@pytest.mark.parametrize("family", ["ip4", "ip6"])
def test_ping_both_ways(netns_pair: NetnsPair, family: str) -> None:
    a, b = netns_pair.a, netns_pair.b
    a.run(["ping", "-c1", "-W2", getattr(b, family)])
    b.run(["ping", "-c1", "-W2", getattr(a, family)])


@pytest.mark.parametrize("family", ["ip4", "ip6"])
@pytest.mark.parametrize("direction", ["a->b", "b->a"])
def test_udp_datagram_both_ways(netns_pair: NetnsPair, family: str, direction: str) -> None:
    client, server = (
        (netns_pair.a, netns_pair.b) if direction == "a->b" else (netns_pair.b, netns_pair.a)
    )
    server_ip, client_ip = getattr(server, family), getattr(client, family)
    responder = server.popen(
        [sys.executable, "-c", UDP_RESPONDER, server_ip], stdout=subprocess.PIPE, text=True
    )
    assert responder.stdout is not None
    port = int(responder.stdout.readline())
    reply = client.run([sys.executable, "-c", UDP_CLIENT, server_ip, str(port)], timeout=30)
    assert reply.stdout.split() == ["pong:ping", server_ip]
    assert responder.stdout.readline().split() == ["ping", client_ip]
    assert responder.wait(timeout=10) == 0
    responder.stdout.close()


def test_run_failure_raises_with_stderr(netns_pair: NetnsPair) -> None:
    with pytest.raises(TestbedError, match="boom"):
        netns_pair.a.run(["sh", "-c", "echo boom >&2; exit 3"])
    cp = netns_pair.a.run(["sh", "-c", "exit 3"], check=False)
    assert cp.returncode == 3


def test_offloads_disabled(requires_root_netns: None) -> None:
    with NetnsPair(disable_offloads=True) as pair:
        for host in (pair.a, pair.b):
            out = host.run(["ethtool", "-k", host.ifname]).stdout
            for feature in (
                "tcp-segmentation-offload",
                "generic-segmentation-offload",
                "generic-receive-offload",
            ):
                assert f"{feature}: off" in out


def test_exit_removes_namespaces_and_processes(requires_root_netns: None) -> None:
    with NetnsPair() as pair:
        names = pair.names
        sleeper = pair.b.popen(["sleep", "300"])
        # A grandchild in the same namespace, not tracked directly.
        pair.a.popen(["sh", "-c", "sleep 300 & wait"])
        assert set(names) <= set(list_netns())
    assert not set(names) & set(list_netns())
    assert sleeper.poll() is not None
    assert pair.closed


def test_exit_cleans_up_after_exception(requires_root_netns: None) -> None:
    with pytest.raises(RuntimeError, match="inside"), NetnsPair() as pair:
        names = pair.names
        raise RuntimeError("inside")
    assert not set(names) & set(list_netns())


def _start_child_with_pair() -> tuple[subprocess.Popen, list[str]]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_WITH_PAIR],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    names = child.stdout.readline().split()
    assert len(names) == 2, names
    assert set(names) <= set(list_netns())
    return child, names


def test_cleanup_stale_after_sigkill(requires_root_netns: None) -> None:
    child, names = _start_child_with_pair()
    try:
        child.kill()
        child.wait(timeout=10)
        # SIGKILL leaves no chance to clean up: the namespaces are still there ...
        assert set(names) <= set(list_netns())
        # ... until cleanup_stale() sees that their owner is gone.
        removed = cleanup_stale()
        assert set(names) <= set(removed)
        assert not set(names) & set(list_netns())
    finally:
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]


def test_sigterm_cleans_up(requires_root_netns: None) -> None:
    child, names = _start_child_with_pair()
    try:
        child.terminate()
        assert child.wait(timeout=20) == -signal.SIGTERM
        assert not set(names) & set(list_netns())
    finally:
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]


def test_cleanup_stale_keeps_live_namespaces(netns_pair: NetnsPair) -> None:
    cleanup_stale()
    assert set(netns_pair.names) <= set(list_netns())
