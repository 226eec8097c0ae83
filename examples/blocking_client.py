"""The blocking, socket-like wrapper: ``connect()`` / ``listen()``.

Without arguments the script starts its own message echo server in a thread
on loopback and talks to it; with ``HOST PORT`` it connects to a VTL
listener elsewhere (one that echoes messages).

    .venv/bin/python examples/blocking_client.py [HOST PORT]
"""

from __future__ import annotations

import sys
import threading

from vtl.service import MessageProperties, TransportProperties
from vtl.service.blocking import connect, listen

PROPERTIES = TransportProperties.reliable_messages()


def serve_one(listener) -> None:
    with listener.accept(timeout=10) as conn:
        while (message := conn.recv_message()) is not None:
            conn.send_message(message)


def main(argv: list[str]) -> int:
    server = None
    if len(argv) == 2:
        address = (argv[0], int(argv[1]))
    else:
        server = listen(("127.0.0.1", 0), PROPERTIES)
        address = server.address
        thread = threading.Thread(target=serve_one, args=(server,), daemon=True)
        thread.start()
    try:
        with connect(address, PROPERTIES, timeout=5) as conn:
            print(f"connected to {conn.getpeername()} with {conn.composition}")
            for message in (b"hello", b"", b"x" * 20000, "héllo wörld".encode()):
                conn.send_message(message)
                reply = conn.recv_message()
                assert reply == message, (message[:20], reply and reply[:20])
                print(f"  message of {len(message):5d} bytes came back whole")
            # Message properties VTL cannot act on are reported, never faked:
            report = conn.send_message(b"bye", MessageProperties(lifetime=0.5, final=True))
            print(f"  lifetime honoured? {report.honoured['lifetime']}: {report.notes['lifetime']}")
            assert conn.recv_message() == b"bye"
    finally:
        if server is not None:
            thread.join(10)
            server.close()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
