"""Validation data of every shipped TOML: the held-out split gives full batches of the TOML's
[validation] shape (without training), and training never reads it."""

import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan.config import ConfigManager

from fusion_titan.data.dataloader import build_dataloader, build_validation_dataloader, prepare_command
from fusion_titan.data.stdlib_corpus import stdlib_files, stdlib_split
from fusion_titan.data.tokenizer import TiktokenTokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))
RANKS = 8  # the largest plan shipped (fusion_7b on 8 GPUs): every rank needs a full batch


@pytest.fixture(scope="module")
def tok():
    return TiktokenTokenizer("qwen2.5")


def parse(path, *overrides):
    return ConfigManager().parse_args(["--job.config_file", str(path), *overrides])


@pytest.fixture(scope="module")
def prepared_by_header(tmp_path_factory):
    """Runs the prepare command of a TOML's header (into a temporary --out): the data the TOML
    documents. Only for sources that need no download (the Hub is not reachable in tests)."""
    made = {}

    def make(path: Path) -> Path:
        if path not in made:
            out = tmp_path_factory.mktemp(path.stem) / "data"
            args = shlex.split(prepare_command(str(path)))[2:]  # drop "python scripts/prepare_data.py"
            args[args.index("--out") + 1] = str(out)
            subprocess.run([sys.executable, "scripts/prepare_data.py", "--quiet", *args], cwd=ROOT,
                           check=True, timeout=900)
            made[path] = out
        return made[path]

    return make


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_on_full_batches(path, tok, prepared_by_header):
    cfg = parse(path)
    overrides = []
    if cfg.data.source == "shards":
        command = prepare_command(str(path))
        if "hf:" in command:
            # fusion_7b's sources come from the Hub; its stdlib fallback must still validate
            overrides = ["--data.source", "stdlib"]
        else:
            overrides = ["--data.path", str(prepared_by_header(path))]
    cfg = parse(path, *overrides)
    shape = (cfg.validation.local_batch_size, cfg.validation.seq_len)
    for rank in (0, RANKS - 1):
        loader = build_validation_dataloader(RANKS, rank, tok, cfg)
        assert len(loader) >= 1
        (x, labels), = itertools.islice(iter(loader), 1)
        assert tuple(x["input"].shape) == tuple(labels.shape) == shape


def test_stdlib_training_never_reads_the_held_out_files(tok):
    cfg = parse(ROOT / "train_configs/debug_model.toml")
    train, held = stdlib_split(stdlib_files())
    loader = build_dataloader(1, 0, tok, cfg)
    assert loader.documents == train and not set(held) & set(loader.documents)
    val = build_validation_dataloader(1, 0, tok, cfg)
    # validation reads exactly the held-out files, in order
    first = tok.encode(held[0].read_text(encoding="utf-8", errors="replace"))[: cfg.validation.seq_len]
    (x, _), = itertools.islice(iter(val), 1)
    assert x["input"][0, : len(first)].tolist() == first
