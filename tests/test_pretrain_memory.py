"""`kumihimo plan`'s memory figures against what real runs hold.

Each case trains one step of the tiny recipe (the real CLI, gloo) and reads memory_per_rank.json,
which the trainer measures tensor by tensor (pretrain/memory.py): weights, gradient buffers and
optimizer states must equal the plan's bytes per parameter, and the activations autograd keeps for
one micro-batch must equal the plan's local-layer formula.
"""

from __future__ import annotations

import json

import pytest

from kumihimo.core import configtree
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.parallel import ParallelLayout
from kumihimo.pretrain.plan import ActivationSizes, make_plan, microbatch_activation_bytes, stage_params
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # measured training runs per layout

TINY = "configs/pretrain/tiny-cpu.yaml"
ONE_STEP = ("schedule.lr_warmup_iters=0", "schedule.eval_interval=0", "schedule.train_iters=1")

LAYOUTS = {
    "recompute": (1, ["model.recompute=full"], 0.01),
    "selective": (1, ["model.recompute=selective"], 0.01),
    "selective-mlp": (1, ["model.recompute=selective", "model.recompute_modules=[core_attn,mlp]"], 0.01),
    "tp2-sp": (2, ["parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true"], 0.01),
    "pp2-vpp2": (
        2,
        ["parallelism.pipeline_model_parallel_size=2", "parallelism.virtual_pipeline_model_parallel_size=2"],
        0.01,
    ),
    "dp2-distopt": (2, ["parallelism.use_distributed_optimizer=true"], 0.01),
    # the gathered keys/values of local context parallelism are an estimate in the plan
    "cp2": (2, ["parallelism.context_parallel_size=2"], 0.05),
}


TINY_MOE = "configs/pretrain/tiny-moe-cpu.yaml"
MOE_LAYOUTS = {
    # a dense first layer, a gated shared expert, router z-loss and aux loss, q/k norm: every term
    "moe": (
        1,
        [
            "model.moe.dense_first_layers=1",
            "model.moe.shared_expert_ffn_hidden_size=32",
            "model.moe.shared_expert_gate=true",
        ],
        0.0005,
    ),
    # experts split over EP: their weights halve, and their optimizer states are sharded over expert DP
    # (1 here) while the dense states are sharded over DP=2; routed rows differ per rank, their mean
    # is the plan's balanced figure
    "moe-ep2-distopt": (
        2,
        ["parallelism.expert_model_parallel_size=2", "parallelism.use_distributed_optimizer=true"],
        0.0005,
    ),
}


@pytest.mark.parametrize("name", [*LAYOUTS, *MOE_LAYOUTS])
def test_plan_memory_matches_a_measured_run(tmp_path, name):
    recipe = TINY_MOE if name in MOE_LAYOUTS else TINY
    nproc, overrides, activation_tolerance = {**LAYOUTS, **MOE_LAYOUTS}[name]
    args = ["train", recipe, *ONE_STEP, *overrides, f"output_dir={tmp_path}", "checkpoint.enabled=false"]
    proc = run_cli(*args, *(["--nproc-per-node", str(nproc)] if nproc > 1 else []), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "memory_per_rank.json").read_text())
    assert len(rows) == nproc

    config = configtree.load(TrainConfig, recipe, overrides)
    layout = ParallelLayout.from_config(config, nproc)
    padded = layout.padded_vocab_size(config.data.mock_vocab_size, config.model.make_vocab_size_divisible_by)
    plan = make_plan(config, nproc, config.data.mock_vocab_size)
    bytes_per_param = {
        "weights_bytes": plan.weights_gb,
        "grads_bytes": plan.grads_gb,
        "optimizer_bytes": plan.optimizer_gb,
    }
    for row in rows:
        params = stage_params(config.model, layout, padded, row["pp_rank"])
        for key, planned_gb in bytes_per_param.items():
            planned = planned_gb * 1e9 / plan.params_per_gpu * params
            # DP shards of the distributed optimizer differ by their bucket padding
            assert row[key] == pytest.approx(planned, rel=0.002), (key, row)
    for stage in {row["pp_rank"] for row in rows}:
        # MoE: each rank's experts take the rows routed to them; the plan predicts the balanced mean
        measured = [row["activation_bytes_per_microbatch"] for row in rows if row["pp_rank"] == stage]
        planned = microbatch_activation_bytes(config.model, layout, padded, stage, ActivationSizes.of(config))
        if name not in MOE_LAYOUTS:
            assert measured == pytest.approx([planned] * len(measured), rel=activation_tolerance), rows
        assert sum(measured) / len(measured) == pytest.approx(planned, rel=activation_tolerance), rows
