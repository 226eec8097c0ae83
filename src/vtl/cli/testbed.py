"""``vtl testbed``: emulated multi-host networks in namespaces.

    vtl testbed up examples/testbed/three-hosts.toml [--name NAME]
    vtl testbed exec [--name NAME] h1 -- ping -c3 10.0.12.2
    vtl testbed show [--name NAME] [--json]
    vtl testbed set [--name NAME] h1-h2 [--from h1 | --dir 'h1->h2'] delay_ms=40 loss=1
    vtl testbed down [--name NAME]
    vtl testbed profiles | trace | validate | list | cleanup

See docs/testbed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

SUPERVISOR_DEFAULT = "default"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "testbed",
        help="emulated multi-host networks (namespaces + link emulator)",
        description="Bring up, inspect, change and tear down emulated topologies.",
    )
    tsub = p.add_subparsers(dest="testbed_command", metavar="ACTION")

    def named(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--name", default=SUPERVISOR_DEFAULT, help="topology name (default: default)"
        )

    q = tsub.add_parser("up", help="bring a topology (TOML) up in the background")
    q.add_argument("topology", help="topology file (TOML)")
    named(q)
    q.add_argument("--seed", type=int, help="seed the emulators' random choices")
    q.add_argument("--timeout", type=float, default=60.0)
    q.add_argument("--json", action="store_true", help="print the state as JSON")
    q.set_defaults(func=cmd_up)

    q = tsub.add_parser("exec", help="run a command on a host: exec HOST -- CMD...")
    named(q)
    q.add_argument("host")
    q.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    q.set_defaults(func=cmd_exec)

    q = tsub.add_parser("show", help="hosts, addresses, links, conditions, counters")
    named(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_show)

    q = tsub.add_parser(
        "set",
        help="change a link's conditions live: set LINK key=value...",
        description="Fields: delay_ms jitter_ms loss burst=P,R,H rate_mbps queue_bytes "
        "queue_packets reorder reorder_delay_ms duplicate corrupt trace=FILE "
        "(none to clear); or profile=NAME [loss=..] [bursty=1] to apply a profile.",
    )
    named(q)
    q.add_argument("link")
    q.add_argument(
        "--dir",
        default="both",
        help="both (default), a->b, b->a or 'HOST->HOST' (quote it: > is a shell redirect)",
    )
    q.add_argument("--from", dest="from_host", metavar="HOST", help="the direction leaving HOST")
    q.add_argument(
        "--replace", action="store_true", help="start from no impairment instead of merging"
    )
    q.add_argument("fields", nargs="+", metavar="key=value")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_set)

    q = tsub.add_parser("down", help="tear a topology down")
    named(q)
    q.set_defaults(func=cmd_down)

    q = tsub.add_parser("list", help="running topologies")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_list)

    q = tsub.add_parser("cleanup", help="remove what crashed topologies left behind")
    q.set_defaults(func=cmd_cleanup)

    q = tsub.add_parser("profiles", help="the named network profiles")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_profiles)

    q = tsub.add_parser("trace", help="generate a mahimahi delivery trace")
    q.add_argument("--kind", default="cellular", help="cellular (default) or constant")
    q.add_argument("--seconds", type=float, default=60.0)
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--rate-mbps", type=float, default=12.0, help="for --kind constant")
    q.add_argument("-o", "--output", required=True, help="output file ('-': stdout)")
    q.set_defaults(func=cmd_trace)

    q = tsub.add_parser("validate", help="measure the emulator's accuracy and speed")
    q.add_argument("--long", action="store_true", help="longer runs (more packets)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_validate)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# --------------------------------------------------------------------------- helpers


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"vtl testbed: error: {message}\n")
    return code


def _need_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    return None


def _parse_value(key: str, text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null", "off", ""):
        return None
    if key == "burst":
        parts = [float(x) for x in text.replace("(", "").replace(")", "").split(",")]
        if len(parts) != 3:
            raise ValueError("burst needs three numbers: p_good_to_bad,p_bad_to_good,loss_in_bad")
        return parts
    if key == "trace":
        return os.path.abspath(text)  # the emulator runs elsewhere: give it a full path
    if key in ("profile",):
        return text
    if key == "bursty":
        return low in ("1", "true", "yes", "on")
    if key in ("queue_bytes", "queue_packets"):
        return int(float(text))
    return float(text)


def _parse_fields(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        key = key.strip().replace("-", "_")
        out[key] = _parse_value(key, val)
    return out


def _link_of(state: dict[str, Any], link: str) -> dict[str, Any]:
    try:
        return state["links"][link]
    except KeyError:
        raise ValueError(f"no link {link!r}; links: {', '.join(state['links'])}") from None


def _direction(info: dict[str, Any], text: str) -> str:
    aliases = {
        "both": "both",
        "a->b": "a->b",
        "b->a": "b->a",
        "forward": "a->b",
        "backward": "b->a",
        f"{info['a']}->{info['b']}": "a->b",
        f"{info['b']}->{info['a']}": "b->a",
    }
    try:
        return aliases[text]
    except KeyError:
        raise ValueError(
            f"--dir must be one of {', '.join(sorted(set(aliases)))}; got {text!r}"
        ) from None


def _live_link(info: dict[str, Any]) -> dict[str, Any] | None:
    """Conditions and counters straight from the link's emulator (None for a plain veth)."""
    from vtl.testbed.emulator import control

    if not info.get("emulated") or not info.get("control"):
        return None
    return control(info["control"], {"stats": True})


