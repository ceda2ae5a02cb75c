"""scripts/plot_run.py: PNGs of a run from its TensorBoard events (fusion_titan/training/tb_scalars.py)."""

import importlib.util
import time

import matplotlib.image
import pytest
from torch.utils.tensorboard import SummaryWriter

from fusion_titan.training.tb_scalars import read_all_scalars
from trainer_runs import ROOT  # async_run: tests/conftest.py

ALL = {"loss.png", "lr.png", "grad_norm.png", "tokens_per_second.png", "expert_load.png"}


def plot_run_script():
    spec = importlib.util.spec_from_file_location("plot_run", ROOT / "scripts" / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_events(folder, values: dict[str, dict[int, float]]):
    writer = SummaryWriter(str(folder))
    for tag, points in values.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def test_events_of_a_resumed_run_are_merged_and_figures_skip_what_was_not_logged(tmp_path, capsys):
    """Two event files (a run and its resume from step 3) with no MoE metrics."""
    first = {"loss_metrics/global_avg_loss": {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.9},
             "loss_metrics/ce": {1: 8.5, 2: 7.5, 3: 6.5, 4: 6.4}, "grad_norm": {1: 2.0, 2: 1.0},
             "validation_metrics/loss": {2: 7.7}, "lr/adamw": {1: 1e-3, 2: 2e-3}}
    write_events(tmp_path / "tb" / "20260101-0000", first)
    time.sleep(1.1)  # event file names carry the start time in seconds: the resume sorts later
    write_events(tmp_path / "tb" / "20260101-0001", {"loss_metrics/global_avg_loss": {4: 6.0, 5: 5.0}})
    scalars = read_all_scalars(tmp_path)
    assert scalars["loss_metrics/global_avg_loss"] == {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0, 5: 5.0}
    assert scalars["validation_metrics/loss"] == {2: pytest.approx(7.7)}

    plot_run = plot_run_script()
    labels = [label for spec in plot_run.FIGURES["loss.png"][3] for label, _ in plot_run.series(scalars, spec)]
    assert labels == ["loss (minimized: CE + MTP + balance terms)", "CE (next token)", "validation CE"]
    written = plot_run.main([str(tmp_path)])
    assert {p.name for p in written} == ALL - {"expert_load.png", "tokens_per_second.png"}
    assert all(p.parent == tmp_path / "plots" for p in written)
    assert "skipped expert_load.png" in capsys.readouterr().out


def test_no_events_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no TensorBoard scalars"):
        plot_run_script().main([str(tmp_path)])


@pytest.mark.slow
def test_plots_of_a_real_trainer_run(async_run, tmp_path):
    dump, _ = async_run
    plot_run = plot_run_script()
    written = plot_run.main([str(dump), "--out", str(tmp_path)])
    assert {p.name for p in written} == ALL
    scalars = read_all_scalars(dump)
    loss_curves = [label for spec in plot_run.FIGURES["loss.png"][3]
                   for label, _ in plot_run.series(scalars, spec)]
    assert loss_curves == ["loss (minimized: CE + MTP + balance terms)", "CE (next token)", "MTP depth 1"]
    lr_curves = [label for spec in plot_run.FIGURES["lr.png"][3] for label, _ in plot_run.series(scalars, spec)]
    assert "normuon" in lr_curves and len(lr_curves) >= 2
    for png in written:
        image = matplotlib.image.imread(png)
        assert image.shape[:2] == (495, 880)  # 8 x 4.5 inches at 110 dpi
        assert image[..., :3].std() > 0.05  # something is drawn
