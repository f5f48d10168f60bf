"""What one rank really holds, measured on the first step, to check `kumihimo plan` against.

* weights, gradients, optimizer states: the bytes of the tensors themselves (model parameters; DDP's
  gradient buffers, padding included; the optimizer's fp32 master weights and Adam moments), each
  storage counted once. These are exact on any device.
* activations: the bytes autograd keeps for the backward pass of one micro-batch, recorded with
  `torch.autograd.graph.saved_tensors_hooks` around the model's forward (each storage counted once,
  parameters excluded). This is what the plan's per-micro-batch activation estimate predicts, and it
  is device-independent, so a CPU run checks the formula too.
* on a GPU also `torch.cuda.max_memory_allocated` after the step: the total the plan's sum
  (plus its reserve) should cover.

The trainer writes one row per rank to `<output_dir>/memory_per_rank.json`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _unique_bytes(tensors: Iterable[torch.Tensor], exclude: set[tuple[int, int]] = frozenset()) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in tensors:
        key = _storage_key(tensor)
        if key in seen or key in exclude or key[1] == 0:
            continue
        seen.add(key)
        total += key[1]
    return total


def _torch_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's (chained, mixed-precision, distributed) wrappers."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield inner.optimizer if hasattr(inner, "optimizer") else inner


def state_bytes(model_chunks, optimizer) -> dict[str, int]:
    """Bytes of weights, gradient buffers and optimizer states held by this rank."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    param_keys = {_storage_key(p) for p in params}
    buffers = [
        buf
        for chunk in model_chunks
        for buf in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", [])
    ]
    grads = [buf.grad_data for buf in buffers if getattr(buf, "grad_data", None) is not None]
    if not grads:  # no DDP gradient buffers: plain .grad tensors
        grads = [p.grad for p in params if p.grad is not None]
    optimizer_tensors = []
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            optimizer_tensors += group["params"]  # fp32 master copies (the model's own params are excluded)
        for state in inner.state.values():
            optimizer_tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "weights_bytes": _unique_bytes(params),
        "grads_bytes": _unique_bytes(grads),
        "optimizer_bytes": _unique_bytes(optimizer_tensors, exclude=param_keys),
    }


class ActivationMeter:
    """Records the bytes saved for backward by the first forward call of each model chunk."""

    def __init__(self, model_chunks):
        self.param_keys = {_storage_key(p) for chunk in model_chunks for p in chunk.parameters()}
        self.num_chunks = len(model_chunks)
        self.bytes_per_chunk: dict[int, int] = {}

    @property
    def done(self) -> bool:
        return len(self.bytes_per_chunk) >= self.num_chunks

    @contextlib.contextmanager
    def record(self, chunk) -> Iterator[None]:
        if id(chunk) in self.bytes_per_chunk:
            yield
            return
        seen: set[tuple[int, int]] = set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = _storage_key(tensor)
            if key not in self.param_keys:
                seen.add(key)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
        self.bytes_per_chunk[id(chunk)] = sum(nbytes for _, nbytes in seen)

    @property
    def activation_bytes(self) -> int:
        """Saved-for-backward bytes of one micro-batch through all of this rank's chunks."""
        return sum(self.bytes_per_chunk.values())
