"""The TF registry: versions, errors that name the culprit, and third-party
TFs discovered through the ``vtl.tfs`` entry-point group of a real
installed distribution (a dist-info directory on sys.path)."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from vtl.core.composition import Composition
from vtl.core.errors import CompositionError
from vtl.core.registry import Registry
from vtl.tfs import register_builtins
from vtl.tfs.reliability import SelectiveRepeat


def fresh() -> Registry:
    reg = Registry()
    register_builtins(reg)
    return reg


def test_newest_version_wins_unless_pinned():
    reg = fresh()

    class SRv2(SelectiveRepeat):
        VERSION = "1.10"

    class SRv19(SelectiveRepeat):
        VERSION = "1.9"

    reg.register(SRv2)
    reg.register(SRv19)
    assert reg.get("reliability", "selective-repeat") is SRv2  # 1.10 > 1.9 > 1.0
    assert reg.get("reliability", "selective-repeat", "1.0") is SelectiveRepeat
    comp = Composition.parse("reliability=selective-repeat@1.9").validate(reg)
    assert isinstance(comp.instantiate(reg)["reliability"], SRv19)
    assert reg.inventory()["reliability"]["selective-repeat"] == ["1.0", "1.9", "1.10"]


def test_errors_name_role_tf_and_parameter():
    reg = fresh()
    with pytest.raises(CompositionError, match="reliability 'warp'.*not installed"):
        Composition.parse("reliability=warp").validate(reg)
    with pytest.raises(CompositionError, match="version 9.9"):
        Composition.parse("reliability=go-back-n@9.9").validate(reg)
    with pytest.raises(CompositionError, match="go-back-n.*'window'"):
        Composition.parse("reliability=go-back-n(window=-3)").validate(reg)
    with pytest.raises(CompositionError, match="unknown parameter.*'colour'"):
        Composition.parse("reliability=go-back-n(colour=red)").validate(reg)
    with pytest.raises(CompositionError, match="unknown role"):
        Composition.from_dict({"teleport": "yes"})


def test_composition_forms_agree():
    text = "reliability=selective-repeat(window=256) congestion=newreno ordering=unordered"
    toml = textwrap.dedent(
        """
        ordering = false
        [reliability]
        name = "selective-repeat"
        window = 256
        [congestion]
        name = "newreno"
        """
    )
    as_json = (
        '{"reliability": {"name": "selective-repeat", "window": 256}, '
        '"congestion": "newreno", "ordering": false}'
    )
    a, b, c = Composition.parse(text), Composition.from_toml(toml), Composition.parse(as_json)
    reg = fresh()
    # parameters from the compact form are strings until validated
    assert a.instantiate(reg)["reliability"].window == 256
    assert b == c
    assert str(b) == str(c)
    assert b.instantiate(reg)["ordering"].ordered is False


def test_third_party_tf_found_through_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "vtl_fancy_tf.py"
    pkg.write_text(
        textwrap.dedent(
            '''
            from vtl.tfs.reliability import SelectiveRepeat

            class Fancy(SelectiveRepeat):
                """Selective repeat under another name (a plug-in)."""
                NAME = "fancy-repeat"
                VERSION = "2.0"
            '''
        )
    )
    dist = tmp_path / "vtl_fancy_tf-2.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vtl-fancy-tf\nVersion: 2.0\n")
    (dist / "entry_points.txt").write_text(
        "[vtl.tfs]\nfancy = vtl_fancy_tf:Fancy\nbroken = vtl_fancy_tf:DoesNotExist\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    reg = fresh()
    loaded = reg.load_entry_points()
    assert "fancy" in loaded and "broken" not in loaded  # a broken plug-in is skipped
    cls = reg.get("reliability", "fancy-repeat")
    assert cls.VERSION == "2.0" and cls.__module__ == "vtl_fancy_tf"
    comp = Composition.parse("reliability=fancy-repeat(window=8)").validate(reg)
    assert comp.instantiate(reg)["reliability"].window == 8
    sys.modules.pop("vtl_fancy_tf", None)
