"""VTL: Virtual Transport Layer."""

__version__ = "0.1.0"
