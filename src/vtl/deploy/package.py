"""TF packages: reading their manifest and importing their code.

Two formats:

* a single Python module (``name.py``): its TFs are the classes listed in a
  module-level ``VTL_TFS``, or else every :class:`TransportFunction`
  subclass it defines with a ``NAME``;
* a wheel or zip (``.whl`` / ``.zip``): its TFs are named by a root
  ``vtl-tf.json`` manifest (``{"name": .., "version": .., "tfs":
  ["module:Class", ...]}``) or else by the wheel's ``vtl.tfs`` entry points
  (``*.dist-info/entry_points.txt``), the group installed plug-ins use.
  Modules inside must import each other relatively (``from . import x``).

Every package is imported under a module name made from its digest
(``_vtl_tf_<sha256[:16]>``), so two versions of the same code coexist and a
package is imported once per process however many endpoints deploy it.
Nothing here checks trust: :mod:`vtl.deploy.trust` has done that on the same
bytes before :func:`load` is called."""

from __future__ import annotations

import configparser
import importlib
import io
import json
import linecache
import shutil
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vtl.deploy.errors import DeployError
from vtl.tfs.base import TransportFunction

MAX_PACKAGE_BYTES = 16 << 20
MAX_UNPACKED_BYTES = 64 << 20


@dataclass
class LoadedPackage:
    """Imported code of one package (shared by every endpoint of the process)."""

    digest: str
    module_prefix: str
    tfs: tuple[type[TransportFunction], ...]
    name: str
    version: str
    directory: Path | None  # where a wheel/zip was unpacked
    refs: int = 0


_LOADED: dict[str, LoadedPackage] = {}
_UNPACK_ROOT: Path | None = None


def module_prefix(digest: str) -> str:
    return f"_vtl_tf_{digest[:16]}"


def acquire(data: bytes, digest: str, filename: str) -> LoadedPackage:
    """Import the (already verified) package, or reuse this process's copy."""
    pkg = _LOADED.get(digest)
    if pkg is None:
        if filename.endswith(".py"):
            pkg = _load_module(data, digest, filename)
        elif filename.endswith((".whl", ".zip")):
            pkg = _load_archive(data, digest, filename)
        else:
            raise DeployError(f"{filename}: a TF package is a .py module, a .whl or a .zip")
        _LOADED[digest] = pkg
    pkg.refs += 1
    return pkg


def release(pkg: LoadedPackage) -> None:
    """Drop one user; the last one unloads the modules and unpacked files."""
    pkg.refs -= 1
    if pkg.refs > 0:
        return
    _LOADED.pop(pkg.digest, None)
    _unimport(pkg.module_prefix)
    if pkg.directory is not None:
        shutil.rmtree(pkg.directory, ignore_errors=True)


def _unimport(prefix: str) -> None:
    for mod in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[mod]


# ----------------------------------------------------------------- modules


def _load_module(data: bytes, digest: str, filename: str) -> LoadedPackage:
    stem = Path(filename).stem
    if not stem.isidentifier():
        raise DeployError(f"{filename}: module name {stem!r} is not a Python identifier")
    prefix = module_prefix(digest)
    name = f"{prefix}_{stem}"
    where = f"<vtl-tf {filename} {digest[:12]}>"  # tracebacks name the package
    try:
        source = data.decode("utf-8")
        code = compile(source, where, "exec")
    except (UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise DeployError(f"{filename}: not valid Python: {exc}") from None
    linecache.cache[where] = (len(source), None, source.splitlines(True), where)
    module = types.ModuleType(name)
    module.__file__ = where
    sys.modules[name] = module  # dataclasses and pickling look the module up
    try:
        exec(code, module.__dict__)  # noqa: S102 - verified package code
    except Exception as exc:
        _unimport(name)
        raise DeployError(f"{filename}: importing it raised {type(exc).__name__}: {exc}") from exc
    listed = module.__dict__.get("VTL_TFS")
    if listed is None:
        listed = [
            obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, TransportFunction)
            and obj.__module__ == name and obj.NAME
        ]  # fmt: skip
    tfs = _check_tfs(filename, list(listed))
    versions = {cls.VERSION for cls in tfs}
    version = module.__dict__.get("__version__") or (versions.pop() if len(versions) == 1 else "0")
    return LoadedPackage(digest, name, tfs, stem, str(version), None)


