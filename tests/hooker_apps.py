"""Plain TCP client and server programs for the Hooker tests.

They know nothing of VTL: the tests run them on testbed hosts and check
that the Hooker carries them unchanged.  Each prints one JSON line.

  server PORT MODE   MODE: sink (read to EOF, reply with hash and peer),
                     slow (read 8 KiB per 50 ms for --slow-s, then fast),
                     reset (read a little, then close with RST),
                     push BYTES (send BYTES of seeded data, then close)
  client HOST PORT MODE ...
                     exchange BYTES: send, shut down writing, read the reply
                     close-now BYTES: send and close at once (no shutdown/read)
                     reset BYTES: send, then close with RST
                     pull: read to EOF, report the hash
                     many N BYTES: N concurrent exchanges
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time


def payload(n: int, seed: int) -> bytes:
    """Random bytes with plenty of NULs (the original prototype cut at NUL)."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(n))
    for i in range(0, n, 7):
        data[i] = 0
    return bytes(data)


def out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def read_all(s: socket.socket) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    while True:
        d = s.recv(1 << 16)
        if not d:
            return n, h.hexdigest()
        h.update(d)
        n += len(d)


def rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def serve_one(c: socket.socket, addr: tuple, args: argparse.Namespace) -> None:
    peer = list(addr[:2])
    try:
        if args.mode == "sink":
            n, digest = read_all(c)
            reply = json.dumps({"n": n, "sha": digest, "peer": peer}).encode()
            c.sendall(reply)
            c.close()
            out(event="served", n=n, sha=digest, peer=peer)
        elif args.mode == "slow":
            h, n, t0 = hashlib.sha256(), 0, time.monotonic()
            while True:
                if time.monotonic() - t0 < args.slow_s:
                    d = c.recv(8192)
                    time.sleep(0.05)
                else:
                    d = c.recv(1 << 16)
                if not d:
                    break
                h.update(d)
                n += len(d)
            c.sendall(json.dumps({"n": n, "sha": h.hexdigest()}).encode())
            c.close()
            out(event="served", n=n, sha=h.hexdigest(), peer=peer)
        elif args.mode == "reset":
            c.recv(1000)
            rst_close(c)
            out(event="reset-sent", peer=peer)
        elif args.mode == "push":
            data = payload(args.bytes, args.seed)
            c.sendall(data)
            c.close()
            out(event="pushed", n=len(data), sha=hashlib.sha256(data).hexdigest(), peer=peer)
    except OSError as exc:
        out(event="error", error=type(exc).__name__, errno=exc.errno, peer=peer)


def server(args: argparse.Namespace) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", args.port))
    ls.listen(1024)
    out(event="ready")
    while True:
        c, addr = ls.accept()
        threading.Thread(target=serve_one, args=(c, addr, args), daemon=True).start()


def client(args: argparse.Namespace) -> None:
    def connect() -> socket.socket:
        s = socket.create_connection((args.host, args.port), timeout=args.timeout)
        return s

    if args.mode == "many":
        results: list[dict] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            data = payload(args.bytes, args.seed + i)
            try:
                s = connect()
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                reply = json.loads(read_reply(s))
                s.close()
                ok = reply["n"] == len(data) and reply["sha"] == hashlib.sha256(data).hexdigest()
                r = {"i": i, "ok": ok}
            except (OSError, ValueError) as exc:
                r = {"i": i, "ok": False, "error": repr(exc)}
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.count)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = [r for r in results if not r["ok"]]
        out(event="many", count=len(results), ok=len(results) - len(bad), bad=bad[:5],
            seconds=round(time.monotonic() - t0, 2))  # fmt: skip
        return

    t0 = time.monotonic()
    s = connect()
    info = {"peername": list(s.getpeername()[:2]), "sockname": list(s.getsockname()[:2])}
    info["connect_s"] = round(time.monotonic() - t0, 3)
    try:
        if args.mode == "exchange":
            data = payload(args.bytes, args.seed)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(read_reply(s))
            out(event="exchanged", sent=len(data), sha=hashlib.sha256(data).hexdigest(),
                reply=reply, seconds=round(time.monotonic() - t0, 3), **info)  # fmt: skip
        elif args.mode == "close-now":
            data = payload(args.bytes, args.seed)
            s.sendall(data)
            s.close()
            out(event="closed", sent=len(data), sha=hashlib.sha256(data).hexdigest(), **info)
        elif args.mode == "reset":
            data = payload(args.bytes, args.seed)
            s.sendall(data)
            time.sleep(args.hold)
            rst_close(s)
            out(event="reset-sent", sent=len(data), **info)
        elif args.mode == "pull":
            n, digest = read_all(s)
            out(event="pulled", n=n, sha=digest, seconds=round(time.monotonic() - t0, 3), **info)
        elif args.mode == "send-forever":
            # for kill tests: keep sending until the connection fails
            chunk = payload(1 << 16, args.seed)
            sent = 0
            try:
                while True:
                    s.sendall(chunk)
                    sent += len(chunk)
            except OSError as exc:
                out(event="failed", sent=sent, error=type(exc).__name__, **info)
    except OSError as exc:
        out(event="error", error=type(exc).__name__, errno=exc.errno, **info)
        sys.exit(3)


def read_reply(s: socket.socket) -> bytes:
    buf = b""
    while True:
        d = s.recv(65536)
        if not d:
            return buf
        buf += d


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    sv = sub.add_parser("server")
    sv.add_argument("port", type=int)
    sv.add_argument("mode", choices=["sink", "slow", "reset", "push"])
    sv.add_argument("--bytes", type=int, default=0)
    sv.add_argument("--seed", type=int, default=1)
    sv.add_argument("--slow-s", type=float, default=5.0)
    cl = sub.add_parser("client")
    cl.add_argument("host")
    cl.add_argument("port", type=int)
    cl.add_argument(
        "mode", choices=["exchange", "close-now", "reset", "pull", "many", "send-forever"]
    )
    cl.add_argument("--bytes", type=int, default=100_000)
    cl.add_argument("--count", type=int, default=1)
    cl.add_argument("--seed", type=int, default=1)
    cl.add_argument("--hold", type=float, default=0.5)
    cl.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    (server if args.role == "server" else client)(args)


if __name__ == "__main__":
    main()
