"""Reliable echo over VTL, asyncio style: a listener and a client in one script.

Both sides ask for *services*, not protocols: the client wants a reliable,
ordered byte stream (the TAPS defaults); VTL ranks the installed
compositions, offers the best ones and the listener takes the first that
meets its own properties.

    .venv/bin/python examples/reliable_echo.py
"""

from __future__ import annotations

import asyncio

from vtl.service import Preconnection, TransportProperties


async def echo_server(listener) -> None:
    conn = await listener.accept()
    print(f"server: accepted {conn.peer_address}, running {conn.composition}")
    while data := await conn.receive():  # b"" = the client finished sending
        await conn.send(data)
    conn.close()
    await conn.wait_closed()


async def main() -> None:
    properties = TransportProperties.reliable_stream()
    listener = await Preconnection(local=("127.0.0.1", 0), properties=properties).listen()
    server = asyncio.create_task(echo_server(listener))

    conn = await Preconnection(remote=listener.local_address, properties=properties).initiate(
        timeout=5
    )
    print("client: why this composition?")
    print("  " + conn.selection.explain(alternatives=1).replace("\n", "\n  "))

    payload = bytes(range(256)) * 400  # 100 KiB
    await conn.send(payload)
    conn.close()  # half-close: the server sees end of stream after the last byte
    echoed = bytearray()
    while chunk := await conn.receive():
        echoed += chunk
    await conn.wait_closed()
    await server
    await listener.close()

    assert echoed == payload, "echo mismatch"
    print(f"client: {len(echoed)} bytes echoed intact")
    honoured = conn.properties_honoured()
    for name in ("reliability", "preserve_order", "congestion_control"):
        status = honoured[name]
        print(f"  {name}: asked {status.requested}, honoured={status.honoured}")


if __name__ == "__main__":
    asyncio.run(main())
