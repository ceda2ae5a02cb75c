"""What a sweep's manifest records besides its runs: code version, packages, device, data checksums."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchtitan", "triton")


def git_state(root: Path) -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None  # e.g. no triton on a CPU-only install
    versions["python"] = platform.python_version()
    return versions


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()})"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@lru_cache(maxsize=16)
def prepared_checksum(path: str) -> dict:
    """A prepared directory is identified by its manifest.jsonl (every shard's sha256 is in it).
    Read once per directory and process: the manifest is rewritten after every run of a sweep."""
    from ..data.shards import MANIFEST

    manifest = Path(path) / MANIFEST
    return {"kind": "prepared", "path": str(path), "manifest_sha256": sha256_text(manifest.read_text())}


@lru_cache(maxsize=2)
def stdlib_checksum(held_out: bool) -> dict:
    """The stdlib corpus is identified by its file list and sizes (the split follows from them)."""
    from ..data.stdlib_corpus import stdlib_files, stdlib_root, stdlib_split

    root = stdlib_root()
    train, val = stdlib_split(stdlib_files())
    files = val if held_out else train
    listing = "\n".join(f"{p.relative_to(root).as_posix()} {p.stat().st_size}" for p in files)
    return {"kind": "stdlib", "root": str(root), "files": len(files), "files_sha256": sha256_text(listing)}


def data_checksums(data: dict) -> dict:
    """Checksums of the training and held-out data of a resolved config's `[data]` section."""
    shards = data["source"] == "shards"
    train = prepared_checksum(data["path"]) if shards else stdlib_checksum(held_out=False)
    val_path = data["val_path"] or (data["path"] if shards else "")
    val = prepared_checksum(val_path) if val_path else stdlib_checksum(held_out=True)
    return {"train": train, "heldout": val}
