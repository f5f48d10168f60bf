"""The parallel layout of a run, checked before any process group exists.

`ParallelLayout.from_config(config, world_size)` derives the data-parallel size and checks every
divisibility rule Megatron-Core would otherwise trip over deep inside model construction, each with
a message naming the keys, the values and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kumihimo.core.configtree import ConfigError

if TYPE_CHECKING:
    from kumihimo.pretrain.config import TrainConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary so every TP rank holds an equal slice (LLM-jp: 128 x TP). The one
    place this rule lives: training, `plan` and `convert from-hf` all call it."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_model_fits_layout(config: TrainConfig) -> None:
    """Rules between the model shape and TP/PP/VPP that hold whatever the world size."""
    model, par = config.model, config.parallelism
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    vpp = par.virtual_pipeline_model_parallel_size or 1
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"parallelism.tensor_model_parallel_size={tp} does not divide model.num_attention_heads="
            f"{model.num_attention_heads}; choose a TP that divides the head count"
        )
    groups = model.query_groups
    if groups % tp and tp % groups:
        raise ConfigError(
            f"parallelism.tensor_model_parallel_size={tp} and model.num_query_groups={groups} must divide "
            "one another; choose a TP that divides the number of query groups (or a multiple of it)"
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(
            f"parallelism.tensor_model_parallel_size={tp} does not divide model.ffn_hidden_size="
            f"{model.ffn_hidden_size}; choose an FFN size that is a multiple of TP"
        )
    if model.num_layers % (pp * vpp):
        raise ConfigError(
            f"model.num_layers={model.num_layers} is not divisible by pipeline_model_parallel_size x "
            f"virtual_pipeline_model_parallel_size = {pp} x {vpp}; choose a layer count that is a multiple of "
            f"{pp * vpp} or change PP/VPP"
        )
    check_experts_fit_layout(config)
    seq = model.seq_length
    cp = par.context_parallel_size
    if cp > 1 and seq % (2 * cp):
        raise ConfigError(
            f"model.seq_length={seq} is not divisible by 2 x context_parallel_size={cp}; "
            f"choose a multiple of {2 * cp}"
        )
    if par.sequence_parallel and (seq // cp) % tp:
        raise ConfigError(
            f"model.seq_length={seq} / CP={cp} is not divisible by TP={tp} as sequence parallel "
            "needs; change the sequence length or TP"
        )


def check_experts_fit_layout(config: TrainConfig) -> None:
    """Rules between the mixture of experts (model.moe) and EP/ETP/TP that hold whatever the world size."""
    moe, par = config.model.moe, config.parallelism
    ep, etp, tp = par.expert_model_parallel_size, par.expert_tp, par.tensor_model_parallel_size
    if par.expert_tensor_parallel_size is not None and par.expert_tensor_parallel_size < 1:
        raise ConfigError(
            f"parallelism.expert_tensor_parallel_size={par.expert_tensor_parallel_size} must be >= 1; "
            "set a size or null (= tensor_model_parallel_size)"
        )
    if not moe.enabled:
        if ep > 1 or par.expert_tensor_parallel_size not in (None, tp):
            raise ConfigError(
                f"parallelism.expert_model_parallel_size={ep} / expert_tensor_parallel_size="
                f"{par.expert_tensor_parallel_size} need experts, but model.moe.num_experts=0; set "
                "model.moe.num_experts or leave EP at 1 and ETP null"
            )
        return
    if moe.num_experts % ep:
        raise ConfigError(
            f"parallelism.expert_model_parallel_size={ep} does not divide model.moe.num_experts="
            f"{moe.num_experts}; choose an EP that divides the number of experts"
        )
    expert_ffn = moe.expert_ffn_hidden_size(config.model.ffn_hidden_size)
    if expert_ffn % etp:
        raise ConfigError(
            f"model.moe.ffn_hidden_size={expert_ffn} is not divisible by the expert tensor-parallel size "
            f"{etp}; choose a multiple of {etp} or change parallelism.expert_tensor_parallel_size"
        )
    if moe.shared_expert_ffn_hidden_size % tp:
        raise ConfigError(
            f"model.moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} is not "
            f"divisible by tensor_model_parallel_size={tp}; choose a multiple of {tp}"
        )


def check_experts_fit_world(config: TrainConfig, world_size: int, dp: int) -> None:
    """Megatron carves the expert groups (ETP x EP) out of the ranks of one pipeline stage, like the
    dense TP x CP x DP groups: EP x ETP must divide TP x CP x DP. With ETP = TP and CP = 1 (the usual
    layout) that is: EP divides the data-parallel size."""
    par = config.parallelism
    ep, etp, pp = par.expert_model_parallel_size, par.expert_tp, par.pipeline_model_parallel_size
    if ep == 1 and etp == par.tensor_model_parallel_size:
        return
    per_stage = world_size // pp
    if per_stage % (ep * etp):
        tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
        raise ConfigError(
            f"parallelism.expert_model_parallel_size={ep} x expert_tensor_parallel_size={etp} does not "
            f"divide TP x CP x DP = {tp} x {cp} x {dp} = {per_stage} (the ranks of one pipeline stage); "
            f"choose an EP that divides the data-parallel size {dp} (x TP x CP / ETP), or launch more processes"
        )


@dataclass(frozen=True)
class ParallelLayout:
    """TP x PP x CP x DP = world size, with the batch split that follows."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int | None
    micro_batch_size: int
    global_batch_size: int
    ep: int = 1
    """Expert parallel size (1 for a dense model)."""
    etp: int | None = None
    """Expert tensor-parallel size; None: TP."""

    @property
    def expert_dp(self) -> int:
        """Data-parallel replicas of each expert (Megatron's expert data-parallel size)."""
        return self.world_size // (self.pp * self.ep * (self.etp or self.tp))

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @classmethod
    def from_config(cls, config: TrainConfig, world_size: int) -> ParallelLayout:
        par, sched = config.parallelism, config.schedule
        tp, pp, cp = (
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            par.context_parallel_size,
        )
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = "
                f"{model_parallel}; launch a multiple of {model_parallel} processes or change the layout"
            )
        dp = world_size // model_parallel
        per_step = sched.micro_batch_size * dp
        if sched.global_batch_size % per_step:
            raise ConfigError(
                f"schedule.global_batch_size={sched.global_batch_size} is not divisible by "
                f"micro_batch_size x DP = {sched.micro_batch_size} x {dp} = {per_step}; choose a multiple "
                f"of {per_step}"
            )
        vpp = par.virtual_pipeline_model_parallel_size
        if vpp and vpp > 1 and (sched.global_batch_size // per_step) % pp:
            raise ConfigError(
                f"interleaved pipelining needs the number of micro-batches per step "
                f"({sched.global_batch_size // per_step}) to be a multiple of PP={pp}; change "
                "schedule.global_batch_size"
            )
        check_model_fits_layout(config)
        check_experts_fit_world(config, world_size, dp)
        return cls(
            world_size=world_size,
            tp=tp,
            pp=pp,
            cp=cp,
            dp=dp,
            vpp=vpp if vpp and vpp > 1 else None,
            micro_batch_size=sched.micro_batch_size,
            global_batch_size=sched.global_batch_size,
            ep=par.expert_model_parallel_size,
            etp=par.expert_tp,
        )

    def padded_vocab_size(self, vocab_size: int, divisible_by: int) -> int:
        return padded_vocab_size(vocab_size, divisible_by, self.tp)

    def describe(self) -> str:
        vpp = f" VPP={self.vpp}" if self.vpp else ""
        experts = (
            f" EP={self.ep} ETP={self.etp or self.tp}"
            if self.ep > 1 or (self.etp or self.tp) != self.tp
            else ""
        )
        return (
            f"world={self.world_size}: TP={self.tp} PP={self.pp}{vpp} CP={self.cp} DP={self.dp}{experts}; "
            f"micro-batch {self.micro_batch_size}, global batch {self.global_batch_size} "
            f"({self.num_microbatches} micro-batches per step per DP rank)"
        )
