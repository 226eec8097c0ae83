"""Connection settings that are not part of a composition."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from vtl.core.composition import Composition
from vtl.core.registry import Registry
from vtl.core.secure_handshake import SecurityConfig


@dataclass
class ConnectionConfig:
    """Knobs of one connection (or defaults for an endpoint's connections)."""

    #: largest UDP payload we send; 1452 fits IPv6 (and IPv4) on a 1500-byte MTU
    max_datagram_size: int = 1452
    #: close the connection when nothing arrived for this long (s)
    idle_timeout: float = 30.0
    #: send a PROBE after this much silence to keep paths and peers alive (s)
    keepalive_interval: float | None = None
    #: give up the handshake after this long (s)
    handshake_timeout: float = 10.0
    #: RTT assumed before the first sample (s)
    initial_rtt: float = 0.1
    #: acknowledge at least every N data packets ...
    ack_every: int = 2
    #: ... or after this delay (s)
    max_ack_delay: float = 0.005
    #: initiator: whether to accept a counter-offer (None: accept any)
    accept_counter_offer: Callable[[Composition], bool] | None = None
    #: responder: may it use this offered composition? (None: any installed)
    acceptable: Callable[[Composition], bool] | None = None
    #: responder: compositions it proposes when it can take none of the offers
    counter_offers: list[Composition] = field(default_factory=list)
    #: TFs available to this connection (None: the process-wide registry)
    registry: Registry | None = None
    #: first sequence number we send (None: random); tests use it for wrap-around
    initial_seq: int | None = None
    #: source of connection IDs and initial sequence numbers (None: system entropy)
    rng: random.Random | None = None
    #: most packets returned by one datagrams_to_send() call
    max_burst_packets: int = 256
    #: identity key and trusted peer keys for ``security=aead`` (None: none)
    security: SecurityConfig | None = None
