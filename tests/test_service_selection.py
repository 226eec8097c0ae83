"""Selection: service properties -> ranked, explained compositions (pure, no I/O)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from vtl.core.composition import Composition
from vtl.core.errors import SelectionError
from vtl.core.registry import Registry
from vtl.service import (
    CapacityProfile,
    MessageProperties,
    MessagePropertyError,
    PathMeasurements,
    Preference,
    TransportProperties,
    check_message_properties,
    select,
    tf_traits,
)
from vtl.service.selection import CompositionTraits, Selector
from vtl.tfs import register_builtins
from vtl.tfs.base import Param
from vtl.tfs.congestion.base import CongestionControl
from vtl.tfs.framing import Framing
from vtl.tfs.reliability import GoBackN, NoReliability, SelectiveRepeat, StopAndWait


def names(comp: Composition) -> dict[str, str]:
    return {spec.role: spec.name for spec in comp.specs}


def top(props: TransportProperties, path: PathMeasurements | None = None, **kw) -> Composition:
    return select(props, path, **kw).top.composition


# ------------------------------------------------------------ properties


def test_taps_defaults():
    p = TransportProperties()
    assert p.reliability is Preference.REQUIRE
    assert p.preserve_order is Preference.REQUIRE
    assert p.preserve_msg_boundaries is Preference.NO_PREFERENCE
    assert p.per_msg_reliability is Preference.NO_PREFERENCE
    assert p.congestion_control is Preference.REQUIRE
    assert p.capacity_profile is CapacityProfile.DEFAULT
    assert p.max_delay_ms is p.min_throughput_mbps is p.max_loss_percent is None


def test_preferences_accept_strings_and_bools():
    p = TransportProperties(reliability="prohibit", preserve_order="No Preference")
    assert p.reliability is Preference.PROHIBIT
    assert p.preserve_order is Preference.NO_PREFERENCE
    assert TransportProperties(reliability=False).reliability is Preference.PROHIBIT
    assert TransportProperties(capacity_profile="scavenger").capacity_profile is (
        CapacityProfile.SCAVENGER
    )
    with pytest.raises(ValueError, match="preference"):
        TransportProperties(reliability="maybe")
    with pytest.raises(ValueError, match="max_loss_percent"):
        TransportProperties(max_loss_percent=120)
    with pytest.raises(ValueError, match="rtt_ms"):
        PathMeasurements(rtt_ms=-1)


def test_builtin_traits_come_from_the_tf_classes():
    assert tf_traits(SelectiveRepeat)["recovery"] == "selective"
    assert tf_traits(GoBackN)["recovery"] == "go-back-n"
    assert tf_traits(StopAndWait)["recovery"] == "stop-and-wait"
    assert tf_traits(NoReliability)["reliable"] is False


# ------------------------------------------------- property -> top choice


@pytest.mark.parametrize(
    "props, path, expected",
    [
        (
            TransportProperties(),
            None,
            dict(
                reliability="selective-repeat",
                congestion="newreno",
                ordering="ordered",
                flow="window",
                framing="stream",
            ),
        ),
        (
            TransportProperties.reliable_messages(),
            None,
            dict(reliability="selective-repeat", ordering="ordered", framing="message"),
        ),
        (
            TransportProperties.reliable_messages(ordered=False),
            None,
            dict(reliability="selective-repeat", ordering="unordered", framing="message"),
        ),
        (
            TransportProperties.unreliable_datagram(),
            None,
            dict(reliability="none", congestion="newreno", ordering="unordered", framing="message"),
        ),
        (
            TransportProperties.low_latency(),
            None,
            dict(reliability="selective-repeat", ordering="unordered", framing="message"),
        ),
        (
            TransportProperties.constant_rate(8),
            None,
            dict(reliability="selective-repeat", congestion="fixed-rate", ordering="ordered"),
        ),
        (
            TransportProperties(congestion_control="prohibit"),
            None,
            dict(reliability="selective-repeat", congestion="none"),
        ),
        (
            TransportProperties(preserve_msg_boundaries="prefer"),
            None,
            dict(framing="message"),
        ),
        (
            TransportProperties(reliability="avoid", preserve_msg_boundaries="require"),
            None,
            dict(reliability="none", framing="message"),
        ),
        # the original VTL's case: loss tolerated, a delay target a retransmission
        # would miss -> no retransmissions
        (
            TransportProperties.qos(max_delay_ms=30, max_loss_percent=5),
            PathMeasurements(rtt_ms=40, loss_percent=2),
            dict(reliability="none", congestion="newreno"),
        ),
        # ... but the same tolerance on a short path keeps retransmissions, and
        # gives up on what would still be late (partial reliability, lifetime 30 ms)
        (
            TransportProperties.qos(max_delay_ms=30, max_loss_percent=5),
            PathMeasurements(rtt_ms=5, loss_percent=2),
            dict(reliability="partial"),
        ),
    ],
    ids=[
        "defaults",
        "reliable-messages",
        "unordered-messages",
        "datagram",
        "low-latency",
        "constant-rate",
        "no-congestion-control",
        "prefer-boundaries",
        "avoid-reliability",
        "qos-loss-tolerant-long-path",
        "qos-loss-tolerant-short-path",
    ],
)
def test_top_composition(props, path, expected):
    got = names(top(props, path))
    assert {k: got[k] for k in expected} == expected


def test_constant_rate_takes_its_rate_from_min_throughput():
    comp = top(TransportProperties.constant_rate(8))
    rate = comp["congestion"].params["rate_mbps"]
    assert 8 <= rate < 8.5  # the target plus VTL's header overhead


def test_constant_rate_with_congestion_control_required_falls_back_and_says_why():
    props = TransportProperties(
        capacity_profile=CapacityProfile.CONSTANT_RATE_STREAMING, min_throughput_mbps=5
    )
    sel = select(props)
    assert sel.top.composition["congestion"].name == "newreno"
    assert "congestion_control=Require: congestion=fixed-rate" in sel.explain()


def test_scavenger_selects_ledbat():
    sel = select(TransportProperties.background())
    assert sel.top.composition["congestion"].name == "ledbat"
    assert "yields to others" in sel.explain()


def test_scavenger_is_approximated_and_says_so():
    reg = Registry()
    register_builtins(reg)
    reg.unregister("congestion", "ledbat")
    sel = select(TransportProperties.background(), registry=reg)
    cc = sel.top.composition["congestion"]
    assert cc.name == "newreno" and cc.params["beta"] < 0.5
    assert "approximation of a scavenger" in sel.explain()


def test_ranking_is_deterministic():
    a = select(TransportProperties.low_latency()).compositions
    b = select(TransportProperties.low_latency()).compositions
    assert a == b
    scores = [c.score for c in select(TransportProperties.low_latency()).ranked]
    assert scores == sorted(scores, reverse=True)


# ------------------------------------------------------ Require / Prohibit


def test_require_and_prohibit_filter_candidates():
    sel = select(TransportProperties())
    assert all(c.traits.reliable and c.traits.ordered for c in sel.ranked)
    assert all(c.traits.congestion_controlled for c in sel.ranked)
    assert sel.excluded and all(c.violations for c in sel.excluded)

    sel = select(TransportProperties(reliability="prohibit", preserve_order="prohibit"))
    assert all(not c.traits.reliable and not c.traits.ordered for c in sel.ranked)

    sel = select(TransportProperties(preserve_msg_boundaries="prohibit"))
    assert all(not c.traits.messages for c in sel.ranked)


def test_prefer_and_avoid_rank_without_excluding():
    prefer = select(TransportProperties(preserve_msg_boundaries="prefer"))
    avoid = select(TransportProperties(preserve_msg_boundaries="avoid"))
    assert prefer.top.traits.messages and not avoid.top.traits.messages
    # both framings stay eligible
    assert {c.traits.messages for c in prefer.ranked} == {True, False}
    assert {c.traits.messages for c in avoid.ranked} == {True, False}


def test_qos_targets_exclude_what_structurally_cannot_meet_them():
    # stop-and-wait: one segment per 100 ms RTT is ~0.1 Mbit/s
    sel = select(TransportProperties(min_throughput_mbps=10), PathMeasurements(rtt_ms=100))
    assert all(c.traits.recovery != "stop-and-wait" for c in sel.ranked)
    assert any(
        v.property == "min_throughput_mbps" and "stop-and-wait" in v.text
        for c in sel.excluded
        for v in c.violations
    )
    # zero tolerated loss excludes unreliable compositions
    sel = select(TransportProperties(reliability="no_preference", max_loss_percent=0))
    assert all(c.traits.reliable for c in sel.ranked)
    # measured loss above the tolerance, too
    sel = select(TransportProperties.qos(max_loss_percent=1), PathMeasurements(loss_percent=3))
    assert all(c.traits.reliable for c in sel.ranked)


# ---------------------------------------------------------- unsatisfiable


def test_per_msg_reliability_selects_partial_reliability():
    for pref in ("require", "prefer"):
        sel = select(TransportProperties(per_msg_reliability=pref))
        assert sel.top.composition["reliability"].name == "partial"
        assert sel.top.traits.partial_reliability and sel.top.traits.reliable
    # not asked for: never the first choice
    assert select(TransportProperties()).top.composition["reliability"].name != "partial"


def test_unsatisfiable_names_the_property():
    with pytest.raises(SelectionError, match="per_msg_reliability=Require") as info:
        select(TransportProperties(per_msg_reliability="require", reliability="prohibit"))
    assert "per_msg_reliability" in info.value.properties


def test_delay_target_with_tolerated_loss_sets_the_lifetime():
    sel = select(
        TransportProperties.qos(max_delay_ms=30, max_loss_percent=5),
        PathMeasurements(rtt_ms=5, loss_percent=2),
    )
    assert sel.top.composition["reliability"].params["lifetime_ms"] == 30.0
    # no tolerated loss: never gives up
    sel = select(TransportProperties.qos(max_delay_ms=30), PathMeasurements(rtt_ms=5))
    assert sel.top.composition["reliability"].name == "selective-repeat"


def test_full_checksum_recv_avoid_selects_partial_coverage():
    sel = select(TransportProperties(full_checksum_recv="avoid", recv_checksum_len=64))
    top = sel.top.composition
    assert top["integrity"].name == "partial" and top["integrity"].params == {"coverage": 64}
    assert not sel.top.traits.full_checksum
    # the default (Require) never picks it
    sel = select(TransportProperties())
    assert all(c.composition["integrity"].name == "crc32c" for c in sel.ranked)


def _without_aead() -> Registry:
    reg = Registry()
    register_builtins(reg)
    reg.unregister("security", "aead")
    return reg


def test_security_require_is_a_clear_error():
    with pytest.raises(SelectionError, match="security=Require") as info:
        select(TransportProperties(security="require"), registry=_without_aead())
    assert "encrypt" in str(info.value)
    assert info.value.properties == ["security"]


def test_security_prefer_is_reported_not_pretended():
    sel = select(TransportProperties(security="prefer"), registry=_without_aead())
    assert any("security=Prefer is not honoured" in w for w in sel.warnings)


def test_security_levels_pick_the_aead_tf():
    assert top(TransportProperties(security="require"))["security"].name == "aead"
    sel = select(TransportProperties(security="prefer"))
    assert sel.top.composition["security"].name == "aead" and not sel.warnings
    offered = [c["security"].name for c in sel.offers()]
    assert offered[0] == "aead" and "none" in offered  # Prefer: a clear fallback is offered
    assert {
        c["security"].name for c in select(TransportProperties(security="require")).offers()
    } == {"aead"}
    for level in ("no-preference", "avoid", "prohibit"):
        sel = select(TransportProperties(security=level))
        assert sel.top.composition["security"].name == "none"
        # keys nobody asked for: never offered
        assert all(c["security"].name == "none" for c in sel.offers())
    excluded = select(TransportProperties(security="prohibit")).excluded
    assert any("security=Prohibit" in c.violations[0].text for c in excluded)


def test_conflicting_requirements_name_every_property_involved():
    # reliable + tolerate no loss is fine; reliability prohibited + zero loss is not
    props = TransportProperties(reliability="prohibit", max_loss_percent=0)
    with pytest.raises(SelectionError) as info:
        select(props)
    msg = str(info.value)
    assert "max_loss_percent" in msg
    assert "max_loss_percent" in info.value.properties


def test_conflict_spread_over_candidates_is_reported_as_a_combination():
    # unreliable required by Prohibit, and the only unreliable TF cannot reach
    # the loss target, while reliable ones violate the prohibition
    props = TransportProperties(reliability="prohibit", max_loss_percent=1)
    with pytest.raises(SelectionError) as info:
        select(props, PathMeasurements(loss_percent=5))
    assert set(info.value.properties) >= {"max_loss_percent"}


# ----------------------------------------------------------------- explain


def test_explain_mentions_the_deciding_properties():
    text = select(TransportProperties.unreliable_datagram()).explain()
    assert "Chose: reliability=none" in text
    assert "preserve_order=Avoid" in text  # why unordered won
    assert "reliability=Prohibit" in text  # why the reliable ones are out
    assert "Excluded" in text

    text = select(TransportProperties.low_latency()).explain()
    assert "low-latency-interactive" in text and "head-of-line" in text

    text = select(TransportProperties.constant_rate(4)).explain()
    assert "min_throughput_mbps=4" in text and "fixed-rate" in text


def test_explain_says_why_the_runner_up_lost():
    sel = select(TransportProperties.reliable_messages())
    text = sel.explain(alternatives=4)
    assert "Runners-up" in text and "2. reliability=" in text and "behind" in text
    assert "go-back-n" in sel.explain(alternatives=40)  # further down, with its reason
    summary = sel.summary()
    assert summary.startswith("chose ") and "runner-up" in summary


# ------------------------------------------------- path measurements


def test_path_measurements_size_windows_from_bandwidth_delay_product():
    plain = top(TransportProperties())
    assert "window" not in plain["reliability"].params  # TF default when nothing known

    path = PathMeasurements(rtt_ms=100, bandwidth_mbps=100)
    comp = top(TransportProperties(), path)
    payload = Selector().payload
    bdp = 100e6 / 8 * 0.1 / payload
    assert comp["reliability"].params["window"] >= bdp
    assert comp["flow"].params["window"] >= comp["reliability"].params["window"]

    small = top(TransportProperties(), PathMeasurements(rtt_ms=1, bandwidth_mbps=10))
    assert small["reliability"].params["window"] < comp["reliability"].params["window"]


def test_path_rtt_sets_min_rto_for_latency_targets():
    a = top(TransportProperties.low_latency(), PathMeasurements(rtt_ms=10))
    b = top(TransportProperties.low_latency(), PathMeasurements(rtt_ms=80))
    assert a["reliability"].params["min_rto"] < b["reliability"].params["min_rto"] <= 0.2


def test_path_loss_changes_the_choice():
    # on a lossy long path, loss-based congestion control cannot reach the
    # target: with congestion control optional, a paced rate wins
    props = TransportProperties(congestion_control="no_preference", min_throughput_mbps=20)
    clean = top(props, PathMeasurements(rtt_ms=50))
    lossy = top(props, PathMeasurements(rtt_ms=50, loss_percent=2))
    assert clean["congestion"].name == "newreno"
    assert lossy["congestion"].name == "fixed-rate"


def test_unmeetable_path_targets_are_warnings():
    sel = select(
        TransportProperties(max_delay_ms=10, min_throughput_mbps=50),
        PathMeasurements(rtt_ms=100, bandwidth_mbps=10),
    )
    assert len(sel.warnings) == 2


# ------------------------------------------------------------------ offers


def test_offers_are_ranked_and_cover_alternatives():
    sel = select(TransportProperties())
    offers = sel.offers(4)
    assert offers[0] == sel.top.composition
    assert [sel.compositions.index(c) for c in offers] == sorted(
        sel.compositions.index(c) for c in offers
    )
    # a peer lacking selective-repeat can still take an offer
    assert any(c["reliability"].name != "selective-repeat" for c in offers)
    assert len(sel.offers(1)) == 1


def test_offer_alternatives_change_one_role_at_a_time():
    # unordered messages are preferred; a peer that insists on order should
    # still find the same composition with ordered delivery among the offers
    sel = select(TransportProperties(preserve_order="avoid"))
    top_names = names(sel.top.composition)
    offers = [names(c) for c in sel.offers(4)]
    assert {**top_names, "ordering": "ordered"} in offers
    assert {**top_names, "reliability": "go-back-n"} in offers


# ----------------------------------------------------------- third party


class Sealed(Framing):
    """Messages sealed with an AEAD (test double)."""

    NAME = "sealed-message"
    messages = True
    SERVICE_TRAITS: ClassVar[dict] = {"encrypted": True, "messages": True}
    PARAMS: ClassVar[dict[str, Param]] = {"key_id": Param(int, 0, "key", 0, 255)}


class Ledbat(CongestionControl):
    """Less than best effort (test double)."""

    NAME = "ledbat"
    SERVICE_TRAITS: ClassVar[dict] = {"congestion_controlled": True, "scavenger": True}


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    register_builtins(reg)
    reg.register(Sealed)
    reg.register(Ledbat)
    return reg


def test_third_party_tf_shows_up_as_a_candidate(registry):
    sel = select(TransportProperties(), registry=registry)
    all_names = {c.composition["framing"].name for c in sel.ranked + sel.excluded}
    assert "sealed-message" in all_names
    assert "ledbat" in {c.composition["congestion"].name for c in sel.ranked}
    # the process-wide registry does not know them
    assert "sealed-message" not in {
        c.composition["framing"].name for c in select(TransportProperties()).ranked
    }


def test_third_party_traits_make_properties_satisfiable(registry):
    registry.unregister("security", "aead")  # only the third-party TF encrypts
    comp = top(TransportProperties(security="require"), registry=registry)
    assert comp["framing"].name == "sealed-message"
    comp = top(TransportProperties.background(), registry=registry)
    assert comp["congestion"].name == "ledbat"


def test_missing_role_is_unsatisfiable():
    reg = Registry()
    reg.register(SelectiveRepeat)
    with pytest.raises(SelectionError, match="congestion"):
        select(TransportProperties(), registry=reg)


# ---------------------------------------------------- message properties


def _traits(text: str) -> CompositionTraits:
    from vtl.core.registry import default_registry

    return CompositionTraits.of(Composition.parse(text), default_registry())


def test_message_properties_raise_for_missing_guarantees():
    unreliable = _traits("reliability=none ordering=unordered framing=message")
    with pytest.raises(MessagePropertyError, match="msg_reliable"):
        check_message_properties(MessageProperties(reliable=True), unreliable, 1)
    with pytest.raises(MessagePropertyError, match="msg_ordered"):
        check_message_properties(MessageProperties(ordered=True), unreliable, 1)


def test_message_properties_report_what_is_not_honoured():
    reliable = _traits("reliability=selective-repeat framing=message")
    report = check_message_properties(
        MessageProperties(lifetime=0.1, priority=1, reliable=False, ordered=True), reliable, 3
    )
    assert report.honoured == {
        "reliable": False,
        "ordered": True,
        "lifetime": False,
        "priority": False,
    }
    assert "partial reliability" in report.notes["lifetime"]
    assert set(report.not_honoured) == {"reliable", "lifetime", "priority"}
    assert check_message_properties(None, reliable, 3).all_honoured


def test_message_lifetime_honoured_with_partial_reliability():
    partial = _traits("reliability=partial framing=message")
    report = check_message_properties(MessageProperties(lifetime=0.1), partial, 3)
    assert report.honoured == {"lifetime": True}
