"""Build a prepared-shard directory: local files / HF datasets / the stdlib -> dedup -> BPE -> .bin.

    python scripts/prepare_data.py --out data/prepared \
        --source web=corpus/web.jsonl --source books=corpus/books/ --source stdlib \
        --val-fraction 0.01 --workers 2

Re-running the same command finishes an interrupted run, or does nothing when it is complete.
Every option is described in docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_titan.data.dedup import DedupParams  # noqa: E402
from fusion_titan.data.prepare import PrepareParams, prepare  # noqa: E402
from fusion_titan.data.sources import parse_source_arg  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d, dd = PrepareParams(), DedupParams()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="prepared directory (created; resumed if it exists)")
    ap.add_argument("--source", action="append", required=True, metavar="[NAME=]SPEC",
                    help="file, directory, 'stdlib' or 'hf:NAME?name=CONFIG&split=...' (plus our "
                         "text=COL,... and swh=COL keys, docs/data.md); repeat for several")
    ap.add_argument("--tokenizer", default=d.tokenizer, help="'qwen2.5' or a .tiktoken ranks file")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    ap.add_argument("--shard-tokens", type=int, default=d.shard_tokens, help="tokens per shard (about)")
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out documents")
    ap.add_argument("--text-field", default=d.text_field, help="jsonl/parquet/HF text field")
    ap.add_argument("--txt-separator", default=d.txt_separator,
                    help="a line equal to this splits a .txt file into documents ('' = one per file)")
    ap.add_argument("--max-documents", type=int, default=d.max_documents, help="per source, 0 = all")
    ap.add_argument("--no-exact-dedup", action="store_true")
    ap.add_argument("--no-near-dedup", action="store_true")
    ap.add_argument("--prefix-chars", type=int, default=dd.prefix_chars,
                    help="exact dedup key: normalized prefix length (0 = whole document)")
    ap.add_argument("--shingle", type=int, default=dd.shingle, help="words per MinHash shingle")
    ap.add_argument("--num-perm", type=int, default=dd.num_perm, help="MinHash signature length")
    ap.add_argument("--bands", type=int, default=dd.bands, help="LSH bands (divides --num-perm)")
    ap.add_argument("--near-threshold", type=float, default=dd.threshold,
                    help="estimated Jaccard from which a near duplicate is dropped")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    params = PrepareParams(
        tokenizer=a.tokenizer, shard_tokens=a.shard_tokens, val_fraction=a.val_fraction,
        text_field=a.text_field, txt_separator=a.txt_separator, max_documents=a.max_documents,
        dedup=DedupParams(exact=not a.no_exact_dedup, near=not a.no_near_dedup,
                          prefix_chars=a.prefix_chars, shingle=a.shingle, num_perm=a.num_perm,
                          bands=a.bands, threshold=a.near_threshold))
    stats = prepare(a.out, [parse_source_arg(s) for s in a.source], params, workers=a.workers,
                    progress=not a.quiet)
    for name, s in stats.items():
        print(f"{name}: {s['input_documents']} documents read, {s['exact_duplicates']} exact and "
              f"{s['near_duplicates']} near duplicates removed, {s['train_documents']} train "
              f"({s['tokens']:,} tokens) + {s['val_documents']} val ({s['val_tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
