"""ctypes bindings over the system's ``libbpf.so.1``: just what the Hooker uses.

Python BPF packages on PyPI cannot attach sock_ops/sk_msg here and BCC needs
kernel headers this kernel lacks (../shared/docs/platform.md), while the
distribution's libbpf does all of it.  This module wraps it thinly:
objects, programs, maps, attachments.  Failures raise :class:`BpfError` with
the operation and the errno text; the libbpf log is captured so a verifier
rejection says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

# enum bpf_attach_type (linux/bpf.h)
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_XDP = 37

BPF_ANY = 0
BPF_NOEXIST = 1

_lib: ctypes.CDLL | None = None
_log_lock = threading.Lock()
_log: list[str] = []


class BpfError(OSError):
    """A libbpf or bpf(2) operation failed."""


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _load_library() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(errno.ENOENT, f"cannot load libbpf ({name}): install libbpf1") from exc
    vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    sigs = {
        "bpf_object__open_file": ([cp, vp], vp),
        "bpf_object__load": ([vp], i),
        "bpf_object__close": ([vp], None),
        "bpf_object__find_program_by_name": ([vp, cp], vp),
        "bpf_object__find_map_by_name": ([vp, cp], vp),
        "bpf_program__fd": ([vp], i),
        "bpf_map__fd": ([vp], i),
        "bpf_program__attach_cgroup": ([vp, i], vp),
        "bpf_program__attach_xdp": ([vp, i], vp),
        "bpf_link__destroy": ([vp], i),
        "bpf_link__fd": ([vp], i),
        "bpf_prog_attach": ([i, i, i, ctypes.c_uint], i),
        "bpf_prog_detach2": ([i, i, i], i),
        "bpf_map_update_elem": ([i, vp, vp, ctypes.c_uint64], i),
        "bpf_map_lookup_elem": ([i, vp, vp], i),
        "bpf_map_delete_elem": ([i, vp], i),
        "bpf_map_get_next_key": ([i, vp, vp], i),
        "bpf_obj_get_info_by_fd": ([i, vp, ctypes.POINTER(ctypes.c_uint32)], i),
        "bpf_link_create": ([i, i, i, vp], i),
        "bpf_xdp_query_id": ([i, i, ctypes.POINTER(ctypes.c_uint32)], i),
        "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], i),
        "libbpf_num_possible_cpus": ([], i),
        "bpf_prog_test_run_opts": ([i, vp], i),
        "libbpf_set_print": ([_PRINT_FN], vp),
    }
    for fname, (args, res) in sigs.items():
        fn = getattr(lib, fname)
        fn.argtypes = args
        fn.restype = res
    lib.libbpf_set_print(_PRINT_CB)
    _lib = lib
    return lib


def _vsnprintf(fmt: bytes, va: int) -> str:
    libc = ctypes.CDLL(None)
    buf = ctypes.create_string_buffer(4096)
    libc.vsnprintf(buf, ctypes.c_size_t(len(buf)), ctypes.c_char_p(fmt), ctypes.c_void_p(va))
    return buf.value.decode(errors="replace")


def _print(level: int, fmt: bytes, va: int) -> int:
    try:
        line = _vsnprintf(fmt, va)
    except Exception:  # never let logging break loading
        return 0
    with _log_lock:
        _log.append(line.rstrip())
        del _log[:-200]
    return 0


_PRINT_CB = _PRINT_FN(_print)


def _fail(what: str, err: int | None = None) -> BpfError:
    code = err if err is not None else ctypes.get_errno()
    code = abs(code) or errno.EIO
    with _log_lock:
        tail = [ln for ln in _log[-40:] if ln]
        _log.clear()
    detail = ("\n  libbpf: " + "\n  libbpf: ".join(tail)) if tail else ""
    return BpfError(code, f"{what}: {os.strerror(code)}{detail}")


def lib() -> ctypes.CDLL:
    return _load_library()


class Link:
    """A bpf_link: the attachment disappears when it is destroyed or when this
    process dies, which is what makes the Hooker fail open."""

    def __init__(self, ptr: int, what: str):
        self._ptr: int | None = ptr
        self.what = what

    @property
    def fd(self) -> int:
        if self._ptr is None:
            return -1
        return int(lib().bpf_link__fd(self._ptr))

    def destroy(self) -> None:
        if self._ptr is not None:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None

    @property
    def alive(self) -> bool:
        return self._ptr is not None


class Map:
    """A loaded map, with typed access through ctypes structures."""

    def __init__(self, name: str, fd: int):
        self.name = name
        self.fd = fd

    def update(
        self, key: ctypes.Structure | ctypes._SimpleCData, value: object, flags: int = BPF_ANY
    ) -> None:
        if lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags) != 0:  # type: ignore[arg-type]
            raise _fail(f"update of map {self.name}")

    def lookup(self, key: object, value_type: type) -> object | None:
        out = value_type()
        if lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(out)) != 0:  # type: ignore[arg-type]
            if ctypes.get_errno() == errno.ENOENT:
                return None
            raise _fail(f"lookup in map {self.name}")
        return out

    def delete(self, key: object) -> bool:
        if lib().bpf_map_delete_elem(self.fd, ctypes.byref(key)) != 0:  # type: ignore[arg-type]
            if ctypes.get_errno() == errno.ENOENT:
                return False
            raise _fail(f"delete from map {self.name}")
        return True

    def keys(self, key_type: type) -> Iterator[object]:
        """All keys (a snapshot walk; entries may change meanwhile)."""
        prev: object | None = None
        for _ in range(1 << 20):
            nxt = key_type()
            pk = ctypes.byref(prev) if prev is not None else None  # type: ignore[arg-type]
            if lib().bpf_map_get_next_key(self.fd, pk, ctypes.byref(nxt)) != 0:
                return
            yield nxt
            prev = nxt


class ProgInfo(ctypes.Structure):
    # the head of struct bpf_prog_info (linux/bpf.h); the kernel fills what fits
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class BpfObject:
    """One compiled ``.bpf.o``: open, load, then look up programs and maps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._obj: int | None = None
        self._links: list[Link] = []
        self._map_attach: list[tuple[int, int, int]] = []
        ptr = lib().bpf_object__open_file(str(self.path).encode(), None)
        if not ptr:
            raise _fail(f"open {self.path}")
        self._obj = ptr
        if lib().bpf_object__load(ptr) != 0:
            err = ctypes.get_errno()
            lib().bpf_object__close(ptr)
            self._obj = None
            raise _fail(f"load {self.path.name} (verifier or kernel refused it)", err)

    def _prog(self, name: str) -> int:
        if self._obj is None:
            raise BpfError(errno.EBADF, "BPF object is closed")
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise BpfError(errno.ENOENT, f"no program {name} in {self.path.name}")
        return int(prog)

    def prog_fd(self, name: str) -> int:
        return int(lib().bpf_program__fd(self._prog(name)))

    def prog_id(self, name: str) -> int:
        info = ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if (
            lib().bpf_obj_get_info_by_fd(self.prog_fd(name), ctypes.byref(info), ctypes.byref(size))
            != 0
        ):
            raise _fail(f"info of program {name}")
        return int(info.id)

    def map(self, name: str) -> Map:
        if self._obj is None:
            raise BpfError(errno.EBADF, "BPF object is closed")
        m = lib().bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise BpfError(errno.ENOENT, f"no map {name} in {self.path.name}")
        return Map(name, int(lib().bpf_map__fd(m)))

    def attach_cgroup(self, prog: str, cgroup_path: str | Path) -> Link:
        """Attach to a cgroup v2 directory through a bpf_link (multi-attach:
        other programs on the same cgroup keep running)."""
        fd = os.open(str(cgroup_path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            ptr = lib().bpf_program__attach_cgroup(self._prog(prog), fd)
            if not ptr:
                raise _fail(f"attach {prog} to cgroup {cgroup_path}")
        finally:
            os.close(fd)
        link = Link(int(ptr), f"{prog} on cgroup {cgroup_path}")
        self._links.append(link)
        return link

    def attach_xdp(self, prog: str, ifindex: int) -> Link:
        """XDP through a bpf_link: gone with this process, and it refuses to
        replace a program someone else attached to the interface."""
        ptr = lib().bpf_program__attach_xdp(self._prog(prog), ifindex)
        if not ptr:
            raise _fail(f"attach XDP {prog} to ifindex {ifindex}")
        link = Link(int(ptr), f"{prog} on ifindex {ifindex}")
        self._links.append(link)
        return link

    def attach_to_map(self, prog: str, map_name: str, attach_type: int) -> None:
        """Attach a verdict program (sk_msg) to a sockmap/sockhash.  This
        attachment lives as long as the map, i.e. as long as this object."""
        pfd, mfd = self.prog_fd(prog), self.map(map_name).fd
        if lib().bpf_prog_attach(pfd, mfd, attach_type, 0) != 0:
            raise _fail(f"attach {prog} to map {map_name}")
        self._map_attach.append((pfd, mfd, attach_type))

    def close(self) -> None:
        """Detach everything and free the object (idempotent)."""
        for link in self._links:
            link.destroy()
        self._links.clear()
        for pfd, mfd, at in self._map_attach:
            lib().bpf_prog_detach2(pfd, mfd, at)
        self._map_attach.clear()
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None

    @property
    def links(self) -> list[Link]:
        return list(self._links)

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
