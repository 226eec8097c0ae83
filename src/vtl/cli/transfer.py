"""``vtl send`` / ``vtl recv``: move a file or stdin over VTL.

The receiver answers the sender with the SHA-256 and size of what it got, so
both ends can state that the transfer was verified end to end."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from typing import Any

from vtl.bench.common import parse_size
from vtl.cli import tf
from vtl.cli.common import add_service_arguments, emit, fail, offers_from_args, parse_address
from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import VtlError
from vtl.core.events import ReconfigureRefused

CHUNK = 256 * 1024


def add_parsers(sub) -> None:
    p = sub.add_parser("send", help="send a file (or stdin) to a 'vtl recv'")
    p.add_argument("peer", type=parse_address, help="receiver HOST:PORT")
    p.add_argument("file", nargs="?", default="-", help="file to send (default: stdin)")
    p.add_argument("--bind", type=parse_address, default=None, help="local HOST:PORT")
    p.add_argument("--timeout", type=float, default=10.0, help="handshake timeout (s)")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.add_argument(
        "--reconfigure-after",
        nargs=2,
        metavar=("BYTES", "COMPOSITION"),
        help="after sending BYTES (e.g. 4MiB), switch the running connection to "
        "COMPOSITION (only the roles named change), e.g. 'reliability=selective-repeat'",
    )
    _add_key_arguments(p, "the receiver")
    add_service_arguments(p)
    tf.add_control_arguments(p)
    p.set_defaults(func=run_send)

    r = sub.add_parser("recv", help="receive files sent with 'vtl send'")
    r.add_argument("listen", type=parse_address, help="HOST:PORT (or PORT) to listen on")
    r.add_argument("-o", "--output", default=None, help="write data here ('-' = stdout)")
    r.add_argument("--count", type=int, default=1, help="transfers to accept (0 = forever)")
    r.add_argument("--json", action="store_true", help="print one JSON record per transfer")
    _add_key_arguments(r, "senders (security=aead(mutual=true))")
    add_service_arguments(r)
    tf.add_control_arguments(r)
    r.set_defaults(func=run_recv)


def _add_key_arguments(p: argparse.ArgumentParser, whom: str) -> None:
    g = p.add_argument_group("keys of encrypted compositions (security=aead)")
    g.add_argument("--key", metavar="FILE", help="our identity key (from 'vtl keygen')")
    g.add_argument(
        "--trust",
        action="append",
        metavar="KEY",
        default=[],
        help=f"public key (file or 'vtl-ed25519 BASE64' line) of {whom} to trust; repeatable",
    )


def _config(args: argparse.Namespace) -> ConnectionConfig:
    cfg = ConnectionConfig(handshake_timeout=getattr(args, "timeout", 10.0))
    if getattr(args, "key", None) or getattr(args, "trust", None):
        from vtl.service.security import SecurityParameters

        cfg.security = SecurityParameters.from_files(args.key, args.trust).to_config()
    return cfg


def _check_keys(args: argparse.Namespace, offers, sender: bool) -> None:
    """Fail before any traffic when only secure compositions are offered
    without the keys they need."""
    if not offers or any(c["security"].name == "none" for c in offers):
        return
    if sender and not args.trust:
        raise VtlError("encrypted compositions need the receiver's public key: --trust KEY")
    if not sender and not args.key:
        raise VtlError("encrypted compositions need this receiver's identity: --key FILE")


def run_send(args: argparse.Namespace) -> int:
    try:
        offers, why = offers_from_args(args)
        args.reconfigure = None
        if args.reconfigure_after:
            size, comp = args.reconfigure_after
            try:
                nbytes = parse_size(size)
            except ValueError:
                return fail(f"--reconfigure-after: bad size {size!r} (e.g. 4MiB, 500K, 1000)")
            Composition.parse(comp)  # syntax and roles; the TFs are checked at the switch
            args.reconfigure = (nbytes, comp)
        _check_keys(args, offers, sender=True)
        _config(args)
    except VtlError as exc:
        return fail(str(exc))
    try:
        record = asyncio.run(_send(args, offers))
    except (VtlError, OSError) as exc:
        return fail(str(exc), 1)
    record["selection"] = why
    emit(record, args.json, _human("sent", record), sys.stdout if args.json else sys.stderr)
    return 0 if record["verified"] else 1


async def _send(args: argparse.Namespace, offers) -> dict[str, Any]:
    from vtl.io import UdpEndpoint

    host = args.peer[0]
    bind = args.bind or (("::" if ":" in host else "0.0.0.0"), 0)
    ep = await UdpEndpoint.create(bind, config=_config(args))
    control = None
    try:
        control = await tf.start_control(ep, args)
        for offer in offers:
            offer.validate(ep.core.config.registry)
        start = time.monotonic()
        conn = await ep.connect(args.peer, offers, timeout=args.timeout)
        ready = time.monotonic()
        digest = hashlib.sha256()
        total = 0
        src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
        reconf_rid = None
        try:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                total += len(chunk)
                await conn.send(chunk)
                if args.reconfigure and reconf_rid is None and total >= args.reconfigure[0]:
                    # ask and go on sending: the switch must not stall the data
                    reconf_rid = conn.core.reconfigure(args.reconfigure[1], ep._loop.time())
        finally:
            if src is not sys.stdin.buffer:
                src.close()
        conn.close()
        reply = b""
        while part := await conn.receive():
            reply += part
        end = time.monotonic()
        await conn.wait_closed()
        try:
            answer = json.loads(reply.decode())
        except ValueError:
            answer = {}
        stats = conn.stats()
        reconf = None
        if reconf_rid is not None:
            outcome = conn.core.reconfigure_outcome(reconf_rid)
            reconf = {"requested_after_bytes": args.reconfigure[0], "history": stats["reconfig"]}
            if isinstance(outcome, ReconfigureRefused):
                reconf["refused"] = outcome.reason
            elif outcome is None:
                reconf["refused"] = "no answer before the transfer ended"
        return {
            "role": "sender",
            "reconfigure": reconf,
            "bytes": total,
            "sha256": digest.hexdigest(),
            "verified": answer.get("sha256") == digest.hexdigest() and answer.get("bytes") == total,
            "composition": str(conn.composition),
            "counter_offer": conn.counter_offer,
            "handshake_s": ready - start,
            "seconds": end - ready,
            "goodput_mbps": total * 8 / max(end - ready, 1e-9) / 1e6,
            "retransmissions": stats.get("retransmissions"),
            "packets_lost": stats.get("packets_lost"),
            "peer_key": _peer_key(conn),
            "srtt_ms": (stats.get("srtt") or 0) * 1000,
        }
    finally:
        if control is not None:
            await control.close()
        ep.close()


def run_recv(args: argparse.Namespace) -> int:
    try:
        offers, _ = offers_from_args(args)
        _check_keys(args, offers, sender=False)
        _config(args)
    except VtlError as exc:
        return fail(str(exc))
    try:
        asyncio.run(_recv(args, offers))
    except KeyboardInterrupt:
        return 130
    except (VtlError, OSError) as exc:
        return fail(str(exc), 1)
    return 0


async def _recv(args: argparse.Namespace, offers) -> None:
    from vtl.io import UdpEndpoint

    cfg = _config(args)
    cfg.counter_offers = list(offers)
    if all(c["security"].name != "none" for c in offers):
        # the receiver insists on encryption: refuse offers in clear
        cfg.acceptable = lambda comp: comp["security"].name != "none"
    ep = await UdpEndpoint.create(args.listen, config=cfg, listen=True)
    try:
        control = await tf.start_control(ep, args)
    except BaseException:
        ep.close()
        raise
    sys.stderr.write(f"vtl recv: listening on {ep.local_address}\n")
    sys.stderr.flush()
    done = 0
    to_stdout = args.output == "-"
    try:
        while args.count == 0 or done < args.count:
            conn = await ep.accept()
            done += 1
            record = await _receive_one(conn, args.output)
            stream = sys.stderr if to_stdout or not args.json else sys.stdout
            emit(record, args.json, _human("received", record), stream)
        await ep.close(graceful=True)  # lets the last connection drain
    finally:
        if control is not None:
            await control.close()
        ep.close()


async def _receive_one(conn, output: str | None) -> dict[str, Any]:
    start = time.monotonic()
    digest = hashlib.sha256()
    total = 0
    sink = None
    if output == "-":
        sink = sys.stdout.buffer
    elif output:
        sink = open(output, "wb")  # noqa: SIM115
    try:
        while data := await conn.receive():
            digest.update(data)
            total += len(data)
            if sink is not None:
                sink.write(data)
    finally:
        if sink is not None and sink is not sys.stdout.buffer:
            sink.close()
        elif sink is not None:
            sink.flush()
    end = time.monotonic()
    answer = {"bytes": total, "sha256": digest.hexdigest()}
    await conn.send(json.dumps(answer).encode())
    conn.close()
    await conn.wait_closed()
    stats = conn.stats()
    return {
        "role": "receiver",
        "peer": conn.peer_address,
        "bytes": total,
        "sha256": answer["sha256"],
        "composition": str(conn.composition),
        "counter_offer": conn.counter_offer,
        "seconds": end - start,
        "goodput_mbps": total * 8 / max(end - start, 1e-9) / 1e6,
        "duplicate_segments": stats.get("duplicate_segments"),
        "reconfigurations": stats.get("reconfig"),
        "peer_key": _peer_key(conn),
    }


def _peer_key(conn) -> str | None:
    """The peer's authenticated identity, if the composition has one."""
    from vtl.core.secure_handshake import key_text

    ident = conn.core.peer_identity
    return key_text(ident) if ident else None


