"""torchrun, with one line instead of its traceback wall when a worker fails (run_train.sh uses it).

`python -m fusion_titan.infra.torchrun ARGS` is `torchrun ARGS` (torch.distributed.run, same
arguments, same process). When a worker exits with an error, torchrun logs the failure, raises
ChildFailedError and prints its traceback and a framed report, below the worker's own output,
which already says what went wrong: a config error (fusion_titan.train's preflight, exit code 2)
is one message, a crash its Python traceback. Here that report becomes one line naming the rank
and its exit code (or signal), and the exit code is the worker's; Ctrl-C ends with one line too.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

CONFIG_ERROR = 2  # fusion_titan.train's exit code for a configuration it refuses (already explained)


class _NoFailureReport(logging.Filter):
    """torchrun's agent logs "failed (exitcode: N) local_rank: ..." before raising; we report it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed (exitcode:" not in record.getMessage()


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_NoFailureReport())
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode == CONFIG_ERROR:
            return CONFIG_ERROR
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"{error.name}: rank {rank} {how} (its output is above)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as stop:  # Ctrl-C / kill of the launcher: workers were stopped
        print(f"stopped by {stop.sigval.name}", file=sys.stderr)
        return 128 + stop.sigval.value
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
