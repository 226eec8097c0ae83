"""Test beds for VTL: network namespaces joined by veth pairs or emulated links (root only).

``python -m vtl.testbed cleanup`` deletes leftover test namespaces whose
creating process is gone. :class:`Topology` builds multi-host networks whose
links are emulated by a user-space relay (:mod:`vtl.testbed.emulator`);
:mod:`vtl.testbed.profiles` holds the named network profiles.
"""

from vtl.testbed.linkspec import Conditions
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
from vtl.testbed.topology import LinkInfo, LinkSpec, RunningTopology, Topology

__all__ = [
    "DEFAULT_PREFIX",
    "Conditions",
    "Host",
    "LinkInfo",
    "LinkSpec",
    "NetnsPair",
    "RunningTopology",
    "Testbed",
    "TestbedError",
    "Topology",
    "cleanup_stale",
    "list_netns",
    "netns_unavailable_reason",
]
