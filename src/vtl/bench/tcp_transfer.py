"""Reference bulk transfer over kernel TCP, verified like ``vtl send/recv``.

``python -m vtl.bench.tcp_transfer recv PORT`` / ``send HOST PORT FILE [--cc cubic]``
prints one JSON record; the receiver replies with the SHA-256 of what it got."""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import time

CHUNK = 256 * 1024


def recv(port: int, host: str = "::") -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind((host, port))
        ls.listen(1)
        print(json.dumps({"listening": port}), flush=True)
        conn, peer = ls.accept()
        with conn:
            start = time.monotonic()
            digest = hashlib.sha256()
            total = 0
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := conn.recv_into(buf):
                digest.update(view[:n])
                total += n
            end = time.monotonic()
            conn.sendall(json.dumps({"bytes": total, "sha256": digest.hexdigest()}).encode())
    return {
        "role": "receiver",
        "bytes": total,
        "seconds": end - start,
        "goodput_mbps": total * 8 / max(end - start, 1e-9) / 1e6,
    }


def send(host: str, port: int, path: str, cc: str | None = None) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    with socket.create_connection((host, port), timeout=30) as s:
        if cc:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        start = time.monotonic()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while part := s.recv(4096):
            reply += part
        end = time.monotonic()
        used = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    answer = json.loads(reply.decode() or "{}")
    return {
        "role": "sender",
        "transport": f"tcp-{used}",
        "bytes": len(data),
        "verified": answer.get("sha256") == digest,
        "seconds": end - start,
        "goodput_mbps": len(data) * 8 / max(end - start, 1e-9) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcp_transfer")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("port", type=int)
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("file")
    s.add_argument("--cc", default=None)
    a = p.parse_args(argv)
    out = recv(a.port) if a.cmd == "recv" else send(a.host, a.port, a.file, a.cc)
    print(json.dumps(out), flush=True)
    return 0 if out.get("verified", True) else 1


if __name__ == "__main__":
    sys.exit(main())
