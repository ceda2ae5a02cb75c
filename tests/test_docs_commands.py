"""Every command in README.md and docs/*.md, run as printed on a fresh copy of the repository.

The commands are the lines of the fenced ```bash blocks (a trailing backslash continues a line;
comment lines are not commands). Page by page, README.md first (the other pages use its run),
each runs with bash in a copy of the files git tracks (no outputs/, no .venv), with this test's
interpreter first on PATH (what `source .venv/bin/activate` does) and no GPU visible. Only
three things differ from a user's shell, all listed here:

- SMALL_STEPS: step counts become small ones (`--training.steps`, `--checkpoint.interval`,
  `--checkpoint.load_step`, a script's `--steps`, `step-N` folders), and a ./run_train.sh without
  `--training.steps` trains 4 steps with a checkpoint every 2 (the debug config's 60 and 30);
- SKIPPED: commands that need a GPU, the network or their user's own files, each with why;
- STAND_INS: the small corpus files the "your own data" examples read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

# doc value -> test value, for every step count the docs print (a new one must be added here)
SMALL_STEPS = {20: 2, 30: 2, 60: 4, 80: 6, 200: 2, 800: 6, 1000: 8, 2000: 10, 2500: 12}
STEP_FLAG = re.compile(r"(--training\.steps|--checkpoint\.interval|--checkpoint\.load_step|--steps)"
                       r"([ =])(\d+)\b")
STEP_FOLDER = re.compile(r"\bstep-(\d+)\b")
DEFAULT_RUN = "--training.steps 4 --checkpoint.interval 2"

# a unique part of the command -> why it is not run here
SKIPPED = {
    "bash scripts/install.sh && ": "installs from the network (CI runs it: .ci/run); the rest of the line runs",
    ".venv/bin/python -m pytest": "the test suite itself",
    "tensorboard --logdir": "a web server that runs until stopped",
    "train_configs/fusion_7b.toml ./run_train.sh": "needs 8 GPUs",
    "train_configs/fusion_1b.toml ./run_train.sh": "needs an 80 GB GPU",
    "--tasks hellaswag ": "downloads hellaswag from the Hugging Face Hub",
    "--tasks hellaswag,arc_easy": "needs a GPU and the Hugging Face Hub",
    "--include_path path/to/task_yamls": "needs your own task YAMLs (tests/test_lm_eval_adapter.py runs a local task)",
    "hf:HuggingFaceFW/fineweb-edu": "streams from the Hugging Face Hub",
    "--device cuda": "needs a GPU",
    "# CUDA: fusion_1b, bf16": "needs a GPU (CUDA is its default device)",
    "long_context_memory.py --max-len 32768": "needs a GPU (CUDA is its default device)",
    "python scripts/benchmark.py": "needs a GPU",
    "first_sweep.toml --out outputs/ablations/first": "needs a GPU (fusion_1b-sized, 12 runs)",
    "playground_sweep.toml --out outputs/ablations/playground": "needs a GPU (fusion_1b-sized, 14 runs)",
    "second_sweep.toml --out outputs/ablations/second": "needs a GPU (fusion_1b-sized, 12 runs)",
}


def stand_ins(repo: Path) -> None:
    """Small 'your own data' files: a JSONL file, a folder of text files, a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = repo / "corpus"
    (corpus / "books").mkdir(parents=True)
    docs = sorted((repo / "docs").glob("*.md"))
    with open(corpus / "web.jsonl", "w") as f:
        for i, page in enumerate(docs):
            for j, paragraph in enumerate(page.read_text().split("\n\n")):
                f.write(json.dumps({"text": f"{paragraph}\n(page {i}, paragraph {j})"}) + "\n")
    for src in sorted((repo / "fusion_titan" / "model").glob("*.py")):
        (corpus / "books" / f"{src.stem}.txt").write_text(src.read_text())
    rows = [p.read_text() for p in sorted((repo / "fusion_titan" / "data").glob("*.py"))]
    pq.write_table(pa.table({"text": rows}), corpus / "part-0.parquet")


