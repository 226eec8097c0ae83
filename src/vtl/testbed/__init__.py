"""Test beds for VTL: network namespaces joined by veth pairs (root only).

``python -m vtl.testbed cleanup`` deletes leftover test namespaces whose
creating process is gone.
"""

from vtl.testbed.netns import (
    DEFAULT_PREFIX,
    Host,
    NetnsPair,
    Testbed,
    TestbedError,
    cleanup_stale,
    list_netns,
    netns_unavailable_reason,
)

__all__ = [
    "DEFAULT_PREFIX",
    "Host",
    "NetnsPair",
    "Testbed",
    "TestbedError",
    "cleanup_stale",
    "list_netns",
    "netns_unavailable_reason",
]
