"""Commands: the `detector` console script (`main`), the demo, and what they share."""

from detector.cli.commands import main

__all__ = ["main"]
