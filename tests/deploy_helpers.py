"""Build TF packages for the deployment tests (a module and a wheel)."""

from __future__ import annotations

import zipfile
from pathlib import Path

CC_SOURCE = '''\
"""A congestion controller deployed at run time (NewReno under a new name)."""

from pathlib import Path
from typing import ClassVar

from vtl.tfs.base import Param
from vtl.tfs.congestion.newreno import NewReno

MARKER = {marker!r}
if MARKER:  # proves whether this code ever ran
    with open(MARKER, "a") as f:
        f.write("{name} {version} imported\\n")


class {cls}(NewReno):
    """NewReno deployed as a package; can be told to raise (isolation tests)."""

    NAME: ClassVar[str] = "{name}"
    VERSION: ClassVar[str] = "{version}"
    PARAMS: ClassVar[dict[str, Param]] = {{
        **NewReno.PARAMS,
        "fail_after_acks": Param(int, 0, "raise after this many ACK calls (0: never)", min=0),
    }}

    def __init__(self, params=None, *, max_datagram_size=1452):
        super().__init__(params, max_datagram_size=max_datagram_size)
        self.acks = 0

    def on_packets_acked(self, **kw):
        self.acks += 1
        n = self.params["fail_after_acks"]
        if n and self.acks >= n:
            raise RuntimeError("{name} exploded on purpose")
        super().on_packets_acked(**kw)
{extra}'''


def cc_source(name: str = "toycc", version: str = "1.0", marker: str = "", extra: str = "") -> str:
    cls = "".join(p.capitalize() for p in name.replace("-", "_").split("_")) + "CC"
    return CC_SOURCE.format(name=name, version=version, marker=marker, cls=cls, extra=extra)


def write_module(
    directory: Path, name: str = "toycc", version: str = "1.0", marker: str = "", extra: str = ""
) -> Path:
    """A single-module package ``<name>_v<version>.py``."""
    stem = f"{name}_v{version}".replace(".", "_").replace("-", "_")
    path = directory / f"{stem}.py"
    path.write_text(cc_source(name, version, marker, extra))
    return path


def write_wheel(
    directory: Path, name: str = "wheelcc", version: str = "2.0", marker: str = ""
) -> Path:
    """A wheel whose ``vtl.tfs`` entry point names the TF class; the package
    imports a sibling module relatively."""
    dist = f"{name}_pkg"
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    cls = "".join(p.capitalize() for p in name.split("_")) + "CC"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{dist}/__init__.py", "from .cc import *  # noqa\n")
        zf.writestr(f"{dist}/cc.py", cc_source(name, version, marker))
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/entry_points.txt", f"[vtl.tfs]\n{name} = {dist}.cc:{cls}\n")
        zf.writestr(f"{info}/RECORD", "")
    return path
