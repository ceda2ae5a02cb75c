"""The default corpus: the Python standard library's own source files.

Every Python install has them, they are real text (code, docstrings, comments, prose), and no
network or hub is needed. Used by `[data] source = "stdlib"` so a fresh machine trains on real
tokens; the prepared-shard pipeline can also pack it like any other source.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Generated tables, vendored test data and GUI assets add size, not language.
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
               "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "encodings"}
_MIN_BYTES, _MAX_BYTES = 512, 400_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted .py files of the stdlib (the order is part of the data's determinism)."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts):
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if _MIN_BYTES <= size <= _MAX_BYTES:
            files.append(path)
    if not files:
        raise FileNotFoundError(
            f"no Python standard-library sources under {root}; this Python install ships none. "
            "Prepare shards with scripts/prepare_data.py and set [data] source to their folder."
        )
    return files


def stdlib_test_files(root: Path | None = None) -> list[Path]:
    """Sorted test modules of the stdlib (Lib/test/test_*.py): excluded from stdlib_files, so
    held-out text for validation."""
    root = (root or stdlib_root()) / "test"
    files = [p for p in sorted(root.glob("test_*.py")) if _MIN_BYTES <= p.stat().st_size <= _MAX_BYTES]
    if not files:
        raise FileNotFoundError(f"no stdlib test modules under {root}: this Python install ships "
                                "none; validate on prepared shards ([data] val_path)")
    return files


def read_document(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
