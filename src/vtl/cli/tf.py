"""``vtl tf``: sign, deploy, upgrade, list and remove TF packages.

``keygen`` / ``sign`` / ``digest`` are operator tools that work on files;
``deploy`` / ``upgrade`` / ``remove`` / ``list`` / ``status`` talk to a
running endpoint's control socket (``vtl recv --control PATH``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vtl.cli.common import fail


def add_parser(sub) -> None:
    p = sub.add_parser("tf", help="deploy transport function packages into running endpoints")
    tsub = p.add_subparsers(dest="tf_command", metavar="ACTION", required=True)

    k = tsub.add_parser("keygen", help="create an Ed25519 signing key (KEY and KEY.pub)")
    k.add_argument("key", help="private key file to create (mode 0600)")
    k.set_defaults(func=run_keygen)

    s = tsub.add_parser("sign", help="write PACKAGE.sig, a detached signature")
    s.add_argument("package")
    s.add_argument("--key", required=True, help="private key from 'vtl tf keygen'")
    s.add_argument("-o", "--output", help="signature file (default: PACKAGE.sig)")
    s.set_defaults(func=run_sign)

    d = tsub.add_parser("digest", help="print a package's SHA-256 (an allowlist line)")
    d.add_argument("package")
    d.set_defaults(func=run_digest)

    v = tsub.add_parser("verify", help="check a package against an allowlist / trusted keys")
    v.add_argument("package")
    v.add_argument("--sig", help="signature file (default: PACKAGE.sig if present)")
    add_trust_arguments(v)
    v.set_defaults(func=run_verify)

    for name, help_ in (("deploy", "deploy a package"), ("upgrade", "deploy a new version")):
        c = tsub.add_parser(name, help=f"{help_} into a running endpoint")
        c.add_argument("package", help="path of the package on the endpoint's host")
        c.add_argument("--sig", help="signature file (default: PACKAGE.sig if present)")
        if name == "upgrade":
            c.add_argument("--replaces", help="package to retire (default: older versions)")
        _control_arg(c)
        c.set_defaults(func=run_control, op=name)
    r = tsub.add_parser("remove", help="remove a deployed package")
    r.add_argument("ref", help="package id, name[@version] or TF name[@version]")
    r.add_argument("--force", action="store_true", help="reset the connections using it")
    _control_arg(r)
    r.set_defaults(func=run_control, op="remove")
    for name in ("list", "status"):
        c = tsub.add_parser(name, help=f"{name} deployed packages of a running endpoint")
        _control_arg(c)
        c.set_defaults(func=run_control, op=name)


def _control_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", required=True, metavar="PATH", help="endpoint control socket")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowlist", metavar="FILE", help="SHA-256 digests allowed to deploy")
    p.add_argument(
        "--trusted-keys", metavar="FILE|DIR", help="Ed25519 public keys whose signatures count"
    )


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    """``--control`` / ``--deploy`` and trust options for commands that run an endpoint."""
    g = p.add_argument_group("TF deployment (docs/deployment.md)")
    g.add_argument("--control", metavar="PATH", help="serve the control socket here")
    g.add_argument(
        "--deploy", metavar="PACKAGE", action="append", default=[],
        help="deploy this TF package before starting (repeatable)",
    )  # fmt: skip
    add_trust_arguments(g)


def _trust(args: argparse.Namespace):
    from vtl.deploy import TrustPolicy

    return TrustPolicy.load(args.allowlist, args.trusted_keys)


async def start_control(ep: Any, args: argparse.Namespace) -> Any:
    """Deploy ``--deploy`` packages and serve ``--control``; returns the
    control server (or None).  Raises DeployError."""
    if not (args.control or args.deploy or args.allowlist or args.trusted_keys):
        return None
    deployer = ep.enable_deployment(_trust(args))
    for pkg in args.deploy:
        dep = deployer.deploy(pkg)
        sys.stderr.write(
            f"vtl: deployed {dep.name} {dep.version} ({', '.join(dep.tf_names())}) "
            f"in {dep.timing_ms['total']:.1f} ms\n"
        )
    if args.control:
        server = await ep.serve_control(args.control)
        sys.stderr.write(f"vtl: control socket {args.control}\n")
        sys.stderr.flush()
        return server
    return None


# ------------------------------------------------------------------ actions


def run_keygen(args: argparse.Namespace) -> int:
    from vtl.deploy import keygen

    try:
        key, pub, fp = keygen(args.key)
    except (OSError, ValueError) as exc:
        return fail(str(exc), 1)
    print(f"private key {key} (keep it secret)\npublic key  {pub}\nfingerprint {fp}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from vtl.deploy import DeployError, sign

    try:
        out = sign(args.package, args.key, args.output)
    except (OSError, ValueError, DeployError) as exc:
        return fail(str(exc), 1)
    print(out)
    return 0


def run_digest(args: argparse.Namespace) -> int:
    from vtl.deploy.trust import sha256_hex

    try:
        print(f"{sha256_hex(Path(args.package).read_bytes())}  {Path(args.package).name}")
    except OSError as exc:
        return fail(str(exc), 1)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from vtl.deploy import DeployError

    try:
        path = Path(args.package)
        sig = Path(args.sig) if args.sig else path.with_name(path.name + ".sig")
        how = _trust(args).verify(path.read_bytes(), sig.read_bytes() if sig.exists() else None)
    except (OSError, DeployError) as exc:
        return fail(str(exc), 1)
    print(f"{path.name}: trusted ({how})")
    return 0


def run_control(args: argparse.Namespace) -> int:
    from vtl.deploy import DeployError
    from vtl.deploy.control import request

    msg: dict[str, Any] = {"op": args.op}
    if args.op in ("deploy", "upgrade"):
        msg["path"] = str(Path(args.package).resolve())
        if args.sig:
            msg["sig"] = str(Path(args.sig).resolve())
        if args.op == "upgrade" and args.replaces:
            msg["replaces"] = args.replaces
    elif args.op == "remove":
        msg.update(ref=args.ref, force=args.force)
    try:
        reply = request(args.control, msg)
    except DeployError as exc:
        return fail(str(exc), 1)
    if not reply.get("ok"):
        return fail(reply.get("error", "request failed"), 1)
    result = reply["result"]
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(_human(args.op, result))
    return 0


def _human(op: str, result: Any) -> str:
    if op in ("deploy", "upgrade"):
        lines = [
            f"deployed {result['id']} {result['name']} {result['version']}: "
            f"{', '.join(result['tfs'])} (verified by {result['verified_by']}, "
            f"{result['deploy_ms']['total']:.1f} ms)"
        ]
        for old in result.get("retired", []):
            lines.append(f"retired {old['id']}: {old['state']} ({old['connections']} connections)")
        return "\n".join(lines)
    if op == "remove":
        return f"removed {result['id']} ({result['connections_reset']} connections reset)"
    deps = result if op == "list" else result["deployments"]
    if not deps:
        text = "no deployed packages"
    else:
        text = "\n".join(
            f"{d['id']}  {d['name']} {d['version']}  {d['state']}  "
            f"{', '.join(d['tfs'])}  connections={d['connections']}"
            for d in deps
        )
    if op == "status" and "endpoint" in result:
        ep = result["endpoint"]
        text += (
            f"\nendpoint: {ep.get('connections')} connections, "
            f"tf_failures={ep.get('tf_failures', 0)}"
        )
    return text
