"""The parallel layout of a run, checked before any process group exists.

`ParallelLayout.from_config(config, world_size)` derives the data-parallel size and checks every
divisibility rule Megatron-Core would otherwise trip over deep inside model construction, each with
a message naming the keys, the values and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from kumihimo.core.configtree import ConfigError
from kumihimo.pretrain.config import TrainConfig, check_model_fits_layout


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary so every TP rank holds an equal slice (LLM-jp: 128 x TP). The one
    place this rule lives: training, `plan` and `convert from-hf` all call it."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


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
        return cls(
            world_size=world_size,
            tp=tp,
            pp=pp,
            cp=cp,
            dp=dp,
            vpp=vpp if vpp and vpp > 1 else None,
            micro_batch_size=sched.micro_batch_size,
            global_batch_size=sched.global_batch_size,
        )

    def padded_vocab_size(self, vocab_size: int, divisible_by: int) -> int:
        return padded_vocab_size(vocab_size, divisible_by, self.tp)

    def describe(self) -> str:
        vpp = f" VPP={self.vpp}" if self.vpp else ""
        return (
            f"world={self.world_size}: TP={self.tp} PP={self.pp}{vpp} CP={self.cp} DP={self.dp}; "
            f"micro-batch {self.micro_batch_size}, global batch {self.global_batch_size} "
            f"({self.num_microbatches} micro-batches per step per DP rank)"
        )
