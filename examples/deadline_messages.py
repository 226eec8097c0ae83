"""Messages with a deadline: partial reliability against selective repeat,
on the deterministic simulator.

1000 messages of 1000 bytes at 100 per second over a 40 ms RTT path with
random loss each way; each message has a 150 ms lifetime.  Selective repeat
delivers everything, late; ``reliability=partial`` abandons what cannot
arrive in time, so what it delivers is (nearly) on time.

    .venv/bin/python examples/deadline_messages.py
"""

from __future__ import annotations

import struct

from vtl.core.composition import Composition
from vtl.core.events import ConnectionTerminated, MessageReceived, PeerClosed
from vtl.sim import LinkConditions
from vtl.sim.harness import Transfer

DEADLINE = 0.15


def run(comp: str, loss: float, n: int = 1000, rate: float = 100.0) -> dict:
    t = Transfer(
        [Composition.parse(comp)],
        forward=LinkConditions(delay=0.02, loss=loss),
        close_a=None,
        seed=1,
        timeout=120.0,
    )

    def sender(i: int):
        def act(tr: Transfer) -> None:
            now = tr.net.now
            tr.conn_a.send(struct.pack("!dI", now, i) + bytes(988), lifetime=DEADLINE, now=now)

        return act

    t.schedule = [(0.2 + i / rate, sender(i)) for i in range(n)]
    t.schedule.append((0.2 + n / rate, lambda tr: tr.conn_a.close()))
    app = t.app_b
    latencies: list[float] = []

    def read(now: float, budget) -> bool:
        took = False
        while app.conn is not None and (event := app.conn.next_event()) is not None:
            took = True
            if isinstance(event, MessageReceived):
                latencies.append(now - struct.unpack("!d", event.data[:8])[0])
            elif isinstance(event, ConnectionTerminated):
                app.result.terminated = event
            elif isinstance(event, PeerClosed):
                app.result.peer_closed_at = now
        return took

    app.read = read  # type: ignore[method-assign]
    result = t.run()
    latencies.sort()
    return {
        "delivered": len(latencies),
        "on_time": sum(1 for x in latencies if x <= DEADLINE),
        "p99_ms": round(1000 * latencies[int(0.99 * len(latencies)) - 1], 1),
        "max_ms": round(1000 * latencies[-1], 1),
        "abandoned_by_sender": result.a.stats["messages_abandoned"],
        "closed_cleanly": result.clean,
    }


if __name__ == "__main__":
    for loss in (0.02, 0.10):
        for rel in ("selective-repeat", "partial"):
            stats = run(f"reliability={rel} framing=message", loss)
            print(f"loss {loss:.0%} reliability={rel}: {stats}")
