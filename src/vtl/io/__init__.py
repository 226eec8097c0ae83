"""The asyncio datapath: VTL connections over real UDP sockets.

``UdpEndpoint`` drives a sans-I/O :class:`~vtl.core.endpoint.EndpointCore`
from one non-blocking UDP socket (batched reads with GRO, batched writes with
GSO, one loop timer); ``VtlConnection`` gives each connection ``send`` /
``receive`` with backpressure in both directions::

    server = await UdpEndpoint.create(("::", 4433), listen=True)
    client = await UdpEndpoint.create(("::", 0))
    conn = await client.connect(("::1", 4433), [Composition.parse("congestion=newreno")])
    await conn.send(b"hello")
    peer = await server.accept()
    assert await peer.receive() == b"hello"
"""

from vtl.io.connection import DEFAULT_HIGH_WATER, VtlConnection
from vtl.io.endpoint import UdpEndpoint
from vtl.io.errors import (
    ConnectionClosedError,
    HandshakeError,
    HandshakeTimeoutError,
    PeerResetError,
)

__all__ = [
    "DEFAULT_HIGH_WATER",
    "ConnectionClosedError",
    "HandshakeError",
    "HandshakeTimeoutError",
    "PeerResetError",
    "UdpEndpoint",
    "VtlConnection",
]
