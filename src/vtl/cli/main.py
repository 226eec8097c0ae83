"""Entry point of the ``vtl`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from vtl import __version__


def build_parser() -> argparse.ArgumentParser:
    from vtl.cli import bench, demo, hooker, keys, testbed, tf, tfs, transfer

    p = argparse.ArgumentParser(
        prog="vtl", description="VTL, the Virtual Transport Layer: transport as a service."
    )
    p.add_argument("--version", action="version", version=f"vtl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    transfer.add_parsers(sub)
    tfs.add_parser(sub)
    tf.add_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    testbed.add_parser(sub)
    keys.add_parser(sub)
    hooker.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
