"""Test-only `[experimental] custom_import`: the fusion spec, plus a disk that reports
$FUSION_TEST_FREE_BYTES free (tests/test_disk_space.py: the start-up check of room for checkpoints)."""

import os
import shutil

import fusion_titan.spec  # noqa: F401  (registers the "fusion" TrainSpec as usual)

_disk_usage = shutil.disk_usage


def _small_disk_usage(path):
    usage = _disk_usage(path)
    return usage._replace(free=int(os.environ["FUSION_TEST_FREE_BYTES"]))


shutil.disk_usage = _small_disk_usage
