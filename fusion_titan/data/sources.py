"""Document sources for scripts/prepare_data.py: local files, Hugging Face datasets, the stdlib.

A source spec is one string:

    path/to/file.txt | .md | .jsonl | .parquet   one file
    path/to/dir                            every .txt/.jsonl/.parquet file under it, sorted
    stdlib                                 the Python standard library (stdlib_corpus.py)
    hf:NAME?split=train&name=CONFIG&...     datasets.load_dataset(NAME, streaming=True, **query)

A .txt (or .md) file is one document (or several, split on `txt_separator` lines); .jsonl and .parquet rows
carry the text in `text_field`. Two query keys of an `hf:` spec are ours, not load_dataset's:
`text=COL[,COL...]` names the row's text column(s) for this source (several are joined with a
blank line; a list column joins its items, a chat `messages` list their `content`), and
`swh=COL` reads each row's text from Software Heritage's public S3 bucket by the blob id in COL
(Stack-Edu ships ids, not contents). Every source yields documents in a fixed order: the order is
part of what makes a prepare run resumable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl

FILE_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def _iter_txt(path: Path, separator: str) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if not separator:
        yield text
        return
    doc: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == separator:
            yield "".join(doc)
            doc = []
        else:
            doc.append(line)
    yield "".join(doc)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise KeyError(f"{path}:{lineno}: no {text_field!r} field (set --text-field)")
            yield str(row[text_field])


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise KeyError(f"{path}: no {text_field!r} column (columns: {pf.schema_arrow.names}; "
                       "set --text-field)")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


# Stack-Edu's contents, gzip-compressed, by blob id (public; the dataset card's own download).
SWH_CONTENT_URL = "https://softwareheritage.s3.amazonaws.com/content/{}"
_SWH_THREADS = 32  # downloads in flight; results keep the dataset's order


def _row_text(spec: str, row: dict, columns: list[str]) -> str:
    parts = []
    for col in columns:
        if col not in row:
            raise KeyError(f"{spec}: rows have no {col!r} column (columns: {sorted(row)}); set "
                           "text=COLUMN in the spec (or --text-field)")
        value = row[col]
        if isinstance(value, list):  # e.g. several generations, or chat turns {"role", "content"}
            parts += [str(v["content"]) if isinstance(v, dict) and "content" in v else str(v) for v in value]
        elif value is not None:
            parts.append(str(value))
    return "\n\n".join(parts)


def _swh_content(blob_id: str) -> str | None:
    """A Software Heritage blob's text; None when the archive does not have it."""
    import gzip
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(SWH_CONTENT_URL.format(blob_id), timeout=60) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        if e.code in (403, 404):  # S3 answers 403 for a missing key without list rights
            return None
        raise
    return gzip.decompress(data).decode("utf-8", errors="replace")


def _iter_swh(spec: str, rows: Iterator[dict], column: str) -> Iterator[str]:
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(_SWH_THREADS) as pool:
        pending: deque = deque()
        for row in rows:
            if column not in row:
                raise KeyError(f"{spec}: rows have no {column!r} column for swh= (columns: {sorted(row)})")
            pending.append(pool.submit(_swh_content, str(row[column])))
            if len(pending) >= 2 * _SWH_THREADS:
                text = pending.popleft().result()
                if text is not None:
                    yield text
        while pending:
            text = pending.popleft().result()
            if text is not None:
                yield text


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    name, _, query = spec[len("hf:"):].partition("?")
    kwargs: dict = dict(parse_qsl(query))
    columns = kwargs.pop("text", text_field).split(",")
    swh = kwargs.pop("swh", None)
    if "data_files" in kwargs:  # several files: comma-separated
        kwargs["data_files"] = kwargs["data_files"].split(",")
    kwargs.setdefault("split", "train")
    ds = datasets.load_dataset(name, streaming=True, **kwargs)
    if swh:
        yield from _iter_swh(spec, iter(ds), swh)
        return
    for row in ds:
        yield _row_text(spec, row, columns)


def _iter_file(path: Path, text_field: str, txt_separator: str) -> Iterator[str]:
    if path.suffix in (".txt", ".md"):
        return _iter_txt(path, txt_separator)
    if path.suffix == ".jsonl":
        return _iter_jsonl(path, text_field)
    if path.suffix == ".parquet":
        return _iter_parquet(path, text_field)
    raise ValueError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")


def iter_documents(spec: str, text_field: str = "text", txt_separator: str = "") -> Iterator[str]:
    """The documents of one source spec, in a deterministic order."""
    if spec == "stdlib":
        from .stdlib_corpus import read_document, stdlib_files

        return (read_document(p) for p in stdlib_files())
    if spec.startswith("hf:"):
        return _iter_hf(spec, text_field)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no {', '.join(FILE_SUFFIXES)} files in this directory")
        return (doc for f in files for doc in _iter_file(f, text_field, txt_separator))
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such file or directory (nor 'stdlib' or 'hf:NAME')")
    return _iter_file(path, text_field, txt_separator)


def parse_source_arg(arg: str) -> tuple[str, str]:
    """'name=spec' -> (name, spec); a bare spec is named after its file or 'stdlib'."""
    name, sep, spec = arg.partition("=")
    if not sep or name.startswith("hf:"):
        spec = arg
        name = "stdlib" if arg == "stdlib" else Path(arg.split("?")[0]).stem.replace(":", "_")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"source name {name!r} (from {arg!r}): use letters, digits, '-' and '_'")
    return name, spec
