"""Mixture of experts on Megatron-Core: what `model.moe` turns into, and the router's statistics.

Three things live here, each taking the model section (and the parallelism section where the layout
matters), so `pretrain.model` stays about the dense decoder:

* `transformer_fields(model, parallelism)`: the `moe_*` fields of Megatron's TransformerConfig;
* `model.moe_layer_flags` / `decoder_layer_specs(...)`: which layers get an MoELayer (the first
  `dense_first_layers` keep the dense SwiGLU) and the spec of each layer this pipeline stage builds;
* `RouterStatistics`: tokens routed to each expert, the load-balancing loss and the router z-loss of a
  training step, reduced over the ranks that saw different tokens, for the metrics sinks.

Experts are Megatron's SequentialMLP (one SwiGLU per local expert) unless `grouped_gemm` asks for
Transformer Engine's grouped GEMM. Their checkpoint keys carry the global expert index as a leading
axis, so initialisation (seeded by key and global offsets in `pretrain.model`) gives every expert the
same weights at any EP/ETP, and checkpoints reload at another EP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from kumihimo.pretrain.config import ModelConfig, ParallelismConfig


def transformer_fields(model: ModelConfig, parallelism: ParallelismConfig) -> dict[str, Any]:
    """Megatron TransformerConfig fields of `model.moe` and the expert layout ({} for a dense model)."""
    moe = model.moe
    if not moe.enabled:
        return {}
    return {
        "num_moe_experts": moe.num_experts,
        # Megatron-LM's default int 1 (every layer MoE) keeps per-layer tensors stacked under one key
        # ([L, ...], as a dense model's and LLM-jp v4's checkpoints); a list (dense first layers)
        # makes Megatron save them per layer (decoder.layers.<i>.*)
        "moe_layer_freq": 1 if not moe.dense_first_layers else [int(f) for f in model.moe_layer_flags],
        "moe_ffn_hidden_size": moe.expert_ffn_hidden_size(model.ffn_hidden_size),
        "moe_shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size or None,
        "moe_shared_expert_gate": moe.shared_expert_gate,
        "moe_router_topk": moe.router_topk,
        "moe_router_pre_softmax": moe.router_pre_softmax,
        "moe_router_dtype": moe.router_dtype,
        "moe_router_load_balancing_type": moe.load_balancing,
        "moe_aux_loss_coeff": moe.aux_loss_coeff,
        "moe_z_loss_coeff": moe.z_loss_coeff or None,
        "moe_expert_capacity_factor": moe.capacity_factor,
        "moe_pad_expert_input_to_capacity": moe.pad_to_capacity,
        "moe_token_drop_policy": moe.token_drop_policy,
        "moe_token_dispatcher_type": moe.token_dispatcher,
        "moe_grouped_gemm": moe.grouped_gemm,
        "expert_model_parallel_size": parallelism.expert_model_parallel_size,
        "expert_tensor_parallel_size": parallelism.expert_tp,
    }


def decoder_layer_specs(
    model: ModelConfig, layer_spec: Callable[[int | None], Any], first_layer: int, num_layers: int
) -> list:
    """The specs of layers [first_layer, first_layer + num_layers) of the whole model: `layer_spec(None)`
    for a dense layer, `layer_spec(num_experts)` for an MoE layer (each built once)."""
    flags = model.moe_layer_flags[first_layer : first_layer + num_layers]
    dense = layer_spec(None) if not all(flags) else None
    sparse = layer_spec(model.moe.num_experts) if any(flags) else None
    return [sparse if flag else dense for flag in flags]


def routers(chunks) -> list:
    """Every TopKRouter in these model chunks, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [module for chunk in chunks for module in chunk.modules() if isinstance(module, TopKRouter)]


class RouterStatistics:
    """Load-balance figures of each training step, for the console, metrics.jsonl, TensorBoard and W&B.

    A forward hook on every router adds up its routing map (tokens x experts, True where a token goes)
    into tokens-per-expert counts per layer; Megatron's MoE metrics tracker holds the load-balancing
    loss and z-loss its routers record (each divided by its coefficient, so the figures are the raw
    losses). `step_values()` reduces both over the ranks that routed different tokens and clears them.

    Counts are of routed (token, expert) pairs over the whole global batch, after capacity dropping.
    Evaluation passes (no gradient) are not counted, as Megatron does not record their losses either.
    """

    def __init__(self, model: ModelConfig, chunks, sequence_parallel: bool):
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        self.tracker = get_moe_metrics_tracker()
        self.num_layers = model.num_layers
        self.moe_layer_freq = [int(flag) for flag in model.moe_layer_flags]
        self.num_experts = model.moe.num_experts
        self.sequence_parallel = sequence_parallel
        self.counts: torch.Tensor | None = None
        self._hooks = []
        for router in routers(chunks):
            self._hooks.append(router.register_forward_hook(self._count))
            if self.counts is None:
                self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)

    def _count(self, router, _args, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        _probs, routing_map = output
        self.counts[router.layer_number - 1] += routing_map.sum(dim=0).to("cpu", torch.float64)

    def step_values(self, num_microbatches: int) -> dict[str, Any]:
        """This step's figures (the same on every rank; call on every rank once per step)."""
        from megatron.core import parallel_state

        if self.counts is None:  # a pipeline stage without MoE layers still joins the reductions
            counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        else:
            counts = self.counts.clone()
            self.counts.zero_()
        # every layer's router runs on one pipeline stage; DP x CP ranks saw different tokens, and the
        # TP ranks too when the sequence is split over them (else they hold copies of the same count)
        for group in (
            parallel_state.get_pipeline_model_parallel_group(),
            parallel_state.get_data_parallel_group(with_context_parallel=True),
            parallel_state.get_tensor_model_parallel_group() if self.sequence_parallel else None,
        ):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(counts, group=group)
        # the tracker's values are sums over micro-batches; report() divides by their number
        losses = {}
        for name in ("load_balancing_loss", "seq_load_balancing_loss", "z_loss"):
            self.tracker.ensure_initialized(name, self.num_layers, device="cpu")
        self.tracker._sync_metrics(list(self.tracker.metrics))
        for name, entry in self.tracker.metrics.items():
            moe_values = entry.values.detach().to("cpu", torch.float64)[: self.num_layers]
            losses[name] = float(moe_values.sum()) / num_microbatches / max(1, sum(self.moe_layer_freq))
        self.tracker.clear()
        moe_rows = counts[torch.tensor(self.moe_layer_freq, dtype=torch.bool)]
        mean = moe_rows.sum(dim=1, keepdim=True) / self.num_experts
        mean = mean.squeeze(1).clamp(min=1e-9)
        max_load = (moe_rows.max(dim=1).values / mean).tolist()
        min_load = (moe_rows.min(dim=1).values / mean).tolist()
        values: dict[str, Any] = {
            "moe_aux_loss": losses.get("load_balancing_loss", 0.0)
            + losses.get("seq_load_balancing_loss", 0.0),
            "moe_z_loss": losses.get("z_loss", 0.0),
            "moe_max_load": max(max_load) if max_load else 0.0,
            "moe_min_load": min(min_load) if min_load else 0.0,
            "moe_tokens_per_expert": [[int(c) for c in row] for row in moe_rows.tolist()],
        }
        return values

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
