"""wan_lite's version, written into every result's record (pyproject.toml holds the same)."""

__version__ = "0.1.0"
