"""Shared pytest fixtures for VTL.

Tests marked ``netns`` need root and network namespaces. Where those are
missing they are skipped, except under CI (CI=true), where a skip would hide
a broken machine set-up: there they fail instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest

from vtl.testbed import NetnsPair, cleanup_stale, netns_unavailable_reason

_UNSET = object()
_netns_reason: object = _UNSET


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _netns_problem() -> str | None:
    """Why netns tests cannot run here (None if they can); computed once per session."""
    global _netns_reason
    if _netns_reason is _UNSET:
        _netns_reason = netns_unavailable_reason()
    return _netns_reason  # type: ignore[return-value]


def _require_netns() -> None:
    reason = _netns_problem()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"network-namespace tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"network-namespace tests need root and `ip netns`: {reason}")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Remove namespaces left behind by earlier runs that were killed.
    if os.geteuid() == 0:
        with contextlib.suppress(Exception):
            cleanup_stale()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        _require_netns()


@pytest.fixture(scope="session")
def requires_root_netns() -> None:
    """Skip (fail under CI) unless root with working network namespaces."""
    _require_netns()


@pytest.fixture
def netns_pair(requires_root_netns: None) -> Iterator[NetnsPair]:
    """A fresh NetnsPair (hosts ``a`` and ``b``), always torn down afterwards."""
    with NetnsPair() as pair:
        yield pair


@pytest.fixture
def netns_pair_factory(requires_root_netns: None) -> Iterator[Callable[..., NetnsPair]]:
    """Make NetnsPair(**kwargs) test beds (e.g. disable_offloads=True); all torn down."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(NetnsPair(**kw))
