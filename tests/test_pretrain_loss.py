"""The z-loss term against a plain-torch reference (one process; TP=2 is covered by the distributed
tests, which train with z-loss and compare TP=2 / PP=2 with one process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture
def single_process_groups():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kumihimo.pretrain.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_cross_entropy_and_z_match_reference(single_process_groups):
    from kumihimo.pretrain.loss import cross_entropy_and_z

    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 11) * 3).requires_grad_()
    labels = torch.randint(0, 11, (2, 5))
    ce, z = cross_entropy_and_z(logits.clone(), labels, 1e-2)
    ref_ce = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none").reshape(2, 5)
    ref_z = 1e-2 * torch.logsumexp(logits, dim=-1).square()
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(z, ref_z)
    # Gradients flow through both terms like the reference.
    (ce.sum() + z.sum()).backward()
    grad = logits.grad.clone()
    logits.grad = None
    (ref_ce.sum() + ref_z.sum()).backward()
    torch.testing.assert_close(grad, logits.grad)


def test_zero_coefficient_adds_nothing(single_process_groups):
    from kumihimo.pretrain.loss import cross_entropy_and_z

    _, z = cross_entropy_and_z(torch.randn(3, 7), torch.randint(0, 7, (3,)), 0.0)
    assert torch.count_nonzero(z) == 0
