"""The service-oriented asyncio API (TAPS style, RFC 9622).

An application describes what it needs; VTL picks the composition::

    pre = Preconnection(remote=("192.0.2.1", 4433),
                        properties=TransportProperties.reliable_messages())
    conn = await pre.initiate(timeout=5)
    print(conn.selection.explain())       # why this composition
    await conn.send(b"hello")
    reply = await conn.receive_message()
    conn.close()
    await conn.wait_closed()

    listener = await Preconnection(local=("::", 4433)).listen()
    conn = await listener.accept()

``initiate()`` ranks the installed compositions (:mod:`vtl.service.selection`)
and offers the best few to the peer, best first; the peer takes the first it
has and accepts.  A listener accepts only offers that meet its own
Require/Prohibit properties and otherwise counter-offers its own choices,
which the initiator in turn checks against *its* properties.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import ipaddress
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vtl.core.composition import Composition
from vtl.core.config import ConnectionConfig
from vtl.core.errors import ConnectionStateError, ErrorCode
from vtl.core.events import (
    ConnectionTerminated,
    DataAbandoned,
    DataReceived,
    Event,
    HandshakeFailed,
    MessageReceived,
    PeerClosed,
)
from vtl.core.registry import Registry, default_registry
from vtl.io import HandshakeError, UdpEndpoint, VtlConnection
from vtl.service import events as ev
from vtl.service.events import EstablishmentError
from vtl.service.properties import (
    SELECTION_PROPERTIES,
    CapacityProfile,
    MessageProperties,
    MessagePropertyError,
    PathMeasurements,
    Preference,
    SendReport,
    TransportProperties,
)
from vtl.service.security import SecurityParameters
from vtl.service.selection import (
    CompositionTraits,
    Negotiation,
    Selection,
    Selector,
    Violation,
)

__all__ = [
    "Connection",
    "Listener",
    "Preconnection",
    "PropertyStatus",
    "check_message_properties",
]

Address = tuple[Any, ...]

#: how long an initiator's socket lingers after its connection ended, so a
#: peer that missed our last ACK still gets an answer
_LINGER_MAX = 3.0


def _wildcard_for(remote: Address | None) -> Address:
    host = remote[0] if remote else ""
    try:
        if ipaddress.ip_address(str(host).split("%", 1)[0]).version == 6:
            return ("::", 0)
    except ValueError:
        pass
    return ("0.0.0.0", 0)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class Preconnection:
    """Properties and endpoints of connections yet to be made.

    ``remote``/``local`` are ``(host, port)``; ``properties`` what the
    application needs; ``path`` what is known about the path (sizes windows
    and rates); ``config`` the datapath knobs (its ``registry`` chooses the
    installed TFs; its ``acceptable``/``counter_offers``/``accept_counter_offer``
    hooks are combined with, or replaced by, the ones derived from
    ``properties``); ``max_offers`` caps how many compositions are offered.
    ``security`` holds the keys of encrypting compositions (TAPS
    SecurityParameters): a listener's identity, an initiator's trusted keys;
    ``properties.security`` (Require / Prefer / ...) decides whether to use them.
    """

    def __init__(
        self,
        remote: Address | None = None,
        local: Address | None = None,
        properties: TransportProperties | None = None,
        config: ConnectionConfig | None = None,
        *,
        path: PathMeasurements | None = None,
        max_offers: int = 4,
        security: SecurityParameters | None = None,
    ) -> None:
        self.remote = remote
        self.local = local
        self.properties = properties or TransportProperties()
        self.config = config or ConnectionConfig()
        self.security = security
        if security is not None:
            self.config = dataclasses.replace(self.config, security=security.to_config())
        self.path = path or PathMeasurements()
        self.max_offers = max_offers
        self._selection: Selection | None = None

    @property
    def registry(self) -> Registry:
        return self.config.registry or default_registry()

    def selector(self) -> Selector:
        return Selector(
            self.properties,
            self.path,
            registry=self.registry,
            max_datagram_size=self.config.max_datagram_size,
        )

    def select(self) -> Selection:
        """The ranked compositions for these properties (no network I/O).
        Raises :class:`~vtl.core.errors.SelectionError` if none qualifies."""
        if self._selection is None:
            self._selection = self.selector().select()
        return self._selection

    # ------------------------------------------------------------ initiate

    async def initiate(self, timeout: float | None = None) -> Connection:
        """Select, offer the ranked compositions to ``remote`` and wait until
        the connection is ready.

        Raises :class:`~vtl.core.errors.SelectionError` before any network
        traffic if the properties cannot be met locally, and
        :class:`EstablishmentError` if the peer refuses, counter-offers
        something these properties exclude, or does not answer in time
        (``timeout`` seconds, else ``config.handshake_timeout``)."""
        if self.remote is None:
            raise ConnectionStateError("initiate() needs a remote endpoint")
        selection = self.select()
        selector = selection._selector or self.selector()
        offers = self._usable_offers(selection.offers(self.max_offers))
        rejected: list[tuple[Composition, list[Violation]]] = []
        user_check = self.config.accept_counter_offer

        def accept_counter_offer(comp: Composition) -> bool:
            violations = selector.check(comp)
            if violations:
                rejected.append((comp, violations))
                return False
            return user_check is None or user_check(comp)

        cfg = dataclasses.replace(self.config, accept_counter_offer=accept_counter_offer)
        endpoint = await UdpEndpoint.create(self.local or _wildcard_for(self.remote), config=cfg)
        try:
            vc = await endpoint.connect(self.remote, offers, config=cfg, timeout=timeout)
        except HandshakeError as exc:
            await endpoint.close()
            raise self._establishment_error(exc, offers, rejected, timeout) from exc
        except BaseException:
            await endpoint.close()
            raise
        core = vc.core
        negotiation = Negotiation(
            core.composition, core.offered_index, core.counter_offer, "initiator", len(offers)
        )
        return Connection(
            vc,
            selection.with_negotiation(negotiation),
            self.properties,
            self.registry,
            endpoint=endpoint,
            owns_endpoint=True,
        )

    def _usable_offers(self, offers: list[Composition]) -> list[Composition]:
        """Encrypting offers need trusted keys to check the listener with:
        without them, Require fails here (before any traffic) and the other
        levels offer only what can complete."""
        sec = self.config.security
        if sec is not None and sec.trusted_keys:
            return offers
        clear = [c for c in offers if c["security"].name == "none"]
        if len(clear) == len(offers):
            return offers
        if not clear or self.properties.security is Preference.REQUIRE:
            raise ConnectionStateError(
                "security=Require needs the listener's public key to verify it: pass "
                "Preconnection(security=SecurityParameters(trusted_keys=...)) "
                "(vtl send --trust KEYFILE)"
            )
        return clear

    def _establishment_error(
        self,
        exc: HandshakeError,
        offers: list[Composition],
        rejected: list[tuple[Composition, list[Violation]]],
        timeout: float | None,
    ) -> EstablishmentError:
        remote = f"{self.remote[0]}:{self.remote[1]}" if self.remote else "?"
        n = len(offers)
        offered = "; ".join(f"{i}. {c}" for i, c in enumerate(offers, start=1))
        code = exc.error_code
        if code == ErrorCode.COUNTER_OFFER_REJECTED and rejected:
            comp, violations = rejected[-1]
            why = "; ".join(v.text for v in violations)
            msg = (
                f"the peer at {remote} took none of our {n} offered compositions and "
                f"counter-offered '{comp}', which this connection's properties exclude: {why}. "
                f"We offered: {offered}"
            )
        elif code == ErrorCode.NO_COMMON_COMPOSITION:
            msg = (
                f"the peer at {remote} refused all {n} offered compositions ({exc.reason}); "
                "its properties or installed TFs exclude them and it proposed nothing we "
                f"accept. We offered: {offered}"
            )
        elif code == ErrorCode.HANDSHAKE_TIMEOUT:
            limit = timeout if timeout is not None else self.config.handshake_timeout
            msg = f"no answer from {remote} within {limit:g} s (is a VTL listener running there?)"
        else:
            msg = f"connection to {remote} failed ({_code_name(code)}): {exc.reason}"
        return EstablishmentError(code, msg, by_peer=exc.by_peer, offers=offers)

    # -------------------------------------------------------------- listen

    async def listen(self) -> Listener:
        """Listen on ``local``: accept offers meeting these properties'
        Require/Prohibit set (and QoS targets); when none does, counter-offer
        our own best choices."""
        if self.local is None:
            raise ConnectionStateError("listen() needs a local endpoint, e.g. ('::', 4433)")
        selection = self.select()
        selector = selection._selector or self.selector()
        user_acceptable = self.config.acceptable
        sec = self.config.security
        if (
            self.properties.security is Preference.REQUIRE
            and selection.top.composition["security"].name != "none"
            and (sec is None or not sec.identity)
        ):
            raise ConnectionStateError(
                "security=Require needs an identity key to authenticate this listener: pass "
                "Preconnection(security=SecurityParameters(identity=...)) (vtl recv --key KEYFILE)"
            )

        def acceptable(comp: Composition) -> bool:
            if selector.check(comp):
                return False
            return user_acceptable is None or user_acceptable(comp)

        counter = list(self.config.counter_offers) or selection.offers(self.max_offers)
        cfg = dataclasses.replace(self.config, acceptable=acceptable, counter_offers=counter)
        endpoint = await UdpEndpoint.create(self.local, config=cfg, listen=True)
        return Listener(endpoint, selection, self.properties, self.registry)


class Listener:
    """Accepts connections for a :class:`Preconnection` (``listen()``)."""

    def __init__(
        self,
        endpoint: UdpEndpoint,
        selection: Selection,
        properties: TransportProperties,
        registry: Registry,
    ) -> None:
        self._endpoint = endpoint
        self.selection = selection
        self.properties = properties
        self._registry = registry

    @property
    def local_address(self) -> Address:
        return self._endpoint.local_address

    @property
    def endpoint(self) -> UdpEndpoint:
        return self._endpoint

    async def accept(self) -> Connection:
        """The next connection a peer opened (TAPS ConnectionReceived)."""
        vc = await self._endpoint.accept()
        core = vc.core
        negotiation = Negotiation(
            core.composition, core.offered_index, core.counter_offer, "listener"
        )
        return Connection(
            vc,
            self.selection.with_negotiation(negotiation),
            self.properties,
            self._registry,
            endpoint=self._endpoint,
            owns_endpoint=False,
        )

    def stop(self) -> None:
        """Accept no new connections; established ones carry on."""
        self._endpoint.core.listening = False

    async def close(self, *, graceful: bool = True, timeout: float = 2.0) -> None:
        """Stop listening and close the socket; connections still open are
        closed gracefully (up to ``timeout`` seconds), then reset."""
        self.stop()
        await self._endpoint.close(graceful=graceful, timeout=timeout)

    def __aiter__(self) -> Listener:
        return self

    async def __anext__(self) -> Connection:
        try:
            return await self.accept()
        except ConnectionStateError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


@dataclass(frozen=True)
class PropertyStatus:
    """Answer to "was this property honoured?" for one connection.

    ``honoured`` is True/False, or None when it cannot be told (a QoS target
    on an unmeasured path, a property that was not asked for)."""

    name: str
    requested: str
    actual: str
    honoured: bool | None
    detail: str = ""


def check_message_properties(
    mp: MessageProperties | None, traits: CompositionTraits, size: int
) -> SendReport:
    """Decide what of ``mp`` the composition can honour.

    Raises :class:`MessagePropertyError` when a property asks for a
    guarantee the composition lacks; everything else is reported."""
    if mp is None:
        return SendReport(size)
    honoured: dict[str, bool] = {}
    notes: dict[str, str] = {}
    if mp.reliable is not None:
        if mp.reliable and not traits.reliable:
            raise MessagePropertyError(
                "msg_reliable=True cannot be honoured: this connection's composition does not "
                "retransmit (reliability was not required when it was selected)"
            )
        if not mp.reliable and traits.reliable:
            honoured["reliable"] = False
            notes["reliable"] = (
                "sent reliably anyway: give the message a lifetime to let it be abandoned"
                if traits.partial_reliability
                else "sent reliably anyway: choosing reliability per message needs a "
                "partial-reliability TF (reliability=partial, per_msg_reliability=Prefer)"
            )
        else:
            honoured["reliable"] = True
    if mp.ordered is not None:
        if mp.ordered and not traits.ordered:
            raise MessagePropertyError(
                "msg_ordered=True cannot be honoured: this connection's composition delivers "
                "unordered"
            )
        if not mp.ordered and traits.ordered:
            honoured["ordered"] = False
            notes["ordered"] = "delivered in order anyway: the composition orders all data"
        else:
            honoured["ordered"] = True
    if mp.lifetime is not None and traits.partial_reliability:
        honoured["lifetime"] = True
        notes["lifetime"] = "abandoned (and the receiver told) if not delivered in time"
    elif mp.lifetime is not None:
        honoured["lifetime"] = False
        notes["lifetime"] = (
            "not honoured: expiring a message needs partial reliability (reliability=partial, "
            "selected by per_msg_reliability=Prefer); "
            "it is delivered whenever it arrives"
            + ("" if traits.reliable else " or lost, but never expired on purpose")
        )
    if mp.priority is not None:
        honoured["priority"] = False
        notes["priority"] = (
            "not honoured: a VTL connection has one send queue, messages leave in send order"
        )
    if mp.final:
        honoured["final"] = True
        notes["final"] = "the connection half-closes after this message"
    return SendReport(size, honoured, notes)


class Connection:
    """An established connection (either side) with its selection story."""

    def __init__(
        self,
        vc: VtlConnection,
        selection: Selection,
        properties: TransportProperties,
        registry: Registry,
        *,
        endpoint: UdpEndpoint,
        owns_endpoint: bool,
    ) -> None:
        self._vc = vc
        self.selection = selection
        self.properties = properties
        self._registry = registry
        self._endpoint = endpoint
        comp = vc.composition
        assert comp is not None
        self._composition: Composition = comp
        self.traits = CompositionTraits.of(comp, registry)
        self._local_events: deque[ev.ServiceEvent] = deque()
        self._events_active = False
        self._wakeup: asyncio.Future[None] | None = None
        self._ready_given = False
        self._done = False
        self._reaper: asyncio.Task[None] | None = None
        if owns_endpoint:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def __repr__(self) -> str:
        return f"<vtl.service.Connection {self.peer_address!r} {self._composition}>"

    # --------------------------------------------------------- properties

    @property
    def composition(self) -> Composition:
        comp = self._vc.composition  # a live reconfiguration (by either end) changes it
        if comp is not None and comp != self._composition:
            self._composition = comp
            self.traits = CompositionTraits.of(comp, self._registry)
        return self._composition

    @property
    def peer_address(self) -> Address:
        return self._vc.peer_address

    @property
    def local_address(self) -> Address:
        return self._endpoint.local_address

    @property
    def messages(self) -> bool:
        """True if message boundaries are kept (message framing)."""
        return self.traits.messages

    @property
    def peer_identity(self) -> bytes | None:
        """The peer's Ed25519 public key, authenticated by ``security=aead``
        (None on a clear composition, and on a listener's side unless ``mutual``)."""
        return self._vc.core.peer_identity

    @property
    def datapath(self) -> VtlConnection:
        """The underlying :class:`vtl.io.VtlConnection`."""
        return self._vc

    def explain(self) -> str:
        return self.selection.explain()

    def stats(self) -> dict[str, Any]:
        return self._vc.stats()

    async def reconfigure(
        self, composition: Composition | dict | str, timeout: float | None = None
    ) -> Event:
        """Switch the running connection to another composition (whole, or
        only the roles to change) without losing a byte or a new handshake;
        returns :class:`~vtl.core.events.ReconfigureDone` (with the measured
        delivery pause) or :class:`~vtl.core.events.ReconfigureRefused`."""
        return await self._vc.reconfigure(composition, timeout)

    def properties_honoured(self) -> dict[str, PropertyStatus]:
        """Per property: what was asked, what the composition gives, and
        whether that honours the request (TAPS: querying a property after
        establishment tells whether it was honoured)."""
        t = self.traits
        out: dict[str, PropertyStatus] = {}
        actual_of = {
            "reliability": t.reliable,
            "preserve_order": t.ordered,
            "preserve_msg_boundaries": t.messages,
            "per_msg_reliability": t.per_message_reliability,
            "congestion_control": t.congestion_controlled,
            "security": t.encrypted,
            "full_checksum_recv": t.full_checksum,
        }
        for name in SELECTION_PROPERTIES:
            pref: Preference = getattr(self.properties, name)
            has = actual_of[name]
            if pref in (Preference.REQUIRE, Preference.PREFER):
                honoured: bool | None = has
            elif pref in (Preference.PROHIBIT, Preference.AVOID):
                honoured = not has
            else:
                honoured = None
            detail = ""
            if name == "security":
                spec = self._composition["security"]
                detail = f"security={spec}" if has else "the composition does not encrypt"
            elif name == "per_msg_reliability" and not has:
                detail = "no partial-reliability TF is installed"
            out[name] = PropertyStatus(name, pref.label, "yes" if has else "no", honoured, detail)
        out["capacity_profile"] = self._profile_status()
        cand = self.selection.candidate(self._composition)
        for name in ("max_delay_ms", "min_throughput_mbps", "max_loss_percent"):
            out[name] = self._target_status(name, cand)
        if t.partial_reliability:
            out["msg_lifetime"] = PropertyStatus(
                "msg_lifetime", "per message", "supported", True, "reliability=partial"
            )
        for name, detail in (
            ("msg_lifetime", "needs partial reliability (reliability=partial)"),
            ("msg_priority", "one send queue per connection"),
            ("msg_reliable", "per-message reliability needs partial reliability"),
            ("msg_ordered", "per-message ordering is not supported"),
        ):
            out.setdefault(name, PropertyStatus(name, "per message", "unsupported", False, detail))
        return out

    def _profile_status(self) -> PropertyStatus:
        profile = self.properties.capacity_profile
        t = self.traits
        cc = self._composition["congestion"]
        if profile is CapacityProfile.DEFAULT:
            return PropertyStatus("capacity_profile", profile.value, str(cc), None)
        if profile is CapacityProfile.CONSTANT_RATE_STREAMING:
            ok, detail = t.constant_rate, "paced constant rate" if t.constant_rate else ""
            if not ok:
                detail = "no constant-rate congestion TF in the composition"
        elif profile is CapacityProfile.SCAVENGER:
            ok = t.scavenger
            detail = (
                "scavenger congestion control"
                if ok
                else "approximated at best (no LEDBAT-like TF is installed)"
            )
        elif profile is CapacityProfile.CAPACITY_SEEKING:
            ok = t.congestion_controlled and t.recovery in ("selective", "none")
            detail = "window-based congestion control with selective recovery" if ok else ""
        else:  # low latency
            ok = t.recovery in ("selective", "none")
            detail = (
                "quick loss recovery"
                + (", unordered messages" if not t.ordered and t.messages else "")
                if ok
                else "slow loss recovery"
            )
        return PropertyStatus("capacity_profile", profile.value, str(cc), ok, detail)

    def _target_status(self, name: str, cand: Any) -> PropertyStatus:
        target = getattr(self.properties, name)
        if target is None:
            return PropertyStatus(name, "none", "n/a", None)
        requested = f"{target:g}"
        bad = [v.text for v in cand.violations if v.property == name]
        if bad:
            return PropertyStatus(name, requested, "predicted miss", False, "; ".join(bad))
        worse = [r.text for r in cand.reasons if r.key.startswith(name) and r.delta < 0]
        if worse:
            return PropertyStatus(name, requested, "at risk", False, "; ".join(worse))
        t = self.traits
        if name == "max_loss_percent" and t.reliable:
            return PropertyStatus(name, requested, "0", True, "reliable composition")
        if name == "min_throughput_mbps" and t.constant_rate:
            rate = self._composition["congestion"].params.get("rate_mbps")
            return PropertyStatus(name, requested, f"{rate}", True, "paced at a fixed rate")
        return PropertyStatus(
            name,
            requested,
            "unknown",
            None,
            "depends on the path; see stats() for what was achieved",
        )

    # ------------------------------------------------------------- sending

    async def send(
        self,
        data: bytes | bytearray | memoryview,
        message_properties: MessageProperties | None = None,
    ) -> SendReport:
        """Send stream bytes, or one message with message framing.

        Returns a :class:`SendReport` telling which message properties were
        honoured (raises :class:`MessagePropertyError` for a guarantee the
        composition cannot give).  Waits while the send buffer is full."""
        report = check_message_properties(message_properties, self.traits, len(data))
        lifetime = None
        if report.honoured.get("lifetime"):
            lifetime = message_properties.lifetime  # type: ignore[union-attr]
        await self._vc.send(data, lifetime=lifetime)
        if message_properties is not None and message_properties.final:
            self._vc.close()
        if self._events_active:
            self._push(ev.Sent(report))
        return report

    async def drain(self) -> None:
        """Wait until everything sent has been acknowledged."""
        await self._vc.drain()

    # ----------------------------------------------------------- receiving

    async def receive(self, max_bytes: int | None = None) -> bytes:
        """Next bytes (stream) or next whole message (message framing);
        ``b""`` at end of stream.  Do not mix with :meth:`events`."""
        return await self._vc.receive(max_bytes)

    async def receive_message(self) -> bytes | None:
        """Next whole message; ``None`` at end of stream."""
        return await self._vc.receive_message()

    def _push(self, event: ev.ServiceEvent) -> None:
        self._local_events.append(event)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def events(self) -> AsyncIterator[ev.ServiceEvent]:
        """The connection's events under their TAPS names, starting with
        :class:`~vtl.service.events.Ready` and ending with ``Closed`` or
        ``ConnectionError``.  Use either this or ``receive()``, not both."""
        self._events_active = True
        if not self._ready_given:
            self._ready_given = True
            yield ev.Ready(self._composition)
        loop = asyncio.get_running_loop()
        io_task: asyncio.Future[Event | None] | None = None
        try:
            while True:
                while self._local_events:
                    yield self._local_events.popleft()
                if self._done:
                    return
                if io_task is None:
                    io_task = asyncio.ensure_future(self._vc.next_event())
                self._wakeup = loop.create_future()
                await asyncio.wait({io_task, self._wakeup}, return_when=asyncio.FIRST_COMPLETED)
                if io_task.done():
                    event = io_task.result()
                    io_task = None
                    for mapped in self._map(event):
                        self._local_events.append(mapped)
        finally:
            if io_task is not None:
                if io_task.done() and not io_task.cancelled() and io_task.exception() is None:
                    self._local_events.extend(self._map(io_task.result()))
                else:
                    io_task.cancel()

    def _map(self, event: Event | None) -> list[ev.ServiceEvent]:
        if event is None:
            if self._done:
                return []
            self._done = True
            code = self._vc.error_code
            if code in (None, ErrorCode.NO_ERROR):
                return [ev.Closed()]
            return [ev.ConnectionError(code, self._vc.reason or "", False)]
        if isinstance(event, MessageReceived):
            return [ev.Received(event.data)]
        if isinstance(event, DataReceived):
            return [ev.ReceivedPartial(event.data)]
        if isinstance(event, PeerClosed):
            if self.traits.messages:
                return [ev.Received(b"", final=True)]
            return [ev.ReceivedPartial(b"", end_of_message=True, final=True)]
        if isinstance(event, DataAbandoned):
            what = f"{event.segments} segment(s)"
            if event.messages:
                what = f"message(s) {list(event.messages)} ({event.bytes} bytes)"
            elif event.ranges:
                what = f"stream bytes {[(o, o + n) for o, n in event.ranges]}"
            return [
                ev.ReceiveError(
                    f"{what} abandoned by the sender and never delivered",
                    event.segments,
                    event.bytes,
                    event.messages,
                    event.ranges,
                )
            ]
        if isinstance(event, ConnectionTerminated):
            self._done = True
            if event.error_code == ErrorCode.NO_ERROR:
                return [ev.Closed()]
            return [ev.ConnectionError(event.error_code, event.reason, event.by_peer)]
        if isinstance(event, HandshakeFailed):
            self._done = True
            return [ev.ConnectionError(event.error_code, event.reason, event.by_peer)]
        return []  # HandshakeCompleted: Ready was given first

    async def dispatch(self, handler: Callable[[ev.ServiceEvent], Awaitable[None] | None]) -> None:
        """Call ``handler(event)`` (plain or async) for every event until
        the connection ends: the callback style of the TAPS API."""
        async for event in self.events():
            result = handler(event)
            if inspect.isawaitable(result):
                await result

    # ------------------------------------------------------------- closing

    def close(self) -> None:
        """Graceful half-close: what was sent is still delivered, and the
        peer's data can be received until it closes too."""
        self._vc.close()

    def abort(self, reason: str = "aborted") -> None:
        """Reset the connection now (queued data is dropped)."""
        self._vc.abort(reason)

    async def wait_closed(self) -> None:
        """Wait until the connection is over."""
        await self._vc.wait_closed()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close and wait up to ``timeout`` seconds for the peer to finish;
        reset the connection if it does not."""
        self.close()
        try:
            async with asyncio.timeout(timeout):
                await self._vc.wait_closed()
        except TimeoutError:
            self.abort("close timed out")

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _reap(self) -> None:
        """Initiator side: close our socket once the connection is over and
        the peer had time to see our last ACK."""
        loop = asyncio.get_running_loop()
        try:
            await self._vc.wait_closed()
            deadline = loop.time() + _LINGER_MAX
            core = self._vc.core
            while core.next_timer() is not None and loop.time() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await self._endpoint.close()
