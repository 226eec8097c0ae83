"""UDP socket set-up and batched datagram I/O (GRO receive, GSO send).

Python pays per system call and per callback, not per byte, so this module
moves as many datagrams as it can per call: with ``UDP_GRO`` the kernel hands
over up to 64 same-sized datagrams in one ``recvmsg`` (split here by the
segment size from the control message), and with ``UDP_SEGMENT`` (GSO) one
``sendmsg`` carries up to 64 same-sized datagrams to one address.  Everything
falls back to one datagram per call when the kernel does not cooperate.

Nothing here blocks and nothing is dropped silently: every datagram that was
not sent is either handed back to the caller (``EAGAIN``/``ENOBUFS``: retry
later) or counted in :attr:`UdpSocket.counters` by the reason it failed.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from collections import Counter
from typing import Any

Address = tuple[Any, ...]

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # GSO: u16 segment size (setsockopt/cmsg)
UDP_GRO = getattr(socket, "UDP_GRO", 104)  # GRO: int segment size in the cmsg
SO_NO_CHECK = 11  # SOL_SOCKET: send IPv4 UDP without a checksum
UDP_NO_CHECK6_TX = 101  # SOL_UDP: send IPv6 UDP with a zero checksum (RFC 6936)
UDP_NO_CHECK6_RX = 102  # SOL_UDP: accept IPv6 UDP with a zero checksum

MAX_GSO_SEGMENTS = 64  # kernel UDP_MAX_SEGMENTS
MAX_GSO_BYTES = 65507 - 8  # one UDP datagram's payload, with room to spare for IPv6
RECV_BUFFER = 65536 + 4096  # a whole GRO super-datagram (64 KiB) fits
SOCKET_BUFFER = 8 << 20  # SO_RCVBUF / SO_SNDBUF we ask for

_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_INT = struct.Struct("=i")
_SEGMENT = struct.Struct("=H")
#: errors after which sending later may work: hand the datagrams back
RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ENOMEM})
#: errors that mean "this kernel/device cannot do GSO here": fall back to sendto
GSO_ERRNOS = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal (``"::"``, ``"::1"``, ``"fe80::1%eth0"``),
    AF_INET for anything else (IPv4 literal, empty, or a name resolved later)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    """Ask for ``size`` bytes; as root SO_*BUFFORCE goes beyond net.core.*mem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
        return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


def open_udp_socket(
    local_addr: Address, family: int | None = None, *, buffer_size: int = SOCKET_BUFFER
) -> socket.socket:
    """A bound, non-blocking UDP socket with large buffers.

    IPv6 sockets are dual-stack (IPv4 peers appear as ``::ffff:a.b.c.d``)."""
    host = local_addr[0] or ""
    if family is None:
        family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _set_buffer(sock, getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF, buffer_size)
        _set_buffer(sock, getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF, buffer_size)
        sock.bind(tuple(local_addr))
    except BaseException:
        sock.close()
        raise
    return sock


