"""rotator: zero-downtime port rotation for local HTTP services."""

__version__ = "0.1.0"
