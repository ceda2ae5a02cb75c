"""Document deduplication before packing: exact (normalized-prefix hash) and near (MinHash + LSH).

Workers compute each document's keys (`document_keys`, pure and parallel); one `Deduper` in the
main process decides in input order, so the first occurrence is kept and the result does not
depend on the number of workers.

Near duplicates: a document's word k-shingles are hashed (crc32 of each word, mixed over k words),
then `num_perm` multiply-shift hashes ((a x + b) mod 2^64) >> 32 (a odd; uint64 arithmetic wraps
for free, no modulo) give its MinHash signature; the
fraction of equal signature entries estimates the Jaccard similarity of two shingle sets. LSH cuts
the signature into `bands` bands of num_perm / bands rows: documents sharing any band are
candidates, and a candidate counts as a duplicate when its estimated Jaccard is >= `threshold`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

_WS = re.compile(r"\s+")
_SHINGLE_CHUNK = 4096  # shingles hashed at once (bounds memory for very long documents)


@dataclass(frozen=True)
class DedupParams:
    exact: bool = True
    near: bool = True
    prefix_chars: int = 10_000  # exact key: hash of the first N normalized characters (0 = all)
    shingle: int = 5  # words per shingle
    num_perm: int = 128
    bands: int = 16
    threshold: float = 0.8  # estimated Jaccard at or above which a candidate is a duplicate
    seed: int = 1

    def validate(self) -> None:
        if self.num_perm <= 0 or self.bands <= 0 or self.num_perm % self.bands:
            raise ValueError(f"minhash num_perm ({self.num_perm}) must be a positive multiple of "
                             f"bands ({self.bands})")
        if self.shingle <= 0 or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"shingle must be > 0 and threshold in (0, 1]: {self.shingle}, "
                             f"{self.threshold}")


def normalize(text: str) -> str:
    """Case and whitespace do not make a document new."""
    return _WS.sub(" ", text.lower()).strip()


def exact_key(normalized: str, prefix_chars: int) -> bytes:
    text = normalized[:prefix_chars] if prefix_chars > 0 else normalized
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(normalized: str, k: int) -> np.ndarray:
    words = normalized.split(" ") if normalized else [""]
    w = np.fromiter((zlib.crc32(x.encode("utf-8")) for x in words), dtype=np.uint64, count=len(words))
    if len(w) < k:  # short document: one shingle of everything
        k = len(w)
    n = len(w) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):  # position-dependent mix; uint64 wraps around, deterministically
        h = h * np.uint64(1_000_003) + w[j : j + n]
    return h & np.uint64(0xFFFFFFFF)


def minhash(normalized: str, params: DedupParams) -> np.ndarray:
    a, b = _permutations(params.num_perm, params.seed)
    shingles = shingle_hashes(normalized, params.shingle)
    sig = np.full(params.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(0, len(shingles), _SHINGLE_CHUNK):
            x = shingles[i : i + _SHINGLE_CHUNK, None]
            np.minimum(sig, (a * x + b).min(axis=0), out=sig)  # min of the high bits = min >> 32
    return (sig >> np.uint64(32)).astype(np.uint32)


def document_keys(text: str, params: DedupParams) -> tuple[bytes | None, np.ndarray | None]:
    """(exact key, MinHash signature) of one document; None for a disabled kind."""
    norm = normalize(text)
    return (exact_key(norm, params.prefix_chars) if params.exact else None,
            minhash(norm, params) if params.near else None)


# Kept documents remembered per LSH bucket: every candidate is compared with all of them (the
# estimated Jaccard of the signatures), so a near-duplicate of any earlier kept document is found,
# not only of the bucket's first; the cap bounds the work on degenerate buckets (boilerplate).
BUCKET_CAP = 64


class Deduper:
    """Sequential keep/drop decisions; counts what each kind removed."""

    def __init__(self, params: DedupParams):
        params.validate()
        self.params = params
        self.rows = params.num_perm // params.bands
        self.seen: set[bytes] = set()
        # band value -> kept documents with it (at most BUCKET_CAP, the earliest ones)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(params.bands)]
        self.signatures: list[np.ndarray] = []  # of kept documents, for the Jaccard check
        self.exact_removed = 0
        self.near_removed = 0

    def keep(self, key: bytes | None, sig: np.ndarray | None) -> bool:
        if key is not None:
            if key in self.seen:
                self.exact_removed += 1
                return False
        if sig is not None:
            bands = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.params.bands)]
            checked: set[int] = set()
            for band, bucket in zip(bands, self.buckets):
                for other in bucket.get(band, ()):
                    if other in checked:
                        continue
                    checked.add(other)
                    if np.mean(self.signatures[other] == sig) >= self.params.threshold:
                        self.near_removed += 1
                        return False
            idx = len(self.signatures)
            self.signatures.append(sig)
            for band, bucket in zip(bands, self.buckets):
                members = bucket.setdefault(band, [])
                if len(members) < BUCKET_CAP:
                    members.append(idx)
        if key is not None:
            self.seen.add(key)
        return True
