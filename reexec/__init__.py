"""reexec: a remote build execution service speaking REAPI v2."""

__version__ = "0.1.0"
