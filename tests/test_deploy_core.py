"""Deployment and isolation, deterministically: trust checks, package
loading, the deployer lifecycle on a sans-I/O endpoint, version pinning in
negotiation and TF failure isolation over the simulated network."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import ClassVar

import pytest

from deploy_helpers import write_module, write_wheel
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.connection import Connection
from vtl.core.endpoint import EndpointCore
from vtl.core.errors import ErrorCode
from vtl.core.registry import Registry, default_registry
from vtl.deploy import Deployer, DeployError, InUseError, TrustError, TrustPolicy, keygen, sign
from vtl.deploy.trust import sha256_hex
from vtl.sim.harness import run_transfer
from vtl.tfs.congestion.newreno import NewReno
from vtl.tfs.reliability.selective_repeat import SelectiveRepeat


def fresh_registry(*extra: type) -> Registry:
    reg = Registry()
    for cls in default_registry():
        reg.register(cls)
    for cls in extra:
        reg.register(cls)
    return reg


# ------------------------------------------------------------------ trust


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    priv, pub, fp = keygen(tmp_path / "operator.key")
    other, other_pub, _ = keygen(tmp_path / "stranger.key")
    return {"priv": priv, "pub": pub, "fp": fp, "other": other}


def test_keygen_writes_private_key_0600(keys: dict) -> None:
    assert keys["priv"].stat().st_mode & 0o777 == 0o600
    assert keys["fp"] in keys["pub"].read_text()


def test_signature_and_allowlist_checks(tmp_path: Path, keys: dict) -> None:
    pkg = write_module(tmp_path)
    sig = sign(pkg, keys["priv"])
    trust = TrustPolicy.load(trusted_keys=keys["pub"])
    data = pkg.read_bytes()
    assert trust.verify(data, sig.read_bytes()) == f"signature {keys['fp']}"
    with pytest.raises(TrustError, match="digest mismatch"):
        trust.verify(data + b"\n# evil\n", sig.read_bytes())
    forged = json.loads(sig.read_text())
    raw = bytearray(base64.b64decode(forged["signature"]))
    raw[10] ^= 0x01
    forged["signature"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(TrustError, match="bad signature"):
        trust.verify(data, json.dumps(forged).encode())
    stranger = sign(pkg, keys["other"], tmp_path / "stranger.sig")
    with pytest.raises(TrustError, match="untrusted key"):
        trust.verify(data, stranger.read_bytes())
    with pytest.raises(TrustError, match="not on the allowlist and has no signature"):
        trust.verify(data, None)
    with pytest.raises(TrustError, match="malformed signature"):
        trust.verify(data, b"not json")
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# operator's list\n{sha256_hex(data)}  toycc 1.0\n")
    assert TrustPolicy.load(allowlist=allow).verify(data, None) == "allowlist"
    with pytest.raises(TrustError, match="not a hex SHA-256"):
        TrustPolicy().allow("1234")


# -------------------------------------------------------------- deployer


def make_deployer(tmp_path: Path, *digests: str) -> tuple[EndpointCore, Deployer]:
    core = EndpointCore(ConnectionConfig(), listen=True)
    trust = TrustPolicy()
    for d in digests:
        trust.allow(d)
    return core, Deployer.for_endpoint(core, trust)


def test_tampered_package_runs_no_code(tmp_path: Path, keys: dict) -> None:
    marker = tmp_path / "marker"
    pkg = write_module(tmp_path, marker=str(marker))
    sign(pkg, keys["priv"])
    pkg.write_text(pkg.read_text() + "\n# tampered after signing\n")
    core = EndpointCore(ConnectionConfig())
    dep = Deployer.for_endpoint(core, TrustPolicy.load(trusted_keys=keys["pub"]))
    with pytest.raises(TrustError, match="digest mismatch"):
        dep.deploy(pkg)
    assert not marker.exists()
    assert not dep.registry.has("congestion", "toycc")
    assert dep.list() == []


def test_deploy_registers_in_private_registry_only(tmp_path: Path) -> None:
    pkg = write_module(tmp_path)
    core, dep = make_deployer(tmp_path, sha256_hex(pkg.read_bytes()))
    d = dep.deploy(pkg)
    assert d.tf_names() == ["congestion=toycc@1.0"]
    assert core.config.registry is dep.registry
    assert dep.registry.has("congestion", "toycc", "1.0")
    assert not default_registry().has("congestion", "toycc")
    assert set(d.timing_ms) == {"verify", "load", "register", "total"}
    with pytest.raises(DeployError, match="already deployed"):
        dep.deploy(pkg)


def test_deploy_wheel_and_zip_manifest(tmp_path: Path) -> None:
    whl = write_wheel(tmp_path)
    core, dep = make_deployer(tmp_path, sha256_hex(whl.read_bytes()))
    d = dep.deploy(whl)
    assert (d.name, d.version, d.tf_names()) == ("wheelcc_pkg", "2.0", ["congestion=wheelcc@2.0"])


def test_bad_packages_are_refused_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("raise ValueError('nope')\n")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    clash = tmp_path / "clash.py"
    clash.write_text(
        "from vtl.tfs.congestion.newreno import NewReno\n"
        "class Again(NewReno):\n    '''a second newreno 1.0'''\n"
    )
    import zipfile

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.py", "")
        zf.writestr("vtl-tf.json", '{"tfs": ["escape"]}')
    pkgs = [bad, empty, clash, evil]
    core, dep = make_deployer(tmp_path, *(sha256_hex(p.read_bytes()) for p in pkgs))
    with pytest.raises(DeployError, match="raised ValueError: nope"):
        dep.deploy(bad)
    with pytest.raises(DeployError, match="provides no transport function"):
        dep.deploy(empty)
    with pytest.raises(DeployError, match="already installed"):
        dep.deploy(clash)
    with pytest.raises(DeployError, match="unsafe member path"):
        dep.deploy(evil)
    assert dep.list() == []
    assert dep.registry.get("congestion", "newreno") is NewReno


def pump(a: EndpointCore, b: EndpointCore, now: float, rounds: int = 50) -> float:
    """Exchange datagrams between two endpoints on an ideal link."""
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for datagram, _addr in src.datagrams_to_send(now):
                dst.receive(datagram, ("peer", 1), now)
                moved = True
        now += 0.001
        if not moved:
            break
    return now


def test_remove_refused_in_use_then_forced(tmp_path: Path) -> None:
    pkg = write_module(tmp_path)
    digest = sha256_hex(pkg.read_bytes())
    server, sdep = make_deployer(tmp_path, digest)
    client = EndpointCore(ConnectionConfig())
    cdep = Deployer.for_endpoint(client, sdep.trust)
    sdep.deploy(pkg)
    cdep.deploy(pkg)
    conn = client.connect(("peer", 1), [Composition.parse("congestion=toycc")], 0.0)
    now = pump(client, server, 0.0)
    assert conn.is_established and type(conn.cc).NAME == "toycc"
    with pytest.raises(InUseError, match="used by 1 connection"):
        cdep.remove("toycc")
    out = cdep.remove("toycc", force=True)
    assert out["connections_reset"] == 1
    assert conn.is_terminated
    pump(client, server, now)
    peer = next(iter(server.connections.values()), None)
    assert peer is None or peer.is_terminated
    events = []
    while (e := conn.next_event()) is not None:
        events.append(e)
    term = [e for e in events if type(e).__name__ == "ConnectionTerminated"][0]
    assert term.error_code == ErrorCode.TF_REMOVED and "removed by the operator" in term.reason
    assert not cdep.registry.has("congestion", "toycc")
    # the other endpoint's copy of the same package still works: it is shared per process
    assert sdep.registry.has("congestion", "toycc", "1.0")
    assert sdep.remove(digest[:8])["connections_reset"] == 0


# ---------------------------------------------------------- negotiation


class Toy1(NewReno):
    """toy congestion control, version 1.0"""

    NAME: ClassVar[str] = "toy"
    VERSION: ClassVar[str] = "1.0"


class Toy2(Toy1):
    """toy congestion control, version 2.0"""

    VERSION: ClassVar[str] = "2.0"


@pytest.mark.parametrize(
    ("a_has", "b_has", "want"),
    [
        ((Toy1, Toy2), (Toy1,), "1.0"),
        ((Toy1,), (Toy1, Toy2), "1.0"),
        ((Toy1, Toy2), (Toy1, Toy2), "2.0"),
    ],
)
def test_negotiation_picks_newest_common_version(a_has, b_has, want) -> None:
    r = run_transfer(
        "congestion=toy",
        data_ab=b"x" * 50_000,
        config_a=ConnectionConfig(registry=fresh_registry(*a_has)),
        config_b=ConnectionConfig(registry=fresh_registry(*b_has)),
    )
    assert r.b.data == b"x" * 50_000
    assert r.a.handshake.composition["congestion"].name == "toy"
    assert r.a.stats["cc"] and r.a.handshake.composition == r.b.handshake.composition
    got = r.a.handshake.composition["congestion"].version
    assert (got or max(v.VERSION for v in a_has)) == want


def test_no_common_version_refuses_cleanly() -> None:
    r = run_transfer(
        "congestion=toy@2.0",
        data_ab=b"x",
        config_a=ConnectionConfig(registry=fresh_registry(Toy1, Toy2)),
        config_b=ConnectionConfig(registry=fresh_registry(Toy1)),
    )
    assert r.a.handshake.error_code == ErrorCode.NO_COMMON_COMPOSITION
    assert "version 2.0 is not installed" in r.a.handshake.reason


# ------------------------------------------------------------- isolation


class RaiseOnAck(NewReno):
    """raises in the receive path"""

    NAME: ClassVar[str] = "raise-on-ack"

    def on_packets_acked(self, **kw) -> None:
        raise ZeroDivisionError("bad arithmetic in a TF")


class RaiseOnSend(NewReno):
    """raises in the send path"""

    NAME: ClassVar[str] = "raise-on-send"

    sent = 0

    def on_packet_sent(self, **kw) -> None:
        self.sent += 1
        if self.sent == 30:  # well into the transfer: the peer has accepted
            raise KeyError("missing state")


class RaiseOnRto(NewReno):
    """raises in the timer path"""

    NAME: ClassVar[str] = "raise-on-rto"

    def on_retransmission_timeout(self, **kw) -> None:
        raise RuntimeError("timer blew up")


class RaiseInInit(NewReno):
    """raises while being set up"""

    NAME: ClassVar[str] = "raise-in-init"

    def __init__(self, params=None, **kw) -> None:
        raise OSError("no")


RAISERS = (RaiseOnAck, RaiseOnSend, RaiseOnRto, RaiseInInit)


@pytest.mark.parametrize(("name", "where", "exc"), [
    ("raise-on-ack", "receive", "ZeroDivisionError"),
    ("raise-on-send", "send", "KeyError"),
])  # fmt: skip
def test_raising_tf_fails_only_its_connection_sim(name: str, where: str, exc: str) -> None:
    reg = fresh_registry(*RAISERS)
    r = run_transfer(
        f"congestion={name}",
        data_ab=b"y" * 200_000,
        config_a=ConnectionConfig(registry=reg),
        config_b=ConnectionConfig(registry=reg),
        timeout=30,
    )
    assert r.a.terminated.error_code == ErrorCode.TF_FAILURE
    assert f"congestion {name!r} version 1.0 raised {exc}" in r.a.terminated.reason
    assert f"{where} path" in r.a.terminated.reason
    seen = r.b.terminated  # the peer learns why from the RESET
    assert seen.error_code == ErrorCode.TF_FAILURE and seen.by_peer
    assert name in seen.reason
    assert r.a.stats["tf_failures"] == 1


def test_raising_tf_in_timer_path_direct_connection_api() -> None:
    reg = fresh_registry(*RAISERS)
    cfg = ConnectionConfig(registry=reg)
    a = Connection(
        is_client=True, config=cfg, offers=[Composition.parse("congestion=raise-on-rto")]
    )
    b = Connection(is_client=False, config=cfg)
    a.connect(0.0)
    from vtl.core import wire

    offer = a.datagrams_to_send(0.0)[0]
    b.accept_offer(wire.decode(offer), 0.0)
    for d in b.datagrams_to_send(0.001):
        a.receive(d, 0.002)
    for d in a.datagrams_to_send(0.003):
        b.receive(d, 0.004)
    assert a.is_established and b.is_established
    a.send(b"z" * 10_000)
    a.datagrams_to_send(0.005)  # all lost
    now = 0.005
    while not a.is_terminated and now < 10:
        now = max(now, a.next_timer() or now)
        a.handle_timer(now)  # must not raise
        out = a.datagrams_to_send(now)
    assert a.is_terminated and a.tf_failure and "timer path" in a.tf_failure
    reset = wire.decode(out[-1])
    assert reset.type is wire.PacketType.RESET
    assert wire.decode_error(reset.body)[0] == ErrorCode.TF_FAILURE
    b.receive(out[-1], now)
    assert b.is_terminated


def test_raising_tf_constructor_refuses_only_that_offer() -> None:
    reg = fresh_registry(*RAISERS)
    server = EndpointCore(ConnectionConfig(registry=reg), listen=True)
    client = EndpointCore(ConnectionConfig(registry=reg))
    bad = client.connect(("s", 1), [Composition.parse("congestion=raise-in-init")], 0.0)
    good = client.connect(("s", 1), [Composition.parse("congestion=newreno")], 0.0)
    pump(client, server, 0.0)
    assert bad.is_terminated and good.is_established
    assert server.tf_failures == 1
    events = [bad.next_event() for _ in range(bad.pending_events())]
    assert any("raise-in-init" in getattr(e, "reason", "") for e in events)


def test_engine_bug_still_propagates() -> None:
    """An exception raised by no TF is not disguised as a TF failure."""
    conn = Connection(is_client=True, offers=[Composition.parse("congestion=newreno")])
    conn.connect(0.0)

    def broken(*a, **kw):
        raise AssertionError("engine bug")

    conn._send_handshake = broken  # type: ignore[method-assign]
    with pytest.raises(AssertionError):
        conn.datagrams_to_send(0.0)


def test_other_connections_unaffected_in_sim_endpoint() -> None:
    """One endpoint, one failing and one healthy connection: the healthy one
    completes byte-exact."""
    reg = fresh_registry(*RAISERS)
    server = EndpointCore(ConnectionConfig(registry=reg), listen=True)
    client = EndpointCore(ConnectionConfig(registry=reg))
    bad = client.connect(("s", 1), [Composition.parse("congestion=raise-on-ack")], 0.0)
    good = client.connect(("s", 1), [Composition.parse("congestion=newreno")], 0.0)
    data = bytes(range(256)) * 400
    bad.send(data)
    good.send(data)
    good.close()
    now, got = 0.0, []
    for _ in range(2000):
        now = pump(client, server, now, rounds=1)
        client.handle_timer(now)
        server.handle_timer(now)
        while (c := server.accept()) is not None:
            got.append(c)
        for c in got:
            while (e := c.next_event()) is not None:
                if hasattr(e, "data") and c.composition["congestion"].name == "newreno":
                    c.received = getattr(c, "received", b"") + e.data
        if good.is_terminated:
            break
    assert bad.is_terminated and bad.tf_failure
    healthy = [c for c in got if c.composition["congestion"].name == "newreno"][0]
    assert healthy.received == data
    assert client.stats()["tf_failures"] == 1


class FlakyWindow(SelectiveRepeat):
    """raises from a property the engine reads when computing timers"""

    NAME: ClassVar[str] = "flaky-window"
    broken = False

    @property
    def window(self) -> int:
        if self.broken:
            raise ValueError("window went negative")
        return 64


def test_raising_tf_property_in_next_timer() -> None:
    reg = fresh_registry(FlakyWindow)
    server = EndpointCore(ConnectionConfig(registry=reg), listen=True)
    client = EndpointCore(ConnectionConfig(registry=reg))
    conn = client.connect(("s", 1), [Composition.parse("reliability=flaky-window")], 0.0)
    now = pump(client, server, 0.0)
    assert conn.is_established
    conn.send(b"q" * 100_000)
    conn._pace_deadline = now + 0.01  # the pacer holds data back: next_timer asks the TF
    conn.reliability.broken = True
    when = client.next_timer()  # must not raise
    assert conn.is_terminated and "reliability 'flaky-window'" in conn.tf_failure
    assert when is not None and when <= now  # due now, so the owner sends the RESET
    pump(client, server, now)
    assert all(c.is_terminated for c in server.connections.values())
    assert client.stats()["tf_failures"] == 1


def test_zip_with_vtl_tf_manifest(tmp_path: Path) -> None:
    import zipfile

    from deploy_helpers import cc_source

    path = tmp_path / "zipcc.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("zipcc/__init__.py", "")
        zf.writestr("zipcc/impl.py", cc_source("zipcc", "0.3"))
        zf.writestr("vtl-tf.json", json.dumps({"name": "zipcc", "version": "0.3",
                                               "tfs": ["zipcc.impl:ZipccCC"]}))  # fmt: skip
    core, dep = make_deployer(tmp_path, sha256_hex(path.read_bytes()))
    d = dep.deploy(path)
    assert (d.name, d.version, d.tf_names()) == ("zipcc", "0.3", ["congestion=zipcc@0.3"])
    dep.remove("zipcc@0.3")
    assert not dep.registry.has("congestion", "zipcc")
