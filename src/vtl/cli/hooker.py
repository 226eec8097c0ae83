"""``vtl hooker start|status|stop`` and ``vtl run -- CMD``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("hooker", help="carry unmodified TCP applications over VTL (eBPF)")
    hsub = p.add_subparsers(dest="hooker_command", metavar="ACTION")

    s = hsub.add_parser("start", help="run the Hooker daemon for this host (foreground)")
    s.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="PORT[@COMPOSITION]",
        help="hook TCP connect()s to this destination port (repeatable)",
    )
    s.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="CIDR[@COMPOSITION]",
        help="hook TCP connect()s to this IPv4 prefix (repeatable)",
    )
    s.add_argument("--composition", "-c", help="default composition of carried flows")
    s.add_argument("--carrier", default="vtl", help="substitute transport: vtl (default) or quic")
    s.add_argument("--carrier-port", type=int, default=7400, help="UDP port Hookers talk on")
    s.add_argument("--listen-ip", help="this host's address for hooked connections (default: auto)")
    s.add_argument("--listen-port", type=int, default=7300, help="local TCP port of the Hooker")
    s.add_argument("--cgroup", help="attach to this cgroup v2 directory, not the root")
    s.add_argument(
        "--xdp", action="append", default=[], metavar="IFACE", help="XDP filter on IFACE"
    )
    s.add_argument("--probe-timeout", type=float, default=1.0, help="s to wait for a peer Hooker")
    s.add_argument("--control", help="control socket (default: per network namespace)")
    s.add_argument(
        "--splice-budget",
        type=int,
        help="bytes per socket spliced by sk_msg (default 0: off, see docs/hooker.md)",
    )
    s.set_defaults(func=cmd_start)

    st = hsub.add_parser("status", help="programs, rules, hooked flows and counters")
    st.add_argument("--control")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    hk = hsub.add_parser("hook", help="hook a destination port or IPv4 prefix now")
    hk.add_argument("target", metavar="PORT|CIDR")
    hk.add_argument("--composition", "-c")
    hk.add_argument("--control")
    hk.set_defaults(func=cmd_hook)
    uh = hsub.add_parser("unhook", help="stop hooking a destination port or prefix")
    uh.add_argument("target", metavar="PORT|CIDR")
    uh.add_argument("--control")
    uh.set_defaults(func=cmd_unhook)

    sp = hsub.add_parser("stop", help="stop the Hooker: nothing of VTL stays in the kernel")
    sp.add_argument("--control")
    sp.set_defaults(func=cmd_stop)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    r = sub.add_parser("run", help="run CMD with all its TCP connections hooked")
    r.add_argument("--control")
    r.add_argument("--composition", "-c")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    r.set_defaults(func=cmd_run)


def _split_rule(text: str) -> tuple[str, str | None]:
    target, _, comp = text.partition("@")
    return target.strip(), (comp.strip() or None)


def cmd_start(args: argparse.Namespace) -> int:
    from vtl.hooker.daemon import Hooker, HookerConfig, Rule

    rules = []
    try:
        for text in args.port:
            port, comp = _split_rule(text)
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--port {text!r}: not a port number")
            rules.append(Rule(port=int(port), composition=comp))
        for text in args.prefix:
            prefix, comp = _split_rule(text)
            import ipaddress

            ipaddress.IPv4Network(prefix, strict=False)
            rules.append(Rule(prefix=prefix, composition=comp))
    except ValueError as exc:
        print(f"vtl hooker: {exc}", file=sys.stderr)
        return 2
    cfg = HookerConfig(
        rules=rules,
        listen_ip=args.listen_ip,
        listen_port=args.listen_port,
        carrier=args.carrier,
        carrier_port=args.carrier_port,
        composition=args.composition,
        cgroup=args.cgroup,
        control=args.control,
        xdp=args.xdp,
        probe_timeout=args.probe_timeout,
        splice_budget=args.splice_budget,
    )

    async def main() -> int:
        hooker = Hooker(cfg)
        try:
            await hooker.start()
        except Exception as exc:
            print(f"vtl hooker: cannot start: {exc}", file=sys.stderr)
            return 1
        print(
            f"hooker ready: listen {hooker.listen_ip}:{cfg.listen_port} carrier {cfg.carrier} "
            f"udp/{cfg.carrier_port} control {hooker.control_path} "
            f"rules {', '.join(r.describe() for r in rules) or 'none'}",
            flush=True,
        )
        await hooker.serve()
        return 0

    return asyncio.run(main())


def _fmt_status(st: dict[str, Any]) -> str:
    lines = [
        f"Hooker pid {st['pid']}, up {st['uptime_s']} s, listen {st['listen']}, "
        f"carrier {st['carrier']} udp/{st['carrier_port']}"
    ]
    lines.append("programs:")
    for p in st.get("programs", []):
        lines.append(f"  {p['name']:<18} {p['type']:<20} id {p['id']:<6} on {p['attached_to']}")
    lines.append(
        "rules: " + ("; ".join(f"#{k} {v}" for k, v in st.get("rules", {}).items()) or "none")
    )
    pol = st.get("policy", {})
    if pol.get("peers"):
        lines.append("peers: " + ", ".join(f"{k} {v}" for k, v in pol["peers"].items()))
    lines.append(
        "kernel counters: " + " ".join(f"{k}={v}" for k, v in st.get("kernel", {}).items())
    )
    for ifname, x in st.get("xdp", {}).items():
        c = {k: v for k, v in x.get("counters", {}).items() if not k.endswith("_bytes")}
        lines.append(
            f"xdp {ifname} ({x.get('mode')}, {x.get('connections')} connections): "
            + " ".join(f"{k}={v}" for k, v in c.items())
        )
    eng = {k: v for k, v in st.get("engine", {}).items() if k != "peers"}
    lines.append("flows: " + " ".join(f"{k}={v}" for k, v in sorted(eng.items())))
    for f in st.get("flows", []):
        lines.append("  " + " ".join(f"{k}={v}" for k, v in f.items()))
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from vtl.hooker.daemon import control

    try:
        reply = control(args.control, {"cmd": "status"})
    except (OSError, ConnectionError, TimeoutError) as exc:
        print(f"vtl hooker status: {exc}", file=sys.stderr)
        return 1
    st = reply.get("status", {})
    print(json.dumps(st, indent=2, default=str) if args.json else _fmt_status(st))
    return 0


def _target(text: str) -> dict[str, Any]:
    return {"port": int(text)} if text.isdigit() else {"prefix": text}


def _rule_cmd(args: argparse.Namespace, req: dict[str, Any]) -> int:
    from vtl.hooker.daemon import control

    try:
        reply = control(args.control, req)
    except (OSError, ConnectionError, TimeoutError) as exc:
        print(f"vtl hooker {req['cmd']}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"vtl hooker {req['cmd']}: {reply.get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_hook(args: argparse.Namespace) -> int:
    req = {"cmd": "hook", **_target(args.target), "composition": args.composition}
    return _rule_cmd(args, req)


def cmd_unhook(args: argparse.Namespace) -> int:
    return _rule_cmd(args, {"cmd": "unhook", **_target(args.target)})


def cmd_stop(args: argparse.Namespace) -> int:
    from vtl.hooker.daemon import control

    try:
        path = args.control
        control(path, {"cmd": "stop"})
    except (OSError, ConnectionError, TimeoutError) as exc:
        print(f"vtl hooker stop: {exc}", file=sys.stderr)
        return 1
    # wait until the daemon removed its socket (it detaches before that)
    from vtl.hooker.daemon import default_control_path

    sock = Path(path) if path else default_control_path()
    for _ in range(200):
        if not sock.exists():
            return 0
        import time

        time.sleep(0.05)
    print("vtl hooker stop: the Hooker did not finish stopping within 10 s", file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    """Start CMD in a fresh cgroup that the running Hooker hooks, remove
    the rule and the cgroup when CMD ends; exit with CMD's status."""
    from vtl.hooker.daemon import control
    from vtl.hooker.kernel import cgroup2_root, cgroup_id

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("vtl run: give a command: vtl run -- CMD [ARGS...]", file=sys.stderr)
        return 2
    cg = cgroup2_root() / "vtl" / f"run-{os.getpid()}"
    try:
        cg.mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        print(f"vtl run: cannot create cgroup {cg}: {exc}", file=sys.stderr)
        return 1
    cgid = cgroup_id(cg)
    try:
        reply = control(
            args.control, {"cmd": "hook", "cgroup": cgid, "composition": args.composition}
        )
        if not reply.get("ok"):
            print(f"vtl run: the Hooker refused: {reply.get('error')}", file=sys.stderr)
            return 1
        pid = os.fork()
        if pid == 0:  # child: join the cgroup, then become CMD
            try:
                (cg / "cgroup.procs").write_text(str(os.getpid()))
                os.execvp(cmd[0], cmd)
            except OSError as exc:
                print(f"vtl run: {cmd[0]}: {exc}", file=sys.stderr)
            os._exit(127)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except KeyboardInterrupt:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 2)
        return os.waitstatus_to_exitcode(status) if status else 0
    except (OSError, ConnectionError, TimeoutError) as exc:
        print(f"vtl run: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            control(args.control, {"cmd": "unhook", "cgroup": cgid})
        with contextlib.suppress(OSError):
            cg.rmdir()
