"""``vtl tfs``: list installed transport functions and their parameters."""

from __future__ import annotations

import argparse
import json

from vtl.core.registry import default_registry


def add_parser(sub) -> None:
    p = sub.add_parser("tfs", help="list installed transport functions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tfs = [cls.describe() for cls in default_registry()]
    if args.json:
        print(json.dumps(tfs, indent=2, default=str))
        return 0
    role = None
    for tf in tfs:
        if tf["role"] != role:
            role = tf["role"]
            print(f"{role}:")
        print(f"  {tf['name']} {tf['version']}  - {tf['doc']}")
        for name, spec in tf["params"].items():
            rng = ""
            if "min" in spec or "max" in spec:
                rng = f" [{spec.get('min', '')}..{spec.get('max', '')}]"
            print(f"      {name}: {spec['type']} = {spec['default']}{rng}  {spec.get('doc', '')}")
    return 0
