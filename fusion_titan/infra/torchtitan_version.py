"""The one torchtitan release fusion_titan runs on, checked before its private internals are patched.

The CPU shim (infra/cpu_shim.py) rewrites module attributes of torchtitan 0.2.2 and the checkpoint
manager (checkpoint/manager.py) overrides private methods of its CheckpointManager; on another
release they could silently do nothing or the wrong thing, so start-up stops instead.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_TORCHTITAN = "0.2.2"  # also pinned in pyproject.toml


class UnsupportedTorchtitanError(RuntimeError):
    pass


def installed_torchtitan_version() -> str | None:
    """The installed distribution's version (read without importing torchtitan), None if absent."""
    try:
        return version("torchtitan")
    except PackageNotFoundError:
        return None


def require_supported_torchtitan() -> None:
    found = installed_torchtitan_version()
    # a local build label (0.2.2+cu128) is the same release; anything else is not
    if found is not None and found.split("+")[0] == SUPPORTED_TORCHTITAN:
        return
    raise UnsupportedTorchtitanError(
        f"fusion_titan patches private internals of torchtitan {SUPPORTED_TORCHTITAN}, but "
        f"{'torchtitan ' + found + ' is' if found else 'no torchtitan is'} installed: run "
        f"`pip install torchtitan=={SUPPORTED_TORCHTITAN}` (the version pyproject.toml pins)"
    )
