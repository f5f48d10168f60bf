"""benchmarks/gpu_check.py's CPU parts: argument handling, the runs it plans (valid recipes that fit the
GPU they are meant for, by `kumihimo plan`), and the Markdown it writes. The measuring itself needs a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

from kumihimo.core import configtree  # noqa: E402
from kumihimo.pretrain.config import TrainConfig  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layers", "0"], "--layers=0"),
        (["--steps", "3"], "--steps=3 must exceed the 3 warm-up steps"),
        (["--smoke-steps", "0"], "--smoke-steps=0"),
        (["--peak-tflops", "0"], "--peak-tflops=0"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_planned_runs_are_valid_recipes_and_fit_their_gpu_by_the_plan():
    args = gpu_check.parse_args([])
    for gpu_gb in (80.0, 141.0):
        layers = gpu_check.default_layers(gpu_gb)
        runs = gpu_check.planned_runs(args, layers)
        assert [run.needs_te for run in runs] == [False, False, False, True]
        for run in runs:
            config = configtree.load(TrainConfig, gpu_check.REPO / run.recipe, list(run.overrides))
            _flops, planned_gb = gpu_check.flops_per_step(run.recipe, run.overrides)
            assert planned_gb + 6 < gpu_gb, (run.name, layers, planned_gb)
            if run.name != "smoke recipe":
                assert config.model.num_layers == layers and config.model.hidden_size == 12288
        off = next(run for run in runs if "fusions off" in run.name)
        config = configtree.load(TrainConfig, gpu_check.REPO / off.recipe, list(off.overrides))
        assert not any(getattr(config.fusions, key) for key in gpu_check.FUSION_KEYS)
    assert gpu_check.default_layers(80.0) == 1 and gpu_check.default_layers(141.0) == 2


def test_results_are_written_as_benchmark_tables():
    header = dict(
        date="2026-12-06 05:00 UTC",
        device="NVIDIA H100",
        memory_gb=79.6,
        torch="2.14.1",
        megatron="0.19.2",
        te=None,
    )
    smoke = gpu_check.Outcome(
        "smoke recipe",
        ms_per_step=250.0,
        tflops=400.0,
        planned_gb=10.0,
        measured_gb=9.0,
        fusions="on: bias_activation_fusion",
        extra=dict(first_loss=10.4, last_loss=6.2, steps=300, wall_s=120.0),
    )
    rows = [
        gpu_check.Outcome(
            "kumihimo BF16, fusions on", ms_per_step=100.0, tflops=494.5, planned_gb=48.0, measured_gb=50.4
        ),
        gpu_check.Outcome(
            "kumihimo FP8 hybrid (delayed), fusions on", note="skipped: Transformer Engine is not installed"
        ),
    ]
    text = gpu_check.format_results(header, smoke, rows, 1, 989.0)
    assert (
        "measured 2026-12-06 05:00 UTC on NVIDIA H100 (80 GB)" in text
        and "Transformer Engine not installed" in text
    )
    assert "| 10.400 | 6.200 | 250.0 ms | 400.0 | 40.4% | 120 s |  |" in text
    assert "| kumihimo BF16, fusions on | 100.0 | 494.5 | 50.0% |  |" in text
    assert (
        "| kumihimo FP8 hybrid (delayed), fusions on | - | - | - | skipped: Transformer Engine is not installed |"
        in text
    )
    assert "| kumihimo BF16, fusions on | 48.0 | 50.4 | 1.05 |" in text
    assert "- smoke recipe: on: bias_activation_fusion" in text


def test_dry_run_lists_the_runs_and_a_cpu_machine_is_told_it_needs_a_gpu(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fusions.apply_rope_fusion=false" in out and "precision.fp8=hybrid" in out
    import torch

    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
