"""The one torchtitan version whose private internals fusion_titan patches or subclasses."""

from __future__ import annotations

SUPPORTED_TORCHTITAN = "0.2.2"


def require_torchtitan_version(what: str) -> None:
    """Stop with a clear message when the installed torchtitan is not the supported version."""
    import torchtitan

    found = getattr(torchtitan, "__version__", "unknown")
    if found != SUPPORTED_TORCHTITAN:
        raise RuntimeError(
            f"{what} relies on torchtitan {SUPPORTED_TORCHTITAN} internals, found torchtitan "
            f"{found}: install torchtitan=={SUPPORTED_TORCHTITAN} (bash scripts/install.sh)")
