"""Carriers: the transports a Hooker can carry TCP byte streams over."""

from vtl.hooker.carriers.base import (
    DEFAULT_CONNECT_TIMEOUT,
    Carrier,
    CarrierError,
    CarrierReset,
    CarrierStream,
    CarrierUnavailable,
    carrier_names,
    get_carrier,
    register_carrier,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "Carrier",
    "CarrierError",
    "CarrierReset",
    "CarrierStream",
    "CarrierUnavailable",
    "carrier_names",
    "get_carrier",
    "register_carrier",
]
