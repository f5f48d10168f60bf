"""The parallel layout of a run, checked before any process group exists.

`ParallelLayout.from_config(config, world_size)` derives the data-parallel size and checks every
divisibility rule Megatron-Core would otherwise trip over deep inside model construction, each with
a message naming the keys, the values and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from kumihimo.core.configtree import ConfigError
from kumihimo.pretrain.config import ParallelismConfig, TrainConfig, check_model_fits_layout


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary so every TP rank holds an equal slice (LLM-jp: 128 x TP). The one
    place this rule lives: training, `plan` and `convert from-hf` all call it."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_experts_fit_world(par: ParallelismConfig, world_size: int, dp: int) -> None:
    """Megatron carves the expert groups (ETP x EP) out of the ranks of one pipeline stage, like the
    dense TP x CP x DP groups: EP x ETP must divide TP x CP x DP. With ETP = TP and CP = 1 (the usual
    layout) that is: EP divides the data-parallel size."""
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
        check_model_fits_layout(config.model, config.parallelism)
        check_experts_fit_world(config.parallelism, world_size, dp)
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