# --------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> int:
    if why := _need_root():
        return _fail(why)
    from vtl.testbed import supervisor
    from vtl.testbed.netns import TestbedError

    try:
        state = supervisor.start(args.topology, args.name, seed=args.seed, timeout=args.timeout)
    except (TestbedError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(state, indent=1))
    else:
        hosts = ", ".join(f"{h} ({v['ip4']})" for h, v in state["hosts"].items())
        print(f"topology {args.name!r} up: {hosts}")
        for name, link in state["links"].items():
            kind = "emulated" if link["emulated"] else "veth"
            print(f"  link {name}: {link['a']} <-> {link['b']} ({kind})")
        print(f"  vtl testbed exec --name {args.name} HOST -- CMD   |   vtl testbed down"
              + ("" if args.name == SUPERVISOR_DEFAULT else f" --name {args.name}"))  # fmt: skip
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from vtl.testbed import supervisor
    from vtl.testbed.netns import TestbedError

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        return _fail("no command given: vtl testbed exec HOST -- CMD...", 2)
    try:
        state = supervisor.read_state(args.name)
    except TestbedError as exc:
        return _fail(str(exc))
    host = state["hosts"].get(args.host)
    if host is None:
        return _fail(f"no host {args.host!r}; hosts: {', '.join(state['hosts'])}")
    sys.stdout.flush()
    try:
        os.execvp("ip", ["ip", "netns", "exec", host["netns"], *cmd])
    except OSError as exc:
        return _fail(f"cannot run ip netns exec: {exc}")
    return 0  # not reached


def _collect(state: dict[str, Any]) -> dict[str, Any]:
    out = {k: state[k] for k in ("name", "base", "pid", "topology_file", "hosts") if k in state}
    out["links"] = {}
    for name, info in state["links"].items():
        d = dict(info)
        try:
            live = _live_link(info)
        except (OSError, RuntimeError) as exc:
            d["error"] = f"emulator unreachable: {exc}"
            live = None
        if live is not None:
            d["conditions"] = live["conditions"]
            d["stats"] = live["stats"]
            d["uptime_s"] = live["uptime_s"]
            from vtl.testbed.linkspec import Conditions

            d["summary"] = {
                k: Conditions.from_dict(v).summary() for k, v in live["conditions"].items()
            }
        out["links"][name] = d
    return out


