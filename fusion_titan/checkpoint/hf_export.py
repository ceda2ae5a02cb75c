"""What makes a `dcp-to-hf` folder loadable by Hugging Face transformers, besides the weights.

- the remote code (fusion_titan/checkpoint/hf_remote/: configuration_fusion.py, modeling_fusion.py,
  a self-contained port) and config.json's `auto_map` pointing at it, so that
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` builds the model;
- the tokenizer (`[data] tokenizer`, a tiktoken BPE) as tokenizer.json + tokenizer_config.json,
  converted by transformers' TikTokenConverter (needs the `hf` extra; skipped with a note
  otherwise);
- every file readable by others (0644): safetensors' writer creates 0600 files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REMOTE_CODE = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_fusion.py", "modeling_fusion.py")
AUTO_MAP = {"AutoConfig": "configuration_fusion.FusionConfig",
            "AutoModelForCausalLM": "modeling_fusion.FusionForCausalLM"}


def write_remote_code(out_dir: str) -> list[str]:
    paths = []
    for name in REMOTE_FILES:
        paths.append(shutil.copyfile(REMOTE_CODE / name, os.path.join(out_dir, name)))
    return paths


def write_tokenizer(out_dir: str, tokenizer: str) -> str | None:
    """tokenizer.json etc. for `[data] tokenizer` (our TiktokenTokenizer's ranks, Qwen2 pattern and
    special tokens); None (and nothing written) when transformers is not installed."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        return None
    from ..data.tokenizer import ENDOFTEXT, QWEN2_PATTERN, QWEN2_SPECIALS, TiktokenTokenizer

    ranks = TiktokenTokenizer(tokenizer).ranks_file
    converted = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN,
                                  extra_special_tokens=QWEN2_SPECIALS).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=ENDOFTEXT,
                                   pad_token=ENDOFTEXT, clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    return os.path.join(out_dir, "tokenizer.json")


def make_readable(out_dir: str) -> None:
    """Files 0644, folders 0755 (safetensors writes 0600)."""
    for root, dirs, files in os.walk(out_dir):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(out_dir, 0o755)