def commands(page: str) -> list[str]:
    """The commands of the page's ```bash blocks, in order, continuation lines joined."""
    out, block, current = [], False, ""
    for line in (ROOT / page).read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            out.append(current)
            current = ""
    return out


def skip_reason(command: str) -> str | None:
    hits = [key for key in SKIPPED if key in command]
    return SKIPPED[hits[0]] if hits else None


def small(value: str) -> str:
    number = int(value)
    assert number in SMALL_STEPS, f"step count {number} of a docs command: add it to SMALL_STEPS"
    return str(SMALL_STEPS[number])


def as_tested(command: str) -> str:
    """The command with small step counts (and without the install prefix, see SKIPPED)."""
    command = command.replace("bash scripts/install.sh && ", "")
    command = STEP_FLAG.sub(lambda m: m[1] + m[2] + small(m[3]), command)
    command = STEP_FOLDER.sub(lambda m: "step-" + small(m[1]), command)
    if "./run_train.sh" in command and "--training.steps" not in command:
        code = command.split(" #", 1)
        command = f"{code[0].rstrip()} {DEFAULT_RUN}" + (f"  #{code[1]}" if len(code) > 1 else "")
    return command


def test_every_skip_names_a_printed_command():
    printed = [c for page in PAGES for c in commands(page)]
    for key in SKIPPED:
        assert any(key in c for c in printed), f"SKIPPED entry {key!r} matches no docs command"


def test_step_counts_are_rewritten_consistently():
    assert as_tested("./run_train.sh") == f"./run_train.sh {DEFAULT_RUN}"
    assert as_tested("./run_train.sh --training.steps 80   # on") == "./run_train.sh --training.steps 6   # on"
    assert (as_tested("python scripts/x.py outputs/debug_model/checkpoint/step-60 --steps 20")
            == "python scripts/x.py outputs/debug_model/checkpoint/step-4 --steps 2")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh copy of the repository's files (as git lists them) and the pages run so far."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    copy = tmp_path_factory.mktemp("clone") / "fusion_titan"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    stand_ins(copy)
    yield copy, set()
    shutil.rmtree(copy, ignore_errors=True)


def drop_finished_checkpoints(copy: Path, later: list[str]) -> None:
    """Delete the checkpoints of runs no later command names (README's debug_model is read by
    every page): the pages' runs would otherwise hold ~6 GB of checkpoints until the end."""
    for folder in (copy / "outputs").glob("*/checkpoint"):
        name = folder.parent.name
        if name != "debug_model" and not any(f"outputs/{name}" in c for c in later):
            shutil.rmtree(folder, ignore_errors=True)


def run_page(repo, page: str) -> None:
    copy, done = repo
    if page in done:
        return
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=str(copy), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.pop("NGPU", None)
    page_commands = commands(page)
    for i, command in enumerate(page_commands):
        drop_finished_checkpoints(copy, page_commands[i:])
        reason = skip_reason(command)
        if reason and not command.startswith("bash scripts/install.sh && "):
            print(f"skipped ({reason}): {command}")
            continue
        tested = as_tested(command)
        print(f"$ {tested}", flush=True)
        proc = subprocess.run(["bash", "-c", tested], cwd=copy, env=env, capture_output=True,
                              text=True, timeout=1800)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{page}: `{tested}` exited with {proc.returncode}\n{log[-5000:]}"
        assert "Traceback" not in log, f"{page}: `{tested}`\n{log[-5000:]}"
    drop_finished_checkpoints(copy, [])
    done.add(page)


@pytest.mark.parametrize("page", PAGES)
def test_docs_commands_work_as_printed(repo, page):
    run_page(repo, "README.md")  # the other pages use its run's outputs/debug_model
    run_page(repo, page)
