"""A blocking, socket-like face of the service API for simple scripts.

::

    from vtl.service import TransportProperties
    from vtl.service.blocking import connect, listen

    with listen(("127.0.0.1", 4433)) as listener:      # in one program
        conn = listener.accept()
        conn.sendall(conn.recv(65536))

    with connect(("127.0.0.1", 4433)) as conn:          # in another
        conn.sendall(b"hello")
        print(conn.recv(65536))

Each :func:`connect` and :func:`listen` runs an asyncio event loop in a
background (daemon) thread; connections accepted by a listener share its
loop, which stops once the listener and all of them are closed.  Every call
takes an optional timeout (``settimeout()`` sets the default) and raises
:class:`TimeoutError` when it runs out; closing never hangs: a peer that does
not finish within ``linger`` seconds gets a RESET.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import ConnectionStateError
from vtl.service.api import Connection, Listener, Preconnection, PropertyStatus
from vtl.service.properties import (
    MessageProperties,
    PathMeasurements,
    SendReport,
    TransportProperties,
)
from vtl.service.security import SecurityParameters
from vtl.service.selection import Selection

__all__ = ["BlockingConnection", "BlockingListener", "connect", "listen"]

T = TypeVar("T")
Address = tuple[Any, ...]

_STOP_TIMEOUT = 5.0


class _LoopThread:
    """An event loop in a daemon thread, shared by reference count."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._refs = 0
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="vtl-service-loop", daemon=True)
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    self.loop.run_until_complete(asyncio.wait(tasks, timeout=_STOP_TIMEOUT))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def acquire(self) -> _LoopThread:
        with self._lock:
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs <= 0
        if last:
            self.stop()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("cannot stop the VTL loop from inside it")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_STOP_TIMEOUT)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result; on timeout
        cancel it and raise :class:`TimeoutError`."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking VTL calls cannot be made from the VTL loop thread")
        if self.loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise ConnectionStateError("the VTL event loop has stopped (closed?)")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"VTL operation timed out after {timeout} s") from None
        except BaseException:
            fut.cancel()
            raise


