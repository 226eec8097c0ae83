"""Live reconfiguration: the RECONFIGURE exchange (docs/reconfiguration.md).

A running connection switches to a new composition without a new
handshake and without losing, duplicating or reordering a byte:

* initiator ``I`` sends REQUEST(id, composition) and repeats it until
  answered;
* responder ``P`` checks it (installed TFs, parameters, live-switchable
  roles, not closing, no other exchange) and answers REFUSE(code, reason),
  leaving the connection unchanged, or *commits*: its switch point ``S_P``
  is its next new sequence number, it installs the new TFs and answers
  ACCEPT(id, S_P) (repeated for every duplicate REQUEST);
* ``I`` commits on the ACCEPT (``S_I`` = its next sequence number) and
  sends CONFIRM(id, S_I) until P answers DONE(id).

An end sends every segment from its own switch point on under the new
TFs (retransmissions of older segments use them too: they are completed
by the new policy, nothing is dropped); the receive side of a TF that
cares (``SWITCH_AT``) switches once everything the peer sent below the
peer's switch point has been delivered.  The ends commit at different
instants, so a TF change is only allowed live if every mix of the old
and new TF across the two ends is correct (per-role hook
``live_switch_refusal``); RTT estimates are the engine's and carry over,
other state through ``TransportFunction.inherit``.

A mixin of :class:`vtl.core.connection.Connection`: it works on the
connection's state, declared in ``Connection.__init__``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from vtl.core import wire
from vtl.core.composition import _ITEM, Composition, TFSpec, _split_items
from vtl.core.errors import CompositionError, ConnectionStateError, ErrorCode, WireError
from vtl.core.events import Event, ReconfigureDone, ReconfigureRefused
from vtl.core.records import U32, State
from vtl.core.registry import ROLES
from vtl.core.wire import HsField, PacketType


class Op(IntEnum):
    """RECONFIG_OP values: the kind of a RECONFIGURE packet."""

    REQUEST = 1  # I -> P: id, composition, inventory
    ACCEPT = 2  # P -> I: id, P's switch sequence, inventory
    REFUSE = 3  # P -> I: id, error code and reason, inventory
    CONFIRM = 4  # I -> P: id, I's switch sequence
    DONE = 5  # P -> I: id (CONFIRM received)


#: roles whose TFs cannot switch live unless their class sets LIVE_SWITCH
NOT_LIVE_ROLES = {"security": "keys and replay state are bound to the handshake"}
#: connection attribute holding each role's TF (default: the role's name)
ROLE_ATTRS = {"congestion": "cc"}
SWITCH_POINTS = ("commit", "boundary", "quiescent")
MAX_BACKOFF_EXP = 4  # REQUEST / CONFIRM resent after rto x 2**min(n, 4)
ANSWERS_KEPT = 8  # answers to the peer's requests kept for duplicates
HISTORY_KEPT = 16


@dataclass
class Exchange:
    """One reconfiguration, from either end's point of view."""

    rid: int
    composition: Composition
    initiator: bool  # we asked for it
    tfs: dict[str, Any]  # the new TF instances (fresh, installed at commit)
    started: float | None = None  # REQUEST first sent / received
    committed: bool = False
    switch_seq: int = 0  # ours (valid once committed)
    peer_switch_seq: int | None = None
    peer_done: bool = False  # initiator: DONE received; responder: CONFIRM received
    deferred: dict[str, tuple[Any, str]] = field(default_factory=dict)
    boundary_at: float | None = None
    pause: float | None = None
    ended_at: float | None = None  # end of the pause measurement
    finished: bool = False  # ReconfigureDone given


class ReconfigState:
    """Per-connection reconfiguration bookkeeping."""

    def __init__(self) -> None:
        self.next_id = 1
        self.active: Exchange | None = None
        self.outbox: list[dict[int, bytes]] = []  # RECONFIGURE bodies to send now
        self.retx: dict[int, bytes] | None = None  # REQUEST/CONFIRM repeated until answered
        self.retx_sends = 0
        self.retx_deadline: float | None = None
        self.settle_deadline: float | None = None
        self.answers: dict[int, dict[int, bytes]] = {}  # peer request id -> our answer
        self.peer_max_id = 0
        self.own_answered = 0  # highest id of our requests the peer answered
        self.last_delivery: float | None = None
        self.delivered_seen = 0
        self.outcomes: dict[int, Event] = {}  # our request id -> Done / Refused
        self.history: list[dict[str, Any]] = []
        self.inherit_failures = 0  # TFs whose inherit() raised (started fresh)


