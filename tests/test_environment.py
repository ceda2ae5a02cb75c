"""The project environment: scripts/install.sh fills .venv, run_train.sh and CI use it.

The scripts run for real in a scratch folder, with a stand-in `.venv/bin/python` that records how
it is called (no package is installed) and stand-ins for curl / nvidia-smi on PATH.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
RECORDING_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
if [[ "$*" == "-c import torch" ]]; then exit 1; fi  # no torch yet
if [[ "$*" == -c\\ import\\ torch\\;* ]]; then echo 1; fi  # run_train.sh's GPU count
exit 0
"""


def scratch(tmp_path: Path, *scripts: str) -> Path:
    for script in scripts:
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / script, tmp_path / script)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(RECORDING_PYTHON)
    python.chmod(0o755)
    return tmp_path


def tool(bin_dir: Path, name: str, exit_code: int) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\nexit {exit_code}\n")
    (bin_dir / name).chmod(0o755)


def calls(repo: Path) -> list[str]:
    return (repo / ".venv" / "bin" / "calls.log").read_text().splitlines()


def run(repo: Path, cmd: list[str], bin_dir: Path | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(bin_dir) if bin_dir else None, "/usr/bin", "/bin"]))
    env = {"PATH": path, "HOME": str(repo), "PYTHON": shutil.which("python3") or "/usr/bin/python3"}
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("reachable", [True, False])
def test_install_puts_cpu_torch_into_the_project_venv(tmp_path, reachable):
    repo = scratch(tmp_path / "repo", "scripts/install.sh")
    tool(tmp_path / "bin", "curl", 0 if reachable else 7)  # PyTorch's CPU index answers or not
    proc = run(repo, ["bash", "scripts/install.sh"], tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    torch_install = [c for c in calls(repo) if c.startswith("-m pip install torch==2.13.0")]
    expected = f"-m pip install torch==2.13.0 --extra-index-url {CPU_INDEX}" if reachable \
        else "-m pip install torch==2.13.0"
    assert torch_install == [expected]
    assert "-m pip install -e .[dev,eval,hf]" in calls(repo)
    assert ("not reachable" in proc.stdout) != reachable


def test_install_leaves_torch_to_pip_on_a_gpu_machine(tmp_path):
    repo = scratch(tmp_path / "repo", "scripts/install.sh")
    tool(tmp_path / "bin", "nvidia-smi", 0)
    proc = run(repo, ["bash", "scripts/install.sh", "--gpu"], tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    assert not any("torch==" in c for c in calls(repo))  # the CUDA build, from pyproject's torch>=2.11
    assert "-m pip install -e .[dev,eval,hf,kernels]" in calls(repo)


def test_run_train_uses_the_project_venv_and_no_colours_in_a_pipe(tmp_path):
    repo = scratch(tmp_path / "repo", "run_train.sh")
    proc = run(repo, ["./run_train.sh", "--training.steps", "3"])
    assert proc.returncode == 0, proc.stderr
    launch = calls(repo)[-1]
    assert launch.startswith("-m fusion_titan.infra.torchrun --nproc_per_node=1 ")
    assert launch.endswith("-m fusion_titan.train --job.config_file ./train_configs/debug_model.toml "
                           "--metrics.disable_color_printing --training.steps 3")


def test_ci_and_readme_run_the_same_commands():
    ci = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/install.sh" in ci and "bash scripts/install.sh && ./run_train.sh" in readme
    for tests in (".venv/bin/python -m pytest --runslow -v", ".venv/bin/python -m pytest\n"):
        assert tests in readme
    assert ".venv/bin/python -m pytest --runslow -v" in ci  # CI runs the full suite
