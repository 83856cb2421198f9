"""What a benchmark's results file records about the software it ran on."""

from __future__ import annotations

import importlib.metadata
import platform


def versions(*packages: str) -> dict[str, str | None]:
    """Python's version and each installed distribution's (None where it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