def merge_composition(current: Composition, change: Composition | dict | str) -> Composition:
    """The composition ``change`` asks for: a whole :class:`Composition`, or
    a dict / compact string naming only the roles to change (the others
    keep their current TF)."""
    if isinstance(change, Composition):
        return change
    data = current.to_dict()
    if isinstance(change, dict):
        data.update(change)
        return Composition.from_dict(data)
    if not isinstance(change, str):
        raise CompositionError(f"cannot reconfigure to {change!r}")
    text = change.strip()
    if text.startswith("{"):
        try:
            data.update(json.loads(text))
        except (ValueError, TypeError) as exc:
            raise CompositionError(f"composition is not valid JSON: {exc}") from None
        return Composition.from_dict(data)
    parsed = Composition.parse(text)
    for item in _split_items(text):
        m = _ITEM.fullmatch(item)
        if m:
            role = m.group("role")
            data[role] = parsed[role].to_dict()
    return Composition.from_dict(data)


def _all_specs(comp: Composition) -> list[TFSpec]:
    """Every role's spec, optional roles left at their default included (a
    switch back to the default must reach the running TF too)."""
    out = []
    for role in ROLES:
        try:
            out.append(comp[role])
        except KeyError:
            continue
    return out


def switch_refusal(role: str, old_cls: type | None, new_cls: type) -> str | None:
    """Why a running connection cannot switch role ``role`` from ``old_cls``
    to ``new_cls`` (None: it can).  Looks only at class attributes, so TFs
    written without knowing about reconfiguration get their role's default."""
    for cls in (old_cls, new_cls):
        if cls is None:
            continue
        live = getattr(cls, "LIVE_SWITCH", None)
        if live is None:
            live = role not in NOT_LIVE_ROLES
        if not live:
            why = NOT_LIVE_ROLES.get(role, "its TF does not support live switching")
            name = getattr(cls, "NAME", cls.__name__)
            return f"{role} {name!r} cannot be switched on a running connection: {why}"
    when = getattr(new_cls, "SWITCH_AT", "commit")
    if when not in SWITCH_POINTS:
        return f"{role} {getattr(new_cls, 'NAME', '?')!r}: unknown SWITCH_AT {when!r}"
    hook = getattr(new_cls, "live_switch_refusal", None)
    if old_cls is not None and hook is not None:
        return hook(old_cls)
    return None


def _valid_inventory(inv: Any) -> bool:
    return isinstance(inv, dict) and all(
        isinstance(names, dict) and all(isinstance(v, list) for v in names.values())
        for names in inv.values()
    )