class UdpSocket:
    """Batched receive and send on one non-blocking UDP socket."""

    def __init__(self, sock: socket.socket, *, gso: bool = True, gro: bool = True) -> None:
        self.sock = sock
        self.family = sock.family
        self.counters: Counter[str] = Counter()
        self.retry_errno = 0  # errno of the last send that must be retried
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self.gro = gro and self._enable_gro()
        self.gso = gso and self._probe_gso()
        if self.family == socket.AF_INET6:
            # a peer using partial checksum coverage sends with a zero UDP
            # checksum (IPv4 accepts that anyway); every VTL packet carries
            # its own CRC32C, so accepting it loses no protection
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_UDP, UDP_NO_CHECK6_RX, 1)

    # ------------------------------------------------------------ set-up

    def _enable_gro(self) -> bool:
        try:
            self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            return False
        return True

    def disable_udp_checksum(self) -> bool:
        """Send without the UDP checksum (and, over IPv6, accept datagrams
        without one), so that a damaged datagram reaches VTL, whose CRC32C
        decides (partial checksum coverage).  The kernel refuses GSO on such
        a socket, so GSO is turned off.  Returns whether it worked."""
        ok = False
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            ok = True
        if self.family == socket.AF_INET6:
            for opt in (UDP_NO_CHECK6_TX, UDP_NO_CHECK6_RX):
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(SOL_UDP, opt, 1)
                    ok = True
        if ok:
            self.gso = False
            self.counters["udp_checksum_off"] = 1
        return ok

    def _probe_gso(self) -> bool:
        """GSO works if the kernel knows the option (sends may still fail:
        then :meth:`send` turns it off)."""
        try:
            self.sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        except OSError:
            return False
        return True

    @property
    def local_address(self) -> Address:
        return self.sock.getsockname()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # ----------------------------------------------------------- receive

    def receive(self, budget: int, out: list[tuple[bytes, Address]]) -> bool:
        """Append up to about ``budget`` datagrams to ``out`` (a GRO batch is
        never split).  Returns True when the socket was drained (EAGAIN)."""
        sock, view, c = self.sock, self._view, self.counters
        recvmsg_into = sock.recvmsg_into
        bufs = [view]
        gro = self.gro
        ancsize = _GRO_CMSG_SPACE if gro else 0
        got = 0
        calls = 0
        nbytes_total = 0
        drained = False
        errors = 0
        while got < budget:
            try:
                nbytes, ancdata, flags, addr = recvmsg_into(bufs, ancsize)
            except (BlockingIOError, InterruptedError):
                drained = True
                break
            except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error: not fatal
                c["recv_errors"] += 1
                c[f"recv_error_{errno.errorcode.get(exc.errno, exc.errno)}"] += 1
                errors += 1
                if errors > 8:  # something persistent: let the loop breathe
                    break
                continue
            calls += 1
            nbytes_total += nbytes
            if flags & socket.MSG_TRUNC:
                c["truncated"] += 1
                continue
            seg = 0
            if ancdata:
                for level, ctype, cdata in ancdata:
                    if level == SOL_UDP and ctype == UDP_GRO:
                        seg = _INT.unpack_from(cdata)[0]
            if 0 < seg < nbytes:
                blob = bytes(view[:nbytes])  # the last segment may be shorter
                out += [(blob[off : off + seg], addr) for off in range(0, nbytes, seg)]
                n = -(-nbytes // seg)
                c["gro_batches"] += 1
                c["gro_segments"] += n
                got += n
            else:
                out.append((bytes(view[:nbytes]), addr))
                got += 1
        c["recv_calls"] += calls
        c["datagrams_in"] += got
        c["bytes_in"] += nbytes_total
        return drained

    # -------------------------------------------------------------- send

    def send(self, items: list[tuple[bytes, Address]], start: int = 0) -> int:
        """Send ``items[start:]``; return the index of the first datagram not
        sent (``len(items)`` when all went out).  Stops early only on
        EAGAIN/ENOBUFS (counted in ``send_retries``): the caller keeps the
        rest and retries later.  Datagrams refused for good (EMSGSIZE,
        unreachable, ...) are counted in ``send_errors`` and skipped."""
        n = len(items)
        i = start
        c = self.counters
        sock = self.sock
        while i < n:
            data, addr = items[i]
            size = len(data)
            j = i + 1
            if self.gso and size:
                # a run of same-sized datagrams to one address; the last may be
                # shorter (but not empty: the kernel would not send it)
                limit = min(n, i + min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // max(size, 1)))
                while j < limit:
                    d2, a2 = items[j]
                    l2 = len(d2)
                    if a2 != addr or l2 > size or not l2:
                        break
                    j += 1
                    if l2 < size:
                        break
            try:
                if j - i > 1:
                    sock.sendmsg(
                        [d for d, _ in items[i:j]],
                        [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))],
                        0,
                        addr,
                    )
                    c["gso_batches"] += 1
                    c["gso_segments"] += j - i
                    nbytes = sum(len(d) for d, _ in items[i:j])
                else:
                    nbytes = sock.sendto(data, addr)
            except OSError as exc:
                code = exc.errno
                if code in RETRY_ERRNOS:
                    self.retry_errno = code
                    c["send_retries"] += 1
                    c[f"send_retry_{errno.errorcode.get(code, code)}"] += 1
                    return i
                if j - i > 1 and code in GSO_ERRNOS:
                    self.gso = False  # this path cannot segment: one datagram per call
                    c["gso_disabled"] += 1
                    continue
                if code == errno.EINTR:
                    continue
                c["send_errors"] += j - i
                c[f"send_error_{errno.errorcode.get(code, code)}"] += j - i
                i = j
                continue
            c["send_calls"] += 1
            c["datagrams_out"] += j - i
            c["bytes_out"] += nbytes
            i = j
        return n