class BlockingConnection:
    """A connected VTL service connection with socket-like methods."""

    def __init__(
        self, runner: _LoopThread, conn: Connection, *, timeout: float | None, linger: float
    ) -> None:
        self._runner = runner.acquire()
        self._conn = conn
        self._timeout = timeout
        self.linger = linger
        self._closed = False
        self._close_lock = threading.Lock()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<BlockingConnection {self._conn.peer_address!r} {state}>"

    # ------------------------------------------------------------- info

    @property
    def connection(self) -> Connection:
        """The asyncio :class:`~vtl.service.api.Connection` underneath."""
        return self._conn

    @property
    def composition(self) -> Composition:
        return self._conn.composition

    @property
    def selection(self) -> Selection:
        return self._conn.selection

    @property
    def peer_address(self) -> Address:
        return self._conn.peer_address

    def getpeername(self) -> Address:
        return self._conn.peer_address

    def getsockname(self) -> Address:
        return self._conn.local_address

    def explain(self) -> str:
        return self._conn.explain()

    def properties_honoured(self) -> dict[str, PropertyStatus]:
        return self._conn.properties_honoured()

    def stats(self) -> dict[str, Any]:
        return self._run(_call(self._conn.stats))

    def settimeout(self, timeout: float | None) -> None:
        """Default timeout (seconds) of every later call; None: wait forever."""
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    # ---------------------------------------------------------- calls

    def _run(self, coro: Coroutine[Any, Any, T], timeout: Any = ...) -> T:
        if self._closed:
            coro.close()
            raise ConnectionStateError("connection is closed")
        return self._runner.run(coro, self._timeout if timeout is ... else timeout)

    def sendall(self, data: bytes | bytearray | memoryview, timeout: Any = ...) -> None:
        """Send all of ``data`` (stream bytes, or one message with message framing)."""
        self._run(self._conn.send(bytes(data)), timeout)

    def send_message(
        self,
        data: bytes | bytearray | memoryview,
        message_properties: MessageProperties | None = None,
        timeout: Any = ...,
    ) -> SendReport:
        """Send one message; returns which message properties were honoured."""
        return self._run(self._conn.send(bytes(data), message_properties), timeout)

    def recv(self, bufsize: int = 65536, timeout: Any = ...) -> bytes:
        """Up to ``bufsize`` bytes (with message framing: up to ``bufsize``
        bytes of the next message); ``b""`` at end of stream."""
        return self._run(self._conn.receive(bufsize), timeout)

    def recv_message(self, timeout: Any = ...) -> bytes | None:
        """The next whole message; ``None`` at end of stream."""
        return self._run(self._conn.receive_message(), timeout)

    def reconfigure(self, composition: Composition | dict | str, timeout: Any = ...) -> Any:
        """Switch the running connection to another composition; returns the
        ReconfigureDone or ReconfigureRefused event (see Connection.reconfigure)."""
        return self._run(self._conn.reconfigure(composition), timeout)

    def shutdown_write(self) -> None:
        """Half-close: the peer reads end of stream after our last byte."""
        self._run(_call(self._conn.close))

    def drain(self, timeout: Any = ...) -> None:
        """Wait until everything sent has been acknowledged."""
        self._run(self._conn.drain(), timeout)

    # ---------------------------------------------------------- close

    def close(self) -> None:
        """Finish sending, wait up to ``linger`` seconds for the peer to
        finish too, reset if it does not, and release the event loop.
        Idempotent; never blocks much beyond ``linger``."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._runner.run(self._conn.aclose(self.linger), self.linger + 2.0)
        except Exception:  # closing must not raise: the loop may be gone already
            pass
        finally:
            self._runner.release()

    def abort(self, reason: str = "aborted") -> None:
        """Reset the connection now and release the event loop."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._runner.run(_call(self._conn.abort, reason), 2.0)
        except Exception:
            pass
        finally:
            self._runner.release()

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BlockingListener:
    """Accepts :class:`BlockingConnection` objects."""

    def __init__(self, runner: _LoopThread, listener: Listener, *, linger: float) -> None:
        self._runner = runner.acquire()
        self._listener = listener
        self._timeout: float | None = None
        self.linger = linger
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def listener(self) -> Listener:
        return self._listener

    @property
    def address(self) -> Address:
        return self._listener.local_address

    def getsockname(self) -> Address:
        return self._listener.local_address

    @property
    def selection(self) -> Selection:
        return self._listener.selection

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def accept(self, timeout: Any = ...) -> BlockingConnection:
        """Wait for the next connection (``timeout`` seconds at most)."""
        if self._closed:
            raise ConnectionStateError("listener is closed")
        conn = self._runner.run(
            self._listener.accept(), self._timeout if timeout is ... else timeout
        )
        return BlockingConnection(self._runner, conn, timeout=None, linger=self.linger)

    def close(self) -> None:
        """Stop listening and close the socket (connections still open are
        closed within ``linger`` seconds); idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._runner.run(
                self._listener.close(graceful=True, timeout=self.linger), self.linger + 2.0
            )
        except Exception:
            pass
        finally:
            self._runner.release()

    def __enter__(self) -> BlockingListener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


async def _call(fn: Any, *args: Any) -> Any:
    """Run a plain function on the loop thread (the datapath is not thread-safe)."""
    return fn(*args)


def connect(
    address: Address,
    properties: TransportProperties | None = None,
    *,
    local: Address | None = None,
    config: ConnectionConfig | None = None,
    path: PathMeasurements | None = None,
    timeout: float | None = 10.0,
    linger: float = 5.0,
    security: SecurityParameters | None = None,
) -> BlockingConnection:
    """Open a VTL connection to ``address`` offering compositions chosen for
    ``properties``.  Raises :class:`~vtl.service.EstablishmentError` (or
    :class:`~vtl.core.errors.SelectionError` before sending anything).
    ``timeout`` bounds the handshake and is the default for later calls."""
    runner = _LoopThread()
    pre = Preconnection(
        remote=address,
        local=local,
        properties=properties,
        config=config,
        path=path,
        security=security,
    )
    try:
        conn = runner.run(pre.initiate(timeout=timeout))
        return BlockingConnection(runner, conn, timeout=timeout, linger=linger)
    except BaseException:
        runner.stop()
        raise


def listen(
    address: Address,
    properties: TransportProperties | None = None,
    *,
    config: ConnectionConfig | None = None,
    path: PathMeasurements | None = None,
    linger: float = 5.0,
    security: SecurityParameters | None = None,
) -> BlockingListener:
    """Listen on ``address`` for peers whose offers meet ``properties``."""
    runner = _LoopThread()
    pre = Preconnection(
        local=address, properties=properties, config=config, path=path, security=security
    )
    try:
        listener = runner.run(pre.listen(), 10.0)
        return BlockingListener(runner, listener, linger=linger)
    except BaseException:
        runner.stop()
        raise
