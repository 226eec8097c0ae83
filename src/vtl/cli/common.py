"""Helpers shared by CLI commands: addresses, compositions, output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from vtl.core.composition import Composition
from vtl.core.errors import VtlError


def parse_address(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT``."""
    text = text.strip()
    try:
        if text.startswith("["):
            host, _, port = text[1:].partition("]:")
            return host, int(port)
        if text.count(":") == 1:
            host, port = text.split(":")
            return host or default_host, int(port)
        if text.isdigit():
            return default_host, int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"bad address {text!r}; expected HOST:PORT or [V6]:PORT")


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    """How the user says what they want: a composition, or service properties."""
    g = p.add_argument_group("what to use (a composition, or service properties)")
    g.add_argument(
        "-c",
        "--composition",
        action="append",
        metavar="SPEC",
        help="explicit composition, e.g. 'reliability=selective-repeat(window=256) "
        "congestion=newreno'; repeat to offer alternatives (first preferred)",
    )
    g.add_argument(
        "--service",
        default="reliable-stream",
        choices=["reliable-stream", "reliable-messages", "unreliable-datagram", "low-latency"],
        help="service profile when no composition is given (default: reliable-stream)",
    )
    g.add_argument("--max-delay-ms", type=float, help="QoS target: maximum one-way delay")
    g.add_argument("--min-throughput-mbps", type=float, help="QoS target: minimum throughput")
    g.add_argument("--max-loss-percent", type=float, help="QoS target: tolerated loss")
    g.add_argument(
        "--security",
        choices=["require", "prefer", "no-preference", "avoid", "prohibit"],
        default=None,
        help="encryption and peer authentication (security=aead); require needs "
        "--trust (sender) or --key (receiver)",
    )


def offers_from_args(args: argparse.Namespace) -> tuple[list[Composition], str]:
    """The compositions to offer, and a one-line explanation of the choice."""
    if args.composition:
        if getattr(args, "deploy", None):  # TFs deployed at start: checked after that
            return [Composition.parse(c) for c in args.composition], "given explicitly"
        return [Composition.parse(c).validate() for c in args.composition], "given explicitly"
    from vtl.service import selection
    from vtl.service.properties import TransportProperties

    factory = {
        "reliable-stream": TransportProperties.reliable_stream,
        "reliable-messages": TransportProperties.reliable_messages,
        "unreliable-datagram": TransportProperties.unreliable_datagram,
        "low-latency": TransportProperties.low_latency,
    }[args.service]
    props = factory()
    targets = {
        name: getattr(args, name)
        for name in ("max_delay_ms", "min_throughput_mbps", "max_loss_percent")
        if getattr(args, name, None) is not None
    }
    if getattr(args, "security", None):
        targets["security"] = args.security
    if targets:
        props = dataclasses.replace(props, **targets)
    chosen = selection.select(props)
    return chosen.offers(), chosen.summary()


def emit(record: dict[str, Any], as_json: bool, human: str, stream=None) -> None:
    """Print a result either as one JSON line or as text."""
    out = stream or sys.stdout
    if as_json:
        out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    else:
        out.write(human + "\n")
    out.flush()


def fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"vtl: error: {message}\n")
    return code


__all__ = ["VtlError", "add_service_arguments", "emit", "fail", "offers_from_args", "parse_address"]
