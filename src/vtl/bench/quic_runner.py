"""Benchmark endpoint over QUIC (aioquic), one process: a server or a client.

``python -m vtl.bench.quic_runner server --workload bulk``
``python -m vtl.bench.quic_runner client --workload bulk --to IP --port P --size 8M``

* The server makes a self-signed certificate at start (``cryptography``); the
  client does not verify it (the benchmark measures transport, not PKI).
* Bulk: the whole payload on one bidirectional stream, closed with FIN; the
  receiver answers one byte on the same stream once it has read to the end.
* Request/response: one bidirectional stream per request (as HTTP/3 does),
  FIN-terminated both ways; requests are sequential.
* Flow control windows are large (:data:`FLOW_WINDOW`) so QUIC is never
  window-limited; ``--max-datagram-size`` defaults to 1452, VTL's default,
  so both fill the same IP packets (aioquic's own default is 1200).
* ``--cc`` picks aioquic's congestion control (``reno``, its default, or
  ``cubic``).
* Retransmitted bytes: aioquic keeps no such counter, so this process wraps
  ``QuicPacketRecovery._on_packets_lost`` and adds up the 1-RTT ack-eliciting
  packets it declares lost (their data is sent again), minus the per-packet
  overhead (:data:`PACKET_OVERHEAD`). If a future aioquic renames the method
  the count is reported as ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
import sys
import time
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration

from vtl.bench.common import (
    RR_HEADER,
    BulkSink,
    RequestChecker,
    RequestPlan,
    bulk_payload,
    cpu_seconds,
    emit,
    fail,
    finish,
    runner_parser,
    stop_event,
    wait_or_stop,
)

ALPN = "vtl-bench"
FLOW_WINDOW = 1 << 30  # connection and stream flow-control windows (bytes)
DEFAULT_MAX_DATAGRAM = 1452
#: bytes of a full 1-RTT packet that are not stream payload: 1 (flags) + 8 (DCID,
#: aioquic's default length) + 2 (packet number) + 16 (AEAD tag) + ~8 (STREAM
#: frame: type, stream id, offset, length)
PACKET_OVERHEAD = 35

_lost = {"packets": 0, "bytes": 0, "hooked": False}


def _hook_loss_counter() -> None:
    try:
        from aioquic.quic.packet import QuicPacketType
        from aioquic.quic.recovery import QuicPacketRecovery

        original = QuicPacketRecovery._on_packets_lost
    except (ImportError, AttributeError):
        return

    def counting(self: Any, *args: Any, packets: Any, **kw: Any) -> Any:
        packets = list(packets)
        for p in packets:
            if p.is_ack_eliciting and p.packet_type == QuicPacketType.ONE_RTT:
                _lost["packets"] += 1
                _lost["bytes"] += max(0, p.sent_bytes - PACKET_OVERHEAD)
        return original(self, *args, packets=packets, **kw)

    QuicPacketRecovery._on_packets_lost = counting  # type: ignore[method-assign]
    _lost["hooked"] = True


def _retrans() -> dict[str, Any]:
    if not _lost["hooked"]:
        return {"retrans_bytes": None, "lost_packets": None}
    return {"retrans_bytes": _lost["bytes"], "lost_packets": _lost["packets"]}


def self_signed() -> tuple[Any, Any]:
    """A throw-away ECDSA P-256 certificate and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtl-bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("vtl-bench")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _config(args: Any, *, is_client: bool) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_size=args.max_datagram_size,
        max_data=FLOW_WINDOW,
        max_stream_data=FLOW_WINDOW,
        idle_timeout=max(30.0, min(args.timeout, 600.0)),
    )
    if args.cc:
        cfg.congestion_control_algorithm = args.cc
    if is_client:
        cfg.verify_mode = ssl.CERT_NONE
        cfg.server_name = "vtl-bench"
    else:
        cfg.certificate, cfg.private_key = self_signed()
    return cfg


