"""The package version: one home, read by setup.cfg and the result cache."""

__version__ = "0.1.0"
