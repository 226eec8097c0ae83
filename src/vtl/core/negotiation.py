"""Version choice in negotiation.

An offer may name a TF without a version ("the newest you have").  Each end
instantiates its own newest version, which is only right while both ends
have the same newest one: once a TF is deployed or upgraded on one host, the
two may differ.  The responder therefore pins the version in its ACCEPT to
the newest one both ends have (from the initiator's advertised inventory)
wherever the two newest versions differ; the initiator accepts an ACCEPT
that is its offer with such versions filled in."""

from __future__ import annotations

from vtl.core.composition import Composition, TFSpec
from vtl.core.registry import Registry, version_key


def pin_versions(
    comp: Composition, registry: Registry, inventory: dict
) -> tuple[Composition | None, str]:
    """``comp`` with versions pinned where the two ends' newest differ, or
    ``(None, reason)`` when the ends share no version of some TF."""
    ours_all = registry.inventory()
    for spec in comp.specs:
        if spec.version is not None:
            continue
        theirs = [str(v) for v in inventory.get(spec.role, {}).get(spec.name, [])]
        ours = ours_all.get(spec.role, {}).get(spec.name, [])
        if not theirs or not ours:
            continue  # a peer that advertised nothing gets the old behaviour
        if max(ours, key=version_key) == max(theirs, key=version_key):
            continue
        common = set(ours) & set(theirs)
        if not common:
            return None, (
                f"no common version of {spec.role} {spec.name!r}: "
                f"ours {ours}, peer's {sorted(theirs, key=version_key)}"
            )
        version = max(common, key=version_key)
        comp = comp.replace(spec.role, TFSpec(spec.role, spec.name, version, spec.params))
    return comp, ""


def matches_offer(comp: Composition, offer: Composition) -> bool:
    """Is ``comp`` the offer, with at most the versions it left open filled in?"""
    if len(comp.specs) != len(offer.specs):
        return False
    for got, want in zip(comp.specs, offer.specs, strict=True):
        if (got.role, got.name, got.params) != (want.role, want.name, want.params):
            return False
        if want.version is not None and got.version != want.version:
            return False
    return True
