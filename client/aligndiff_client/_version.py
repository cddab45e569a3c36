"""The distribution's version (a module of its own: read without importing httpx)."""

__version__ = "0.1.0"
