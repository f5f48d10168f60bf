"""Per-step metrics: the FLOP count behind TFLOP/s and MFU, and the sinks they go to.

Model FLOPs per trained token (no recompute counted; causal attention counted at full cost, as
Megatron-LM and the PaLM paper do, so figures are comparable with theirs):

    forward = L * [ 2*h*(q + 2*kv)        QKV projections   (q = heads*head_dim, kv = groups*head_dim)
                  + 2*q*h                 output projection
                  + 3 * 2*h*f             SwiGLU: gate, up, down (an MoE layer: 2*h*E for the router
                                          + 3 * 2*h*(k*f_e + f_s) for k experts and the shared one)
                  + 2 * 2*s*q ]           scores QK^T and context AV
              + 2*h*V                     logits (V = padded vocabulary)
    training = 3 * forward                backward costs twice the forward

TFLOP/s per GPU = training FLOPs per token x tokens per second / number of GPUs; MFU divides that by
`logging.peak_tflops`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kumihimo.core import configtree
from kumihimo.core.logs import stage_logger
from kumihimo.pretrain.config import ModelConfig, TrainConfig

log = stage_logger(None)


def training_flops_per_token(m: ModelConfig, padded_vocab_size: int) -> float:
    h, f, s = m.hidden_size, m.ffn_hidden_size, m.seq_length
    q = m.num_attention_heads * m.head_dim
    kv = m.query_groups * m.head_dim
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * s * q
    moe = m.moe
    # an MoE layer: the router, top-k experts' SwiGLUs and the shared expert (active parameters only)
    sparse = 2 * h * moe.num_experts + 3 * 2 * h * (
        moe.router_topk * moe.expert_ffn_hidden_size(f) + moe.shared_expert_ffn_hidden_size
    )
    mlp = sum(sparse if flag else 3 * 2 * h * f for flag in m.moe_layer_flags)
    forward = m.num_layers * attention + mlp + 2 * h * padded_vocab_size
    return 3.0 * forward


class MetricsSink:
    """Writes each step's metrics to the console, metrics.jsonl, TensorBoard and W&B (rank 0 only)."""

    def __init__(self, config: TrainConfig, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.interval = max(1, config.logging.log_interval)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        # TensorBoard and W&B are optional: imported only when the config asks for them
        if config.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(config.logging.tensorboard_dir)
        if config.logging.wandb_project and config.logging.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=config.logging.wandb_project,
                name=config.name,
                mode=config.logging.wandb_mode,
                dir=str(output_dir),
                config=configtree.to_dict(config),
            )

    def log(self, step: int, values: dict[str, Any], force: bool = False) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {
            k: v
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self.prints(step, force):
            log.info(format_line(step, values))

    def prints(self, step: int, force: bool = False) -> bool:
        """Whether step `step`'s metrics line goes to the console (every `logging.log_interval` steps)."""
        return force or step % self.interval == 0

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class StepTimer:
    """Seconds per training step. On a GPU the kernels of a step are still queued when the Python code
    of the step returns, so a step's time is exact only after `torch.cuda.synchronize()`, which stalls
    the launch of the next step. The timer therefore synchronizes only for the steps whose time is
    reported and gives their time as the mean over the steps since the previous reported one. Without a
    `synchronize` (CPU, where work is done when the call returns) every step is timed on its own."""

    def __init__(self, synchronize: Callable[[], None] | None):
        self.synchronize = synchronize
        self._unreported_s = 0.0
        self._unreported_steps = 0

    def stop(self, started: float, reported: bool) -> float | None:
        """The step that began at `started` (time.perf_counter()) has been launched: its seconds (the mean
        since the last reported step), or None for an unreported GPU step, whose time is carried on."""
        if self.synchronize is None:
            return time.perf_counter() - started
        if not reported:
            self._unreported_s += time.perf_counter() - started
            self._unreported_steps += 1
            return None
        self.synchronize()
        total = self._unreported_s + time.perf_counter() - started
        steps = self._unreported_steps + 1
        self._unreported_s, self._unreported_steps = 0.0, 0
        return total / steps


def format_line(step: int, values: dict[str, Any]) -> str:
    parts = [f"step {step}"]
    formats = {
        "loss": "loss {:.4f}",
        "val_loss": "val_loss {:.4f}",
        "lr": "lr {:.3e}",
        "grad_norm": "grad_norm {:.3f}",
        "moe_aux_loss": "aux {:.4f}",
        "moe_z_loss": "router_z {:.4f}",
        "moe_max_load": "busiest expert {:.2f}x mean",
        "tokens_per_s": "{:,.0f} tok/s",
        "tflops_per_gpu": "{:.1f} TFLOP/s/GPU",
        "mfu": "MFU {:.1%}",
        "step_time_s": "{:.3f} s/step",
        "mem_gb": "mem {:.1f} GB",
    }
    for key, fmt in formats.items():
        if key in values and values[key] is not None:
            parts.append(fmt.format(values[key]))
    return " | ".join(parts)
