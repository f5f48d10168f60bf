"""The optimizer, its learning-rate schedule and the gradient reduction, each built from its own config
sections: Megatron-Core's OptimizerConfig from `optimizer` (and the precision and parallel settings it
needs), the OptimizerParamScheduler from `optimizer` and `schedule`, the DistributedDataParallelConfig
from `precision` and `parallelism`. The trainer builds them in setup; `integrity` replays the schedule to
compare learning rates across a resume.

Megatron-Core is imported inside the builders: `integrity` imports this module, and the start-up checks
of `kumihimo train` and `kumihimo doctor` (`pretrain.preflight`) import `integrity` without loading it
(any Megatron import prints torch's CUDA warnings, which would break their one-line errors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kumihimo.pretrain.config import OptimizerConfig as OptimizerSection
from kumihimo.pretrain.config import ParallelismConfig, PrecisionConfig, ScheduleConfig

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_scheduler(opt: OptimizerSection, sched: ScheduleConfig, optimizer) -> OptimizerParamScheduler:
    """The learning-rate (and weight-decay) schedule of `sched` from `opt`'s rates, at step 0."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = sched.decay_iters
    wsd = sched.lr_decay_style == "WSD"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=sched.lr_warmup_iters,
        lr_decay_steps=decay_iters,
        lr_decay_style=sched.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        wsd_decay_steps=sched.wsd_decay_iters if wsd else None,
        lr_wsd_decay_style=sched.lr_wsd_decay_style if wsd else None,
    )


def build_ddp_config(
    precision: PrecisionConfig, parallelism: ParallelismConfig
) -> DistributedDataParallelConfig:
    """Megatron's DDP settings of this run (benchmarks/check_megatron_args.py compares them with
    Megatron-LM's own for the same published arguments)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=parallelism.overlap_grad_reduce,
        overlap_param_gather=parallelism.overlap_param_gather,
        use_distributed_optimizer=parallelism.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # LossGuard judges the loss and skips or stops (resilience.*)
    )


def build_optimizer_config(
    opt: OptimizerSection, precision: PrecisionConfig, parallelism: ParallelismConfig
) -> OptimizerConfig:
    """Megatron's optimizer settings of this run (AdamW; fp32 main weights for bf16)."""
    from megatron.core.optimizer import OptimizerConfig

    dtype = torch.bfloat16 if precision.params_dtype == "bf16" else torch.float32  # model.DTYPES
    return OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=parallelism.use_distributed_optimizer,
        overlap_param_gather=parallelism.overlap_param_gather,  # as Megatron-LM copies it
    )
