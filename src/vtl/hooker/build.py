"""Compile the Hooker's BPF C sources with clang, once per source version.

The ``.bpf.c`` files sit beside the Python that loads them
(``vtl/hooker/bpf/``).  Objects are cached under ``$VTL_BPF_CACHE`` (default
``/var/cache/vtl/bpf``) by a hash of the source, the headers' location and
the compiler flags, so an edited source is rebuilt and an unchanged one is
not.  ``scripts/setup.sh`` runs ``python -m vtl.hooker.build`` so that a
missing toolchain shows at set-up, not at the first hooked connection.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "bpf"
CFLAGS = ["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]
INCLUDES = ["-I/usr/include/x86_64-linux-gnu", f"-I{SOURCE_DIR}"]


class BuildError(RuntimeError):
    """clang is missing or refused a BPF source."""


def cache_dir() -> Path:
    return Path(os.environ.get("VTL_BPF_CACHE", "/var/cache/vtl/bpf"))


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.bpf.c"))


def _digest(src: Path) -> str:
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for hdr in sorted(SOURCE_DIR.glob("*.h")):
        h.update(hdr.read_bytes())
    h.update(" ".join(CFLAGS + INCLUDES).encode())
    return h.hexdigest()[:16]


def object_path(name: str) -> Path:
    """The compiled object for ``bpf/NAME.bpf.c``, building it if needed."""
    src = SOURCE_DIR / f"{name}.bpf.c"
    if not src.is_file():
        raise BuildError(f"no BPF source {src}")
    out = cache_dir() / f"{name}-{_digest(src)}.bpf.o"
    if out.is_file():
        return out
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError("clang not found: run scripts/setup.sh (it installs clang and libbpf-dev)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cp = subprocess.run(
        [clang, *CFLAGS, *INCLUDES, "-c", str(src), "-o", str(tmp)],
        capture_output=True,
        text=True,
    )
    if cp.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"clang failed on {src.name}:\n{cp.stderr.strip()}")
    os.replace(tmp, out)  # atomic: concurrent builders never see half a file
    return out


def main() -> int:
    ok = True
    for src in sources():
        name = src.name.removesuffix(".bpf.c")
        try:
            print(f"[bpf] {name}: {object_path(name)}")
        except BuildError as exc:
            print(f"[bpf] {name}: {exc}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
