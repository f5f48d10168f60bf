"""GPU checks: skipped without a CUDA device (run them on the GPU machine).

Tiny recipe on one GPU in bf16 with the local layer spec and SDPA attention (the no-TE path): the loss
falls, TFLOP/s and memory are reported, and FP8 without Transformer Engine is refused clearly.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_cli

pytestmark = pytest.mark.gpu

TINY = "configs/pretrain/tiny-cpu.yaml"
GPU = (
    "runtime.device=cuda",
    "precision.params_dtype=bf16",
    "schedule.train_iters=30",
    "schedule.eval_interval=0",
    "schedule.lr_warmup_iters=3",
)


def test_tiny_recipe_trains_on_one_gpu_in_bf16(tmp_path):
    proc = run_cli("train", TINY, *GPU, f"output_dir={tmp_path}", f"checkpoint.dir={tmp_path}/ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert metrics[-1]["tflops_per_gpu"] > 0 and metrics[-1]["mem_gb"] > 0


def test_fp8_without_transformer_engine_is_refused(tmp_path):
    from kumihimo.pretrain.model import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed here")
    proc = run_cli(
        "train",
        TINY,
        *GPU,
        "precision.fp8=hybrid",
        "model.transformer_impl=auto",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 2
    assert "precision.fp8 needs Transformer Engine" in proc.stderr