def cmd_show(args: argparse.Namespace) -> int:
    from vtl.testbed import supervisor
    from vtl.testbed.netns import TestbedError

    try:
        state = supervisor.read_state(args.name)
    except TestbedError as exc:
        return _fail(str(exc))
    info = _collect(state)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"topology {info['name']!r} (supervisor pid {info['pid']}, {info['topology_file']})")
    print("hosts:")
    for h, v in info["hosts"].items():
        ifs = "  ".join(
            f"{i['ifname']} {i['ip4']} {i['ip6']} -> {i['peer']}" for i in v["interfaces"]
        )
        print(f"  {h:<10} netns {v['netns']:<20} {ifs}")
    print("links:")
    for name, link in info["links"].items():
        a, b = link["a"], link["b"]
        if not link["emulated"]:
            print(f"  {name}: {a} <-> {b}  plain veth (not emulated)")
            continue
        print(f"  {name}: {a} <-> {b}  relay {link['relay']}")
        if "error" in link:
            print(f"    {link['error']}")
            continue
        for d, label in (("a->b", f"{a}->{b}"), ("b->a", f"{b}->{a}")):
            s = link["stats"][d]
            drops = ", ".join(
                f"{k[5:]} {s[k]}" for k in ("drop_loss", "drop_burst", "drop_queue",
                                            "drop_send", "drop_kernel") if s[k]
            ) or "none"  # fmt: skip
            print(f"    {label:<14} {link['summary'][d]}")
            print(
                f"    {'':<14} rx {s['rx_packets']} pkts / {s['rx_bytes']} B, "
                f"tx {s['tx_packets']} pkts, drops: {drops}, queue max "
                f"{s['queue_hwm_bytes']} B, late mean {s['late_mean_us']} us"
            )
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from vtl.testbed import profiles, supervisor
    from vtl.testbed.emulator import control
    from vtl.testbed.linkspec import Conditions
    from vtl.testbed.netns import TestbedError

    try:
        state = supervisor.read_state(args.name)
        info = _link_of(state, args.link)
        if args.from_host:
            if args.from_host not in (info["a"], info["b"]):
                raise ValueError(f"--from {args.from_host}: not an end of link {args.link!r}")
            direction = "a->b" if args.from_host == info["a"] else "b->a"
        else:
            direction = _direction(info, args.dir)
        fields = _parse_fields(args.fields)
    except (TestbedError, ValueError) as exc:
        return _fail(str(exc))
    if not info.get("emulated"):
        return _fail(
            f"link {args.link!r} is not emulated (a plain veth pair: profile 'clean' without "
            "conditions); declare it with `emulate = true` in the topology to change it live"
        )
    try:
        if "profile" in fields:
            prof = fields.pop("profile")
            fwd, bwd = profiles.get(
                prof, fields.pop("loss", None) or 0.0, bool(fields.pop("bursty", False))
            )
            msgs = [
                (d, {**c.to_dict(), **fields})
                for d, c in (("a->b", fwd), ("b->a", bwd))
                if direction in ("both", d)
            ]
            replace = True
        else:
            fields.pop("bursty", None)
            msgs = [(direction, fields)]
            replace = args.replace
        reply: dict[str, Any] = {}
        for d, f in msgs:
            reply = control(info["control"], {"set": {"dir": d, **f}, "replace": replace})
    except (ValueError, RuntimeError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(reply["conditions"], indent=1))
    else:
        for d, c in reply["conditions"].items():
            label = f"{info['a']}->{info['b']}" if d == "a->b" else f"{info['b']}->{info['a']}"
            print(f"{args.link} {label}: {Conditions.from_dict(c).summary()}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if why := _need_root():
        return _fail(why)
    from vtl.testbed import supervisor
    from vtl.testbed.netns import TestbedError

    try:
        found = supervisor.stop(args.name)
    except (TestbedError, ValueError) as exc:
        return _fail(str(exc))
    print(f"topology {args.name!r} " + ("down" if found else "was not up"))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from vtl.testbed import supervisor

    states = supervisor.running()
    if args.json:
        print(json.dumps([{"name": s["name"], "pid": s["pid"], "hosts": list(s["hosts"]),
                           "links": list(s["links"])} for s in states]))  # fmt: skip
    else:
        for s in states:
            print(f"{s['name']}\tpid {s['pid']}\thosts {','.join(s['hosts'])}\t"
                  f"links {','.join(s['links'])}")  # fmt: skip
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    if why := _need_root():
        return _fail(why)
    from vtl.testbed import supervisor
    from vtl.testbed.netns import STATE_DIR, TestbedError, cleanup_stale

    try:
        removed = cleanup_stale(supervisor.CLI_PREFIX)
    except TestbedError as exc:
        return _fail(str(exc))
    for f in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else []:
        try:
            st = json.loads(f.read_text())
            if st.get("kind") == "vtl-testbed" and not supervisor.is_alive(st):
                f.unlink()
        except (OSError, ValueError, KeyError):
            continue
    print(f"removed: {' '.join(removed) or 'nothing'}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from vtl.testbed import profiles

    rows = []
    for name, prof in profiles.PROFILES.items():
        rate = profiles.physical_limit_mbps(name, 0.0)
        rows.append({
            "name": name,
            "description": prof.description,
            "rate_mbps": rate,
            "rtt_ms": prof.rtt_ms,
            "emulated": prof.emulated,
            "trace": bool(prof.trace_seeds),
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'profile':<10} {'rate Mbit/s':>11} {'RTT ms':>7}  description")
    for r in rows:
        rate = "-" if r["rate_mbps"] is None else f"{r['rate_mbps']:.3g}"
        print(f"{r['name']:<10} {rate:>11} {r['rtt_ms']:>7g}  {r['description']}")
    print("\ncombine with loss (percent, each direction) and a bursty (Gilbert-Elliott) "
          f"variant: mean burst {profiles.BURST_LENGTH:g} packets")  # fmt: skip
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from vtl.testbed import traces

    try:
        stamps = traces.generate(args.kind, args.seconds, args.seed, args.rate_mbps)
    except ValueError as exc:
        return _fail(str(exc), 2)
    if args.output == "-":
        sys.stdout.write("".join(f"{ms}\n" for ms in stamps))
    else:
        traces.write_trace(stamps, args.output)
    s = traces.trace_summary(stamps)
    sys.stderr.write(
        f"{args.kind} trace: {s['period_s']:g} s, {s['opportunities']} opportunities, mean "
        f"{s['mean_mbps']:.2f} Mbit/s (100 ms bins: {s['min_mbps_100ms']:.1f}-"
        f"{s['max_mbps_100ms']:.1f}), outages {s['outage_s']:.1f} s\n"
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    if why := _need_root():
        return _fail(why)
    from vtl.testbed.validate import run_validation

    rows = run_validation(quick=not args.long, log=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{sum(r['ok'] for r in rows)}/{len(rows)} checks passed")
    return 0 if all(r["ok"] for r in rows) else 1