def _human(verb: str, r: dict[str, Any]) -> str:
    lines = [
        f"{verb} {r['bytes']} bytes in {r['seconds']:.3f} s: {r['goodput_mbps']:.1f} Mbit/s",
        f"  composition: {r['composition']}" + ("  (counter-offer)" if r["counter_offer"] else ""),
        f"  sha256: {r['sha256']}",
    ]
    for rec in (r.get("reconfigure") or {}).get("history") or r.get("reconfigurations") or []:
        pause = "-" if rec["pause"] is None else f"{rec['pause'] * 1000:.2f} ms"
        who = "peer" if rec["by_peer"] else "us"
        lines.append(
            f"  reconfigured (asked by {who}) after {rec['elapsed'] * 1000:.1f} ms, "
            f"delivery pause {pause}: {rec['composition']}"
        )
    if (r.get("reconfigure") or {}).get("refused"):
        lines.append(f"  reconfiguration refused: {r['reconfigure']['refused']}")
    if r.get("peer_key"):
        lines.append(f"  peer authenticated: vtl-ed25519 {r['peer_key']}")
    if "verified" in r:
        lines.append(f"  verified by receiver: {'yes' if r['verified'] else 'NO'}")
        lines.append(
            f"  retransmissions: {r['retransmissions']}  lost packets: {r['packets_lost']}"
            f"  srtt: {r['srtt_ms']:.2f} ms"
        )
    return "\n".join(lines)
