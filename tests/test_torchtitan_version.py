"""Start-up stops on any torchtitan other than the release whose internals we patch."""

import os
import subprocess
import sys

import pytest

from fusion_titan.checkpoint import manager
from fusion_titan.infra import cpu_shim, torchtitan_version
from fusion_titan.infra.torchtitan_version import (
    SUPPORTED_TORCHTITAN,
    UnsupportedTorchtitanError,
    require_supported_torchtitan,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_version(monkeypatch, found):
    monkeypatch.setattr(torchtitan_version, "installed_torchtitan_version", lambda: found)


def test_installed_torchtitan_is_the_supported_one():
    assert torchtitan_version.installed_torchtitan_version() == SUPPORTED_TORCHTITAN
    require_supported_torchtitan()


@pytest.mark.parametrize("found", ["0.2.1", "0.2.3", "0.3.0", "0.2.2.dev0", None])
def test_other_versions_stop_with_the_fix(monkeypatch, found):
    fake_version(monkeypatch, found)
    with pytest.raises(UnsupportedTorchtitanError,
                       match=rf"torchtitan {SUPPORTED_TORCHTITAN}, but .* installed: run "
                             rf"`pip install torchtitan=={SUPPORTED_TORCHTITAN}`") as err:
        require_supported_torchtitan()
    assert (found or "no torchtitan") in str(err.value)


def test_a_local_build_label_is_the_same_release(monkeypatch):
    fake_version(monkeypatch, SUPPORTED_TORCHTITAN + "+cu128")
    require_supported_torchtitan()


def test_the_patches_check_before_patching(monkeypatch):
    fake_version(monkeypatch, "0.3.0")
    monkeypatch.setenv("FUSION_FORCE_CPU", "1")
    monkeypatch.setattr(cpu_shim, "_installed", False)
    with pytest.raises(UnsupportedTorchtitanError):
        cpu_shim.install()
    assert cpu_shim._installed is False
    with pytest.raises(UnsupportedTorchtitanError):
        manager.use_fusion_checkpointing(object())


def test_the_trainer_entry_point_stops_before_torchtitan_runs():
    code = ("import runpy, fusion_titan.infra.torchtitan_version as v; "
            "v.installed_torchtitan_version = lambda: '0.3.0'; "
            "runpy.run_module('fusion_titan.train', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode != 0
    assert "UnsupportedTorchtitanError" in proc.stderr
    assert "but torchtitan 0.3.0 is installed" in proc.stderr
