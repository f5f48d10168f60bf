"""Per-token losses: cross entropy over the (tensor-parallel) vocabulary, optionally with z-loss.

z-loss (PaLM; LLM-jp-3 used 1e-4) adds coeff * logZ^2 per token, where logZ = logsumexp of the logits,
keeping the softmax normaliser near 1 and large-model training stable. With tensor parallelism each
rank holds a vocabulary slice, so logZ = m + log(sum over ranks of sum(exp(x - m))) with m the global
max; the sum across ranks is Megatron's differentiable all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def cross_entropy_and_z(logits: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float):
    """(cross entropy, z-loss term), each per token, from this rank's vocabulary slice of the logits."""
    logits = logits.float()
    z_term = torch.zeros_like(labels, dtype=torch.float32)
    if z_loss_coeff:
        # Computed before the cross entropy, which shifts `logits` in place.
        global_max = logits.detach().max(dim=-1).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(
                global_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
            )
        sum_exp = torch.exp(logits - global_max.unsqueeze(-1)).sum(dim=-1)
        log_z = global_max + torch.log(reduce_from_tensor_model_parallel_region(sum_exp))
        z_term = z_loss_coeff * log_z.square()
    cross_entropy = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    return cross_entropy, z_term
