"""Test-only `[experimental] custom_import`: the fusion spec, plus a real SIGKILL in the middle of
one DCP save (tests/test_checkpoint.py::test_sigkill_during_a_save_leaves_the_previous_checkpoint).

DCP's filesystem writer writes every shard file first and `.metadata` last, in finish(). When the
save's folder ends with $FUSION_TEST_KILL_SAVE (e.g. "step-4"), the process kills itself with
SIGKILL right there: the data are on disk, the metadata never will be — what a kill -9 (or a
node failure) during the save leaves behind.
"""

import os
import signal

from torch.distributed.checkpoint.filesystem import FileSystemWriter

import fusion_titan.spec  # noqa: F401  (registers the "fusion" TrainSpec as usual)

_finish = FileSystemWriter.finish


def _finish_or_die(self, metadata, results):
    target = os.environ.get("FUSION_TEST_KILL_SAVE")
    if target and str(self.path).rstrip("/").endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return _finish(self, metadata, results)


FileSystemWriter.finish = _finish_or_die
