"""Simple kernel-side link conditions for a namespace's interface.

Random loss comes from an nftables ``numgen random`` rule on the *ingress*
hook of the receiving interface (a drop on the sender's own egress would be
reported to TCP as local congestion, not loss); rate limiting from a tbf
qdisc on egress.  Delay needs a user-space relay (no sch_netem on this
kernel): that is the link emulator's job, not this module's."""

from __future__ import annotations

from vtl.testbed.netns import Host

TABLE = "vtl_conditions"


def set_ingress_loss(host: Host, ifname: str, percent: float) -> None:
    """Drop ``percent`` % of packets arriving on ``ifname``, at random."""
    clear_ingress_loss(host, ifname)
    if percent <= 0:
        return
    threshold = round(percent * 100)  # out of 10000
    chain = f"in_{ifname}".replace("-", "_")
    host.run(["nft", "add", "table", "netdev", TABLE])
    host.run(
        [
            "nft",
            "add",
            "chain",
            "netdev",
            TABLE,
            chain,
            f"{{ type filter hook ingress device {ifname} priority 0 ; }}",
        ]
    )
    host.run(
        [
            "nft",
            "add",
            "rule",
            "netdev",
            TABLE,
            chain,
            "numgen",
            "random",
            "mod",
            "10000",
            "<",
            str(threshold),
            "counter",
            "drop",
        ]
    )


def clear_ingress_loss(host: Host, ifname: str) -> None:
    host.run(["nft", "delete", "table", "netdev", TABLE], check=False)


def set_rate(host: Host, ifname: str, mbit: float, queue_ms: float = 50.0) -> None:
    """Limit egress of ``ifname`` to ``mbit`` Mbit/s with a drop-tail queue."""
    host.run(["tc", "qdisc", "del", "dev", ifname, "root"], check=False)
    if mbit <= 0:
        return
    rate_bytes = mbit * 1e6 / 8
    burst = max(int(rate_bytes / 250), 3000)  # ~4 ms worth, at least two MTUs
    limit = max(int(rate_bytes * queue_ms / 1000), 2 * burst)
    host.run(
        [
            "tc",
            "qdisc",
            "add",
            "dev",
            ifname,
            "root",
            "tbf",
            "rate",
            f"{mbit}mbit",
            "burst",
            str(burst),
            "limit",
            str(limit),
        ]
    )


def dropped_by_loss_rule(host: Host) -> int:
    """Packets the loss rule dropped so far (0 if there is no rule)."""
    cp = host.run(["nft", "list", "table", "netdev", TABLE], check=False)
    total = 0
    for line in (cp.stdout or "").splitlines():
        words = line.split()
        if "counter" in words and "packets" in words:
            total += int(words[words.index("packets") + 1])
    return total