class ReconfigMixin:
    """RECONFIGURE: request, answer, commit and switch of TFs."""

    # ------------------------------------------------------------ API

    def reconfigure(self, composition: Composition | dict | str, now: float | None = None) -> int:
        """Ask the peer to switch this connection to ``composition`` (whole,
        or only the roles to change).  Returns the reconfiguration id; the
        outcome arrives as :class:`ReconfigureDone` or
        :class:`ReconfigureRefused` (also from :meth:`reconfigure_outcome`).
        Raises :class:`ConnectionStateError` before the handshake completes,
        after termination, or while another reconfiguration runs."""
        r = self._reconf
        if self.state is not State.ESTABLISHED:
            raise ConnectionStateError("reconfigure() needs an established connection")
        if r.active is not None:
            raise ConnectionStateError(f"reconfiguration {r.active.rid} is still in progress")
        rid = r.next_id
        r.next_id += 1
        if self._reconf_closing():
            self._reconf_refused(rid, ErrorCode.RECONFIG_CLOSING, "the connection is closing")
            return rid
        try:
            comp = merge_composition(self.composition, composition)
        except CompositionError as exc:
            self._reconf_refused(rid, ErrorCode.RECONFIG_UNSUPPORTED, str(exc))
            return rid
        problem = self._reconf_check(comp, check_peer=True)
        tfs: dict[str, Any] = {}
        if problem is None:
            tfs, problem = self._reconf_instantiate(comp)
        if problem is not None:
            self._reconf_refused(rid, *problem)
            return rid
        r.active = Exchange(rid, comp, True, tfs, started=now)
        fields = {
            HsField.RECONFIG_OP: bytes([Op.REQUEST]),
            HsField.RECONFIG_ID: rid.to_bytes(4, "big"),
            HsField.COMPOSITIONS: wire.to_json([comp.to_dict()]),
            HsField.INVENTORY: wire.to_json(self.registry.inventory()),
            HsField.RECONFIG_SEEN: r.peer_max_id.to_bytes(4, "big"),
        }
        self._reconf_repeat(fields)
        return rid

    def reconfigure_outcome(self, rid: int) -> Event | None:
        """The ReconfigureDone / ReconfigureRefused of our request ``rid``,
        or None while it runs."""
        return self._reconf.outcomes.get(rid)

    @property
    def reconfiguring(self) -> bool:
        """Whether a reconfiguration exchange is in progress."""
        return self._reconf.active is not None

    # ------------------------------------------------------- checks

    def _reconf_closing(self) -> bool:
        # a CLOSE sent or received fixes where a direction ends: no switch
        # point may be agreed any more (close() alone still lets queued data go)
        return (
            self.state is not State.ESTABLISHED
            or self._close_final is not None
            or self._peer_final is not None
        )

    def _reconf_check(self, comp: Composition, check_peer: bool) -> tuple[int, str] | None:
        """(code, reason) if this end cannot switch to ``comp``."""
        try:
            comp.validate(self.registry)
        except CompositionError as exc:
            return ErrorCode.RECONFIG_UNSUPPORTED, str(exc)
        if check_peer and self.peer_inventory and _valid_inventory(self.peer_inventory):
            missing = comp.satisfiable_by(self.peer_inventory)
            if missing:
                return ErrorCode.RECONFIG_UNSUPPORTED, f"the peer lacks {', '.join(missing)}"
        for spec in _all_specs(comp):
            try:
                old_spec = self.composition[spec.role]
            except KeyError:
                old_spec = None
            if old_spec == spec:
                continue
            current = getattr(self, ROLE_ATTRS.get(spec.role, spec.role), None)
            old_cls = type(current) if current is not None else None
            new_cls = self.registry.get(spec.role, spec.name, spec.version)
            reason = switch_refusal(spec.role, old_cls, new_cls)
            if reason:
                return ErrorCode.RECONFIG_NOT_LIVE, reason
        return None

    def _reconf_instantiate(
        self, comp: Composition
    ) -> tuple[dict[str, Any], tuple[int, str] | None]:
        try:
            tfs = comp.instantiate(
                self.registry, congestion={"max_datagram_size": self.config.max_datagram_size}
            )
        except Exception as exc:  # a third-party TF constructor: refuse, do not crash
            return {}, (ErrorCode.RECONFIG_UNSUPPORTED, f"cannot create the new TFs: {exc}")
        return tfs, None

    # ------------------------------------------------------ receiving

    def _on_reconfigure(self, p: wire.Packet, now: float) -> None:
        fields = wire.decode_fields(p.body)
        op = wire.field_int(fields, HsField.RECONFIG_OP, 1)
        rid = wire.field_int(fields, HsField.RECONFIG_ID, 4)
        if HsField.INVENTORY in fields:
            inv = wire.field_json(fields, HsField.INVENTORY)
            if not _valid_inventory(inv):
                raise WireError("malformed INVENTORY in RECONFIGURE")
            self.peer_inventory = inv  # keeps up with TFs deployed since the handshake
        if op == Op.REQUEST:
            self._reconf_on_request(fields, rid, now)
        elif op == Op.ACCEPT:
            self._reconf_on_accept(fields, rid, now)
        elif op == Op.REFUSE:
            self._reconf_on_refuse(fields, rid)
        elif op == Op.CONFIRM:
            self._reconf_on_confirm(fields, rid, now)
        elif op == Op.DONE:
            self._reconf_on_done(rid, now)
        else:
            raise WireError(f"unknown RECONFIGURE op {op}")

    def _reconf_on_request(self, fields: dict[int, bytes], rid: int, now: float) -> None:
        r = self._reconf
        if rid in r.answers:  # duplicate: same answer again (idempotent)
            r.outbox.append(r.answers[rid])
            return
        if rid < r.peer_max_id:
            return  # an old request, answered long ago
        comps = wire.field_json(fields, HsField.COMPOSITIONS)
        if not isinstance(comps, list) or len(comps) != 1:
            raise WireError("RECONFIGURE request must carry exactly one composition")
        r.peer_max_id = rid
        seen = wire.field_int(fields, HsField.RECONFIG_SEEN, 4, default=0)
        if self.is_client and seen < r.own_answered:
            # made before the server saw one of our requests, which it then
            # answered: it dropped this one on the collision (a late copy)
            self._reconf_refuse(
                rid, ErrorCode.RECONFIG_BUSY, "both ends asked at once; ours went first"
            )
            return
        a = r.active
        if a is not None and a.initiator and not a.committed:
            if self.is_client:  # collision: the initiator's request goes first
                self._reconf_refuse(
                    rid, ErrorCode.RECONFIG_BUSY, "both ends asked at once; ours goes first"
                )
                return
            self._reconf_abandon(
                ErrorCode.RECONFIG_BUSY, "both ends asked at once; the peer's request went first"
            )
            a = None
        if a is not None:
            self._reconf_refuse(
                rid, ErrorCode.RECONFIG_BUSY, f"reconfiguration {a.rid} is in progress"
            )
            return
        if self._reconf_closing():
            self._reconf_refuse(rid, ErrorCode.RECONFIG_CLOSING, "the connection is closing")
            return
        try:
            comp = Composition.from_dict(comps[0])
        except CompositionError as exc:
            self._reconf_refuse(rid, ErrorCode.RECONFIG_UNSUPPORTED, str(exc))
            return
        problem = self._reconf_check(comp, check_peer=False)
        tfs: dict[str, Any] = {}
        if problem is None:
            tfs, problem = self._reconf_instantiate(comp)
        if problem is not None:
            self._reconf_refuse(rid, *problem)
            return
        ex = Exchange(rid, comp, False, tfs, started=now)
        r.active = ex
        self._reconf_commit(ex, now)
        self._reconf_answer(
            rid,
            {
                HsField.RECONFIG_OP: bytes([Op.ACCEPT]),
                HsField.RECONFIG_ID: rid.to_bytes(4, "big"),
                HsField.SWITCH_SEQ: (ex.switch_seq % U32).to_bytes(4, "big"),
                HsField.INVENTORY: wire.to_json(self.registry.inventory()),
            },
        )

    def _reconf_on_accept(self, fields: dict[int, bytes], rid: int, now: float) -> None:
        r = self._reconf
        a = r.active
        if a is None or not a.initiator or a.rid != rid:
            return  # stale or duplicate
        if a.committed:  # our CONFIRM was lost: repeat it
            if r.retx is not None:
                r.outbox.append(r.retx)
            return
        a.peer_switch_seq = self._reconf_switch_seq(fields)
        r.own_answered = max(r.own_answered, rid)
        self._reconf_commit(a, now)
        self._reconf_repeat(
            {
                HsField.RECONFIG_OP: bytes([Op.CONFIRM]),
                HsField.RECONFIG_ID: rid.to_bytes(4, "big"),
                HsField.SWITCH_SEQ: (a.switch_seq % U32).to_bytes(4, "big"),
            }
        )
        self._reconf_progress(now)

    def _reconf_on_refuse(self, fields: dict[int, bytes], rid: int) -> None:
        a = self._reconf.active
        raw = fields.get(HsField.RECONFIG_ERROR)
        if raw is None:
            raise WireError("RECONFIGURE refusal without RECONFIG_ERROR")
        code, reason = wire.decode_error(raw)
        if a is None or not a.initiator or a.rid != rid or a.committed:
            return
        self._reconf_stop_repeat()
        self._reconf.active = None
        self._reconf.own_answered = max(self._reconf.own_answered, rid)
        self._reconf_refused(rid, code, reason, by_peer=True)

    def _reconf_on_confirm(self, fields: dict[int, bytes], rid: int, now: float) -> None:
        r = self._reconf
        a = r.active
        done = {
            HsField.RECONFIG_OP: bytes([Op.DONE]),
            HsField.RECONFIG_ID: rid.to_bytes(4, "big"),
        }
        if a is not None and not a.initiator and a.rid == rid:
            if a.peer_switch_seq is None:
                a.peer_switch_seq = self._reconf_switch_seq(fields)
            a.peer_done = True
            r.outbox.append(done)
            self._reconf_progress(now)
        elif rid in r.answers and r.answers[rid][HsField.RECONFIG_OP][0] == Op.ACCEPT:
            r.outbox.append(done)  # our DONE was lost

    def _reconf_on_done(self, rid: int, now: float) -> None:
        a = self._reconf.active
        if a is None or not a.initiator or a.rid != rid or not a.committed:
            return
        a.peer_done = True
        self._reconf_stop_repeat()
        self._reconf_progress(now)

    def _reconf_switch_seq(self, fields: dict[int, bytes]) -> int:
        seq = wire.expand(wire.field_int(fields, HsField.SWITCH_SEQ, 4), self._rcv_next)
        if seq > self._window_limit:
            raise WireError("switch sequence beyond our advertised window")
        return seq

    # -------------------------------------------------------- switching

    def _reconf_commit(self, ex: Exchange, now: float) -> None:
        """Switch our sending side now: segments from ``switch_seq`` on go
        out under the new TFs; receive-side switches may wait."""
        ex.committed = True
        ex.switch_seq = self._snd_nxt
        old = self.composition
        for spec in _all_specs(ex.composition):
            try:
                if old[spec.role] == spec:
                    continue
            except KeyError:
                pass
            new = ex.tfs.get(spec.role)
            if new is None:  # an optional role back to its default (left out of specs)
                new = self.registry.get(spec.role, spec.name, spec.version)(spec.params)
            if spec.role == "flow":
                # from now on the peer may advertise either window
                self._flow_window_bound = max(
                    self._flow_window_bound, self.flow.window, getattr(new, "window", 0)
                )
            when = getattr(new, "SWITCH_AT", "commit")
            if when == "commit":
                self._reconf_install(spec.role, new, now)
            else:
                ex.deferred[spec.role] = (new, when)
        self.composition = ex.composition
        self.stats["reconfigurations"] += 1

    def _reconf_install(self, role: str, new: Any, now: float) -> None:
        if role == "fec":  # encoder/decoder state is rebuilt at a block boundary
            self._reconf_install_fec(new, now)
            return
        attr = ROLE_ATTRS.get(role, role)
        old = getattr(self, attr, None)
        if old is not None:
            try:
                new.inherit(old, rtt=self.rtt, now=now, bytes_in_flight=self._bytes_in_flight)
            except Exception:  # a faulty TF: it starts fresh, the switch goes on
                self._reconf.inherit_failures += 1
        setattr(self, attr, new)
        if role == "reliability":
            p = new.params
            self.rtt.min_rto = p.get("min_rto", self.rtt.min_rto)
            self.rtt.max_rto = p.get("max_rto", self.rtt.max_rto)
            self.rtt.backoff = p.get("rto_backoff", self.rtt.backoff)

    def _reconf_on_packet(self, now: float, data: bool) -> None:
        """After every received packet: note deliveries (for the pause
        measurement) and move an exchange towards its end."""
        r = self._reconf
        a = r.active
        if data and a is not None and a.boundary_at is not None and r.settle_deadline is not None:
            # the peer is sending: wait for the first delivery after the switch
            r.settle_deadline = max(r.settle_deadline, now + 2 * self.rtt.smoothed)
            self._reconf_arm()
        delivered = self.stats["app_bytes_delivered"]
        if delivered != r.delivered_seen:
            r.delivered_seen = delivered
            a = r.active
            if a is not None and a.started is not None and a.ended_at is None:
                since = a.started if r.last_delivery is None else max(r.last_delivery, a.started)
                gap = now - since
                if a.pause is None or gap > a.pause:
                    a.pause = gap
            r.last_delivery = now
        if r.active is not None:
            self._reconf_progress(now)

    def _reconf_progress(self, now: float) -> None:
        r = self._reconf
        a = r.active
        if a is None or not a.committed or a.peer_switch_seq is None:
            return
        if a.boundary_at is None:
            if self._rcv_next < a.peer_switch_seq:
                return  # old-composition data from the peer still to deliver
            if a.deferred:
                # nothing held out of order, no message half assembled
                quiet = not self._rcv_ranges and not self._rcv_buf and not self._msg_parts
                for role, (new, when) in list(a.deferred.items()):
                    if when == "boundary" or quiet:
                        self._reconf_install(role, new, now)
                        del a.deferred[role]
                if a.deferred:
                    return
            a.boundary_at = now
            r.settle_deadline = now + 2 * self.rtt.smoothed
            self._reconf_arm()
        # done at the first delivery after the switch, or when the peer has
        # sent nothing for 2 RTTs after the boundary (nothing to deliver)
        if a.ended_at is None and (
            self._rcv_next > a.peer_switch_seq
            or (r.settle_deadline is not None and now >= r.settle_deadline)
        ):
            a.ended_at = now
            r.settle_deadline = None
            self._reconf_arm()
        # the exchange is over for both ends once the peer has our CONFIRM
        # (initiator: DONE received; responder: it got the CONFIRM)
        if a.ended_at is not None and a.peer_done:
            self._reconf_finish(a)
            r.active = None

    def _reconf_finish(self, a: Exchange) -> None:
        r = self._reconf
        a.finished = True
        now = a.ended_at if a.ended_at is not None else 0.0
        started = now if a.started is None else a.started
        event = ReconfigureDone(
            a.rid,
            a.composition,
            not a.initiator,
            a.switch_seq,
            a.peer_switch_seq if a.peer_switch_seq is not None else 0,
            now - started,
            a.pause,
        )
        self._events.append(event)
        if a.initiator:
            self._reconf_outcome(a.rid, event)
        r.history.append(
            {
                "id": a.rid,
                "by_peer": not a.initiator,
                "composition": str(a.composition),
                "switch_seq": a.switch_seq,
                "peer_switch_seq": event.peer_switch_seq,
                "elapsed": event.elapsed,
                "pause": a.pause,
            }
        )
        del r.history[:-HISTORY_KEPT]

    def _reconf_abandon(self, code: int, reason: str) -> None:
        """Drop our uncommitted request (collision)."""
        a = self._reconf.active
        self._reconf_stop_repeat()
        self._reconf.active = None
        if a is not None:
            self._reconf_refused(a.rid, code, reason, by_peer=False)

    def _reconf_refused(self, rid: int, code: int, reason: str, by_peer: bool = False) -> None:
        event = ReconfigureRefused(rid, int(code), reason, by_peer)
        self._events.append(event)
        self._reconf_outcome(rid, event)
        self.stats["reconfigurations_refused"] += 1

    def _reconf_outcome(self, rid: int, event: Event) -> None:
        outcomes = self._reconf.outcomes
        outcomes[rid] = event
        while len(outcomes) > HISTORY_KEPT:
            del outcomes[next(iter(outcomes))]

    # --------------------------------------------------------- sending

    def _reconf_refuse(self, rid: int, code: int, reason: str) -> None:
        self._reconf_answer(
            rid,
            {
                HsField.RECONFIG_OP: bytes([Op.REFUSE]),
                HsField.RECONFIG_ID: rid.to_bytes(4, "big"),
                HsField.RECONFIG_ERROR: wire.encode_error(int(code), reason),
                HsField.INVENTORY: wire.to_json(self.registry.inventory()),
            },
        )

    def _reconf_answer(self, rid: int, fields: dict[int, bytes]) -> None:
        answers = self._reconf.answers
        answers[rid] = fields
        while len(answers) > ANSWERS_KEPT:
            del answers[next(iter(answers))]
        self._reconf.outbox.append(fields)

    def _reconf_repeat(self, fields: dict[int, bytes]) -> None:
        """Send ``fields`` now and again until answered."""
        r = self._reconf
        r.retx = fields
        r.retx_sends = 0
        r.retx_deadline = None
        r.outbox.append(fields)
        self._reconf_arm()

    def _reconf_stop_repeat(self) -> None:
        r = self._reconf
        r.retx = None
        r.retx_deadline = None
        self._reconf_arm()

    def _reconf_arm(self) -> None:
        r = self._reconf
        times = [t for t in (r.retx_deadline, r.settle_deadline) if t is not None]
        self._reconf_deadline = min(times) if times else None

    def _reconf_on_timer(self, now: float) -> None:
        r = self._reconf
        if r.retx is not None and r.retx_deadline is not None and now >= r.retx_deadline:
            r.retx_deadline = None
            r.outbox.append(r.retx)
        if r.settle_deadline is not None and now >= r.settle_deadline:
            self._reconf_progress(now)
        self._reconf_arm()

    def _send_reconfigure(self, out: list[bytes], now: float) -> None:
        r = self._reconf
        for fields in r.outbox:
            pn = self._next_pn
            self._next_pn += 1
            datagram = wire.encode(
                PacketType.RECONFIGURE,
                self.peer_cid,
                self.local_cid,
                pn,
                wire.encode_fields(fields),
            )
            out.append(datagram)
            self._count_sent(len(datagram), now)
            if fields is r.retx:
                a = r.active
                if a is not None and a.started is None:
                    a.started = now
                r.retx_sends += 1
                backoff = 2 ** min(r.retx_sends - 1, MAX_BACKOFF_EXP)
                r.retx_deadline = now + self.rtt.rto() * backoff
        r.outbox.clear()
        self._reconf_arm()