# ---------------------------------------------------------------- archives


def _load_archive(data: bytes, digest: str, filename: str) -> LoadedPackage:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise DeployError(f"{filename}: not a valid zip/wheel: {exc}") from None
    if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
        raise DeployError(f"{filename}: unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    names = {i.filename for i in infos}
    for n in names:
        p = PurePosixPath(n)
        if p.is_absolute() or ".." in p.parts or "\\" in n:
            raise DeployError(f"{filename}: unsafe member path {n!r}")
    name, version, entries = _manifest(zf, names, filename)
    prefix = module_prefix(digest)
    global _UNPACK_ROOT
    if _UNPACK_ROOT is None:
        _UNPACK_ROOT = Path(tempfile.mkdtemp(prefix="vtl-tf-"))
    directory = _UNPACK_ROOT / digest[:16]
    shutil.rmtree(directory, ignore_errors=True)
    try:
        zf.extractall(directory)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DeployError(f"{filename}: cannot unpack: {exc}") from None
    root = types.ModuleType(prefix)
    root.__path__ = [str(directory)]  # a package whose subpackages are the archive's
    root.__package__ = prefix
    sys.modules[prefix] = root
    tfs: list[type] = []
    try:
        for entry in entries:
            mod_name, _, attr = entry.partition(":")
            mod = importlib.import_module(f"{prefix}.{mod_name.strip()}")
            if attr:
                obj = mod
                for part in attr.strip().split("."):
                    obj = getattr(obj, part)
                tfs.append(obj)
            else:
                tfs.extend(
                    o for o in vars(mod).values()
                    if isinstance(o, type) and issubclass(o, TransportFunction)
                    and o.__module__ == mod.__name__ and o.NAME
                )  # fmt: skip
    except Exception as exc:
        _unimport(prefix)
        shutil.rmtree(directory, ignore_errors=True)
        why = f"{type(exc).__name__}: {exc}"
        raise DeployError(f"{filename}: importing {entry!r} raised {why}") from exc
    try:
        checked = _check_tfs(filename, tfs)
    except DeployError:
        _unimport(prefix)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return LoadedPackage(digest, prefix, checked, name, version, directory)


def _manifest(zf: zipfile.ZipFile, names: set[str], filename: str) -> tuple[str, str, list[str]]:
    """(package name, version, ``module[:attr]`` entries) from vtl-tf.json or
    the wheel's entry points."""
    stem = Path(filename).name.rsplit(".", 1)[0]
    if "vtl-tf.json" in names:
        try:
            doc = json.loads(zf.read("vtl-tf.json"))
            entries = [str(e) for e in doc["tfs"]]
            return str(doc.get("name", stem)), str(doc.get("version", "0")), entries
        except (ValueError, KeyError, TypeError) as exc:
            raise DeployError(f"{filename}: bad vtl-tf.json: {exc}") from None
    eps = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/entry_points.txt")]
    if len(eps) != 1:
        raise DeployError(
            f"{filename}: no vtl-tf.json manifest and no single wheel entry_points.txt"
        )
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(zf.read(eps[0]).decode("utf-8"))
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise DeployError(f"{filename}: bad entry_points.txt: {exc}") from None
    if not parser.has_section("vtl.tfs") or not parser.items("vtl.tfs"):
        raise DeployError(f"{filename}: the wheel declares no [vtl.tfs] entry points")
    entries = [v for _, v in parser.items("vtl.tfs")]
    dist = eps[0].split("/")[0][: -len(".dist-info")]
    name, _, version = dist.partition("-")
    return name, version or "0", entries


def _check_tfs(filename: str, tfs: list) -> tuple[type[TransportFunction], ...]:
    from vtl.core.registry import ROLES

    if not tfs:
        raise DeployError(f"{filename}: provides no transport function")
    for cls in tfs:
        if not (isinstance(cls, type) and issubclass(cls, TransportFunction)):
            raise DeployError(f"{filename}: {cls!r} is not a TransportFunction class")
        if cls.ROLE not in ROLES or not cls.NAME or not isinstance(cls.VERSION, str):
            raise DeployError(
                f"{filename}: {cls.__name__} needs ROLE (one of {list(ROLES)}), NAME and "
                f"a string VERSION"
            )
    return tuple(dict.fromkeys(tfs))
