"""Data pipeline throughput: tokenization per core, prepare end to end, loader tokens/s.

    python scripts/bench_data.py [--documents 300] [--workers 2]

The loader figure is compared with one fusion_1b optimizer step on an H100 (local batch 4 x seq
4096 = 16384 tokens in ~0.58 s, docs/performance.md): the loader must take a small fraction of it.
Results: docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_titan.data.global_batch import BatchPlan  # noqa: E402
from fusion_titan.data.mixture import build_curriculum  # noqa: E402
from fusion_titan.data.prepare import PrepareParams, prepare  # noqa: E402
from fusion_titan.data.shard_loader import ShardLoader, SourceStream  # noqa: E402
from fusion_titan.data.shards import read_manifest  # noqa: E402
from fusion_titan.data.stdlib_corpus import read_document, stdlib_files  # noqa: E402
from fusion_titan.data.tokenizer import TiktokenTokenizer  # noqa: E402
from fusion_titan.training.ramp import Ramp  # noqa: E402

STEP_S, STEP_TOKENS = 0.58, 4 * 4096  # fusion_1b on one H100


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--documents", type=int, default=300)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", type=int, default=200)
    a = ap.parse_args()
    tok = TiktokenTokenizer("qwen2.5")
    texts = [read_document(p) for p in stdlib_files()[: a.documents]]
    chars = sum(map(len, texts))

    t = time.perf_counter()
    n = sum(len(tok.encode(x, add_eos=True)) for x in texts)
    dt = time.perf_counter() - t
    print(f"tokenize (1 core, tiktoken): {n:,} tokens, {chars / 1e6:.1f}M chars in {dt:.2f} s = "
          f"{n / dt:,.0f} tokens/s/core")

    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, a.workers}):
            out = Path(tmp) / f"w{workers}"
            t = time.perf_counter()
            prepare(out, [("stdlib", "stdlib")], PrepareParams(max_documents=a.documents, shard_tokens=1 << 20),
                    workers=workers, progress=False)
            dt = time.perf_counter() - t
            print(f"prepare (read + exact/near dedup + tokenize + write), {workers} worker(s): "
                  f"{a.documents / dt:,.0f} docs/s, {n / dt:,.0f} tokens/s ({n / dt / workers:,.0f} per worker)")

        m = read_manifest(out)
        streams = [SourceStream("stdlib", m, m.shards_of("stdlib"), 0)]
        cur = build_curriculum([], [], ["stdlib"], {"stdlib": streams[0].total})
        for prefetch in (0, 4):
            plan = BatchPlan(0, 8, 1, Ramp.constant(4096), Ramp.constant(4 * 8))  # rank 0 of 8
            ld = ShardLoader(streams, cur, plan, prefetch=prefetch)
            it = iter(ld)
            next(it)
            t = time.perf_counter()
            for _ in range(a.batches):
                next(it)
            dt = (time.perf_counter() - t) / a.batches
            print(f"loader (memmap, seq 4096 x 4 rows, 8 ranks simulated, prefetch {prefetch}): "
                  f"{dt * 1e3:.2f} ms/batch = {STEP_TOKENS / dt:,.0f} tokens/s; "
                  f"{dt / STEP_S:.2%} of a 0.58 s fusion_1b step")


if __name__ == "__main__":
    main()
