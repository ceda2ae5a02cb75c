"""The default corpus: the Python standard library's own source files.

Every Python install has them, they are real text (code, docstrings, comments, prose), and no
network or hub is needed. Used by `[data] source = "stdlib"` so a fresh machine trains on real
tokens (minus a held-out tenth, `stdlib_split`, that only validation reads); the prepared-shard
pipeline can also pack it like any other source.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

# Generated tables, vendored test data and GUI assets add size, not language.
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
               "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "encodings"}
_MIN_BYTES, _MAX_BYTES = 512, 400_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted .py files of the stdlib (the order is part of the data's determinism).

    Skipped folders are never entered: a stdlib folder may hold site-packages (torch and all),
    13K files whose listing took ~1.5 s of every run's start-up. Symlinked folders are not
    followed (as Path.rglob did before)."""
    root = root or stdlib_root()
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIP_PARTS]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    files = []
    for path in sorted(found):
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if _MIN_BYTES <= size <= _MAX_BYTES:
            files.append(path)
    if not files:
        raise FileNotFoundError(
            f"no Python standard-library sources under {root}; this Python install ships none. "
            "Prepare shards with scripts/prepare_data.py and train with [data] source = 'shards' "
            "and [data] path = their folder."
        )
    return files


# Enough held-out text for 8 ranks x 8 rows x 2048 tokens (torchtitan's [validation] defaults)
# with room to spare: ~200K tokens of the ~2M in CPython 3.11's stdlib.
HELD_OUT_FRACTION = 0.10


def stdlib_split(files: list[Path], root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files), each in the input order. Held out: the first files in
    crc32(path relative to the stdlib) order until they hold HELD_OUT_FRACTION of the bytes, so
    the split is the same on every machine with the same stdlib and the fraction holds whatever
    the file sizes. Training never reads a held-out file."""
    root = root or stdlib_root()
    sizes = {p: p.stat().st_size for p in files}
    target, held, total = HELD_OUT_FRACTION * sum(sizes.values()), set(), 0
    for p in sorted(files, key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), p)):
        if total >= target:
            break
        held.add(p)
        total += sizes[p]
    return [p for p in files if p not in held], [p for p in files if p in held]


def read_document(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
