"""Shipped pretraining recipes shrunk to CPU sizes with every setting kept (tests/test_recipes_shrunk.py).

`shrink(recipe)` keeps what selects code paths (distributed optimizer, sequence parallel, virtual
pipeline, recompute, overlap flags, RoPE base and scaling, q/k norm, QKV bias, tied embeddings, GQA vs
MHA, z-loss, precision, schedule style, checkpoint cadence and async saving, data masking flags, the
MoE router and load-balancing settings) and shrinks only sizes: layers, width, heads, sequence, batch,
step counts, experts (4, top-2) and the layout to at most 4 processes (TP, PP, CP, EP capped at 2; DP 2
when the model-parallel group leaves room, so the distributed optimizer really shards). The vocabulary shrinks by training on a small tokenizer the caller gives.

What a CPU cannot run is not swapped here silently: each `CpuSwap` is one override that `kumihimo train
--check` must first refuse, in one line saying why, when the recipe is asked to run on CPU without it.

Recipes whose shrunk configs agree on everything but the values listed in `NOT_SETTINGS` (names, paths,
learning-rate values, init std...) have the same `fingerprint` and share one training run in the tests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kumihimo.core import configtree
from kumihimo.pretrain.config import TrainConfig
from tests.conftest import REPO

RECIPE_DIR = REPO / "configs" / "pretrain"

TRAIN_ITERS = 4
"""Steps of a shrunk run: the resume starts from the checkpoint of step RESUME_FROM."""
RESUME_FROM = 2
SEQ_LENGTH = 64
HEAD_DIM = 16
MAX_PROCESSES = 4

# Harness overrides: where things go and sinks this machine lacks (neither changes what is computed).
HARNESS = (
    "data.mock=true",
    "data.blend=[]",
    "data.blend_file=null",
    "logging.tensorboard_dir=null",  # the tensorboard package is not a kumihimo dependency
    "logging.wandb_mode=disabled",
    "logging.log_interval=1",
    # Keep the step-RESUME_FROM checkpoint the resumed run starts from (pruning is tested elsewhere).
    "checkpoint.keep_last=null",
)

NOT_SETTINGS = (
    "name",
    "output_dir",
    "model.init_method_std",
    "model.rotary_base",  # a number in the RoPE code path every recipe takes (scaling is a setting)
    "model.norm_epsilon",
    "model.z_loss_coeff",  # replaced by whether it is on (see fingerprint)
    "optimizer.lr",
    "optimizer.min_lr",
    "optimizer.adam_beta1",
    "optimizer.adam_beta2",
    "optimizer.adam_eps",
    "optimizer.weight_decay",
    "optimizer.clip_grad",
    "data.split",
    "data.mock_vocab_size",
    "data.tokenizer",
    "checkpoint.dir",
    "checkpoint.keep_multiples_of",
    "logging.wandb_project",
    "runtime.seed",
    "runtime.distributed_timeout_minutes",
    "branch.iteration",
)
"""Values that change numbers but no code path; recipes differing only in these share a run."""


@dataclass(frozen=True)
class CpuSwap:
    """One setting a CPU cannot run, the override the shrunk run uses instead, and the start of the
    one-line refusal `kumihimo train --check` gives without it."""

    override: str
    refusal: str


@dataclass(frozen=True)
class Shrunk:
    recipe: str
    """File stem of the recipe under configs/pretrain."""
    overrides: tuple[str, ...]
    """Sizes, layout, step counts and harness overrides (settings untouched)."""
    cpu_swaps: tuple[CpuSwap, ...]
    nproc: int
    dp: int
    """Data-parallel size of the shrunk layout."""
    needs_pretrained: bool
    """The recipe starts from imported weights (checkpoint.pretrained): the caller supplies a checkpoint."""
    needs_branch_source: bool
    """The recipe branches from another run (branch.source): the caller supplies one."""

    @property
    def path(self) -> Path:
        return RECIPE_DIR / f"{self.recipe}.yaml"

    def all_overrides(self, tokenizer: Path | str) -> list[str]:
        return [*self.overrides, *(s.override for s in self.cpu_swaps), f"data.tokenizer={tokenizer}"]

    def config(self, tokenizer: Path | str = "tok.model") -> TrainConfig:
        return configtree.load(TrainConfig, self.path, self.all_overrides(tokenizer))

    @property
    def fingerprint(self) -> str:
        data = configtree.to_dict(self.config())
        z_loss = data["model"]["z_loss_coeff"] > 0
        for key in NOT_SETTINGS:
            *parents, leaf = key.split(".")
            section = data
            for parent in parents:
                section = section[parent]
            del section[leaf]
        data["model"]["z_loss"] = z_loss
        data["branch"]["source"] = data["branch"]["source"] is not None
        data["checkpoint"]["pretrained"] = data["checkpoint"]["pretrained"] is not None
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _scaled(steps: int | None, train_iters: int, minimum: int) -> int | None:
    """A step count of the recipe as the same fraction of TRAIN_ITERS (at least `minimum` if it was > 0)."""
    if steps is None:
        return None
    if steps == 0:
        return 0
    return max(minimum, round(steps * TRAIN_ITERS / train_iters))


def cpu_swaps(config: TrainConfig) -> tuple[CpuSwap, ...]:
    swaps = []
    if config.model.transformer_impl == "transformer_engine":
        swaps.append(CpuSwap("model.transformer_impl=local", "model.transformer_impl='transformer_engine'"))
    if config.precision.fp8 is not None:
        swaps.append(CpuSwap("precision.fp8=null", f"precision.fp8={config.precision.fp8!r}"))
    if config.model.moe.enabled and config.model.moe.grouped_gemm:
        swaps.append(CpuSwap("model.moe.grouped_gemm=false", "model.moe.grouped_gemm=True"))
    return tuple(swaps)


def _shrunk_experts(config: TrainConfig, hidden: int, tp: int, cp: int, dp: int) -> list[str]:
    """MoE at CPU sizes: 4 experts of the shrunk width, top-2 (top-k > 1 keeps the code path), shared
    expert and dense first layers kept if present, EP and expert TP at most 2 where the layout holds
    them (EP x ETP must divide TP x CP x DP)."""
    moe, par = config.model.moe, config.parallelism
    if not moe.enabled:
        return []
    etp = 1 if par.expert_tensor_parallel_size is not None else tp
    ep = 2 if par.expert_model_parallel_size > 1 and (tp * cp * dp) % (2 * etp) == 0 else 1
    out = [
        "model.moe.num_experts=4",
        f"model.moe.router_topk={min(moe.router_topk, 2)}",
        f"model.moe.ffn_hidden_size={hidden if moe.ffn_hidden_size is not None else 'null'}",
        f"model.moe.shared_expert_ffn_hidden_size={hidden if moe.shared_expert_ffn_hidden_size else 0}",
        f"model.moe.dense_first_layers={min(moe.dense_first_layers, 1)}",
        f"parallelism.expert_model_parallel_size={ep}",
    ]
    if par.expert_tensor_parallel_size is not None:
        out.append("parallelism.expert_tensor_parallel_size=1")
    return out


def shrink(recipe: str) -> Shrunk:
    """The recipe at CPU sizes (see the module docstring)."""
    config = configtree.load(TrainConfig, RECIPE_DIR / f"{recipe}.yaml", ["data.mock=true"])
    model, par, sched, ckpt = config.model, config.parallelism, config.schedule, config.checkpoint
    tp = min(par.tensor_model_parallel_size, 2)
    pp = min(par.pipeline_model_parallel_size, 2)
    cp = min(par.context_parallel_size, 2)
    vpp = par.virtual_pipeline_model_parallel_size
    vpp = None if vpp is None else min(vpp, 2)
    if tp * pp * cp > MAX_PROCESSES:
        pp = 1 if vpp is None else pp  # keep what a setting needs (VPP needs PP > 1)
        assert tp * pp * cp <= MAX_PROCESSES, f"{recipe}: no layout of at most {MAX_PROCESSES} processes"
    dp = 2 if tp * pp * cp * 2 <= MAX_PROCESSES else 1
    per_group = model.num_attention_heads // model.query_groups
    groups = 4 if per_group == 1 else 2  # MHA stays MHA, GQA keeps its heads per group
    heads = groups * per_group
    hidden = heads * HEAD_DIM
    micro = 2  # one size for all: micro-batch 1 vs more selects no code path
    iters = sched.train_iters
    out = [
        f"model.num_layers={max(2, pp * (vpp or 1))}",
        f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={3 * hidden}",
        f"model.num_attention_heads={heads}",
        f"model.num_query_groups={groups}",  # null and the head count both mean MHA
        f"model.kv_channels={HEAD_DIM if model.kv_channels is not None else 'null'}",
        f"model.seq_length={SEQ_LENGTH}",
        f"parallelism.tensor_model_parallel_size={tp}",
        f"parallelism.pipeline_model_parallel_size={pp}",
        f"parallelism.context_parallel_size={cp}",
        f"parallelism.virtual_pipeline_model_parallel_size={vpp if vpp is not None else 'null'}",
        f"schedule.train_iters={TRAIN_ITERS}",
        f"schedule.micro_batch_size={micro}",
        f"schedule.global_batch_size={micro * dp * 2 * pp}",
        f"schedule.lr_warmup_iters={_scaled(sched.lr_warmup_iters, iters, 1)}",
        f"schedule.eval_interval={RESUME_FROM if sched.eval_interval else 0}",
        "schedule.eval_iters=1",
        f"checkpoint.save_interval={RESUME_FROM}",
        "runtime.device=cpu",
        *HARNESS,
    ]
    for key, value in (
        ("model.max_position_embeddings", model.max_position_embeddings),
        (
            "model.rope_scaling.original_max_position_embeddings",
            model.rope_scaling.original_max_position_embeddings,
        ),
    ):
        if value is not None:  # keep their ratio to the training sequence (Llama 3.1: 16 and 1)
            out.append(f"{key}={value * SEQ_LENGTH // model.seq_length}")
    out += _shrunk_experts(config, hidden, tp, cp, dp)
    if sched.lr_decay_iters is not None:
        out.append(f"schedule.lr_decay_iters={_scaled(sched.lr_decay_iters, iters, 2)}")
    if sched.lr_wsd_decay_iters is not None:
        out.append(f"schedule.lr_wsd_decay_iters={_scaled(sched.lr_wsd_decay_iters, iters, 1)}")
    return Shrunk(
        recipe=recipe,
        overrides=tuple(out),
        cpu_swaps=cpu_swaps(config),
        nproc=tp * pp * cp * dp,
        dp=dp,
        needs_pretrained=ckpt.pretrained is not None,
        needs_branch_source=config.branch.source is not None,
    )


def groups() -> dict[str, list[Shrunk]]:
    """Shrunk recipes by fingerprint, each group's recipes sorted by name (the first one is run)."""
    found: dict[str, list[Shrunk]] = {}
    for name in recipe_names():
        shrunk = shrink(name)
        found.setdefault(shrunk.fingerprint, []).append(shrunk)
    return found
