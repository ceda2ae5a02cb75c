import shutil

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (the real trainer; the full suite, as CI runs it)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow") and "slow" not in (config.getoption("-m") or ""):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def async_run(tmp_path_factory):
    """8 steps, checkpoints every 2 written asynchronously, a model-only export at the end.

    Leaves step-2, -4, -6 (full) and step-8 (model only) under dump/checkpoint. One run for the
    whole session (the tests only read it); removed at the end, like every fixture's folder, so
    that the suite's peak disk use stays at a few GB.
    """
    from trainer_runs import SEEDED, run_train

    dump = tmp_path_factory.mktemp("async8")
    log = run_train(dump, "--training.steps", "8", "--checkpoint.interval", "2",
                    "--checkpoint.async_mode", "async", "--checkpoint.keep_latest_k", "0",
                    "--checkpoint.last_save_model_only", *SEEDED)
    yield dump, log
    shutil.rmtree(dump, ignore_errors=True)