async def server(args: Any) -> int:
    cfg = _config(args, is_client=False)
    loop = asyncio.get_running_loop()
    first: asyncio.Future[QuicConnectionProtocol] = loop.create_future()
    bulk_done: asyncio.Future[dict[str, Any]] = loop.create_future()
    checker = RequestChecker(args.seed)
    tasks: set[asyncio.Task[None]] = set()
    cpu: dict[str, float] = {}

    class Protocol(QuicConnectionProtocol):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            if not first.done():
                cpu["start"] = cpu_seconds()
                first.set_result(self)

    async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = BulkSink()
        while data := await reader.read(1 << 16):
            sink.feed(data)
        t_eof = time.monotonic()
        writer.write(b"k")
        writer.write_eof()
        if not bulk_done.done():
            bulk_done.set_result({**sink.result(), "t_eof": t_eof})

    async def rr(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(checker.response_for(data[: RR_HEADER.size], data[RR_HEADER.size :]))
        writer.write_eof()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future((bulk if args.workload == "bulk" else rr)(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    srv = await serve(
        args.bind, 0, configuration=cfg, create_protocol=Protocol, stream_handler=on_stream
    )
    try:
        port = srv._transport.get_extra_info("sockname")[1]  # type: ignore[attr-defined]
        emit("ready", port=port)
        stop = stop_event()
        async with asyncio.timeout(args.timeout):
            proto = await first
            if args.workload == "bulk":
                got = await bulk_done
            # The client closes the connection once it has what it wanted. If
            # that CONNECTION_CLOSE is lost, aioquic would wait for the idle
            # timeout: the orchestrator sends SIGTERM instead, once the client
            # is done.
            await wait_or_stop(proto.wait_closed(), stop)
        result: dict[str, Any] = {"role": "receiver" if args.workload == "bulk" else "server"}
        if args.workload == "bulk":
            result.update(got)
        else:
            result.update(checker.result(), ok=checker.bad == 0)
        result.update(_retrans(), cc=cfg.congestion_control_algorithm)
        return finish(result, cpu.get("start", 0.0))
    finally:
        srv.close()


async def client(args: Any) -> int:
    cfg = _config(args, is_client=True)
    payload = bulk_payload(args.size, args.seed) if args.workload == "bulk" else b""
    cpu0 = cpu_seconds()
    t_start = time.monotonic()
    result: dict[str, Any] = {"t_start": t_start, "cc": cfg.congestion_control_algorithm}
    async with asyncio.timeout(args.timeout):
        async with connect(args.to, args.port, configuration=cfg) as proto:
            result["t_connected"] = time.monotonic()
            if args.workload == "bulk":
                reader, writer = await proto.create_stream()
                writer.write(payload)
                writer.write_eof()
                ack = await reader.read()
                result.update(role="sender", bytes=len(payload), ok=ack == b"k")
            else:
                plan = RequestPlan(args)
                for i in range(len(plan.sizes)):
                    t0 = time.monotonic()
                    reader, writer = await proto.create_stream()
                    writer.write(plan.request(i))
                    writer.write_eof()
                    resp = await reader.read()
                    plan.check(i, resp, time.monotonic() - t0)
                result.update(role="client", **plan.result(), ok=plan.bad == 0)
            result["t_end"] = time.monotonic()
            proto.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proto.wait_closed()
    result.update(_retrans())
    return finish(result, cpu0)


def _options(p: Any) -> None:
    p.add_argument("--cc", default=None, help="aioquic congestion control (reno, cubic)")
    p.add_argument("--max-datagram-size", type=int, default=DEFAULT_MAX_DATAGRAM)


def main(argv: list[str] | None = None) -> int:
    args = runner_parser("python -m vtl.bench.quic_runner", _options).parse_args(argv)
    _hook_loss_counter()
    try:
        return asyncio.run(server(args) if args.role == "server" else client(args))
    except (OSError, ConnectionError, TimeoutError, EOFError) as exc:
        return fail(f"quic {args.role}: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
