"""Run Megatron-Core on CPU processes (gloo): redirect its hard-coded CUDA assumptions.

Megatron-Core is written for GPUs: it allocates with `device="cuda"` or `torch.cuda.current_device()`,
calls `Tensor.cuda()`, synchronises streams and events, and asserts `param.grad.type() ==
"torch.cuda.FloatTensor"` when clipping gradients. On CPU all of that fails, although the maths is
device-agnostic. This module makes those calls land on the CPU:

* a `TorchFunctionMode` rewrites every cuda device argument (strings, `torch.device`, bare ordinals) to
  `cpu`, turns `Tensor.cuda()` into a no-op and reports CPU float tensors with their CUDA type name;
* `torch.cuda.current_device/synchronize/current_stream/Stream/Event/...` become harmless stand-ins;
* custom autograd backward functions run inside the same mode (the autograd engine drops it);
* the MoE all-to-all token dispatcher's split sizes, left as CPU tensors, are passed as lists, and
  its gathers and reduce-scatters of uneven pieces over expert-TP ranks, which gloo lacks, are
  done with a padded all-gather and an all-reduce.

`activate()` is called by the trainer only when `runtime.device == "cpu"` (tests, the quickstart) and
never on GPU runs; nothing here is imported by the GPU path. Dropout is zero in every recipe we run on
CPU, so the CUDA RNG tracker is replaced by Megatron's inference tracker (no per-region RNG streams);
the CPU generator carries the randomness and is what checkpoints store.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

_CPU = torch.device("cpu")
_lock = threading.Lock()
_mode: _CudaToCpuMode | None = None


def _to_cpu_device(device):
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite cuda device arguments to cpu for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # Megatron checks e.g. param.type() == 'torch.cuda.FloatTensor' to classify parameters.
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):  # page-locking needs a CUDA driver (CP's rotary slicing asks for it)
            kwargs["pin_memory"] = False
        if func is torch.distributed.all_to_all_single:
            # The MoE all-to-all dispatcher moves its split sizes to the host only when they are on
            # a GPU (moe_utils.maybe_move_tensor_to_cpu), so on CPU they arrive as tensors, which
            # the process group's binding refuses: give it the lists it takes.
            for key in ("output_split_sizes", "input_split_sizes"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = kwargs[key].tolist()
        if func is torch.distributed.all_gather:
            return _all_gather_uneven(*args, **kwargs)
        if func is torch.distributed.reduce_scatter:
            return _reduce_scatter_by_all_reduce(*args, **kwargs)
        if func is torch.Tensor.to and len(args) > 1:
            # Only .to() takes a device positionally; other methods' positional ints are sizes.
            args = (args[0], *(_to_cpu_device(a) for a in args[1:]))
        return func(*args, **kwargs)


def _all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
    """torch.distributed.all_gather that also takes pieces of different lengths along dim 0, which gloo
    refuses (the MoE dispatcher gathers each rank's routed tokens over expert-TP ranks): gather
    copies padded to the longest piece, then keep each rank's rows."""
    import torch.distributed as dist

    lengths = [piece.shape[0] for piece in tensor_list]
    if len(set(lengths)) == 1:
        return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    longest = max(lengths)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in tensor_list]
    dist.all_gather(gathered, padded, group=group)
    for piece, full, length in zip(tensor_list, gathered, lengths):
        piece.copy_(full[:length])
    return None


def _reduce_scatter_by_all_reduce(output, input_list, op=None, group=None, async_op=False):
    """torch.distributed.reduce_scatter (the list form, with pieces of any lengths), which gloo lacks:
    all-reduce the concatenated pieces and keep this rank's (the backward of the gather above)."""
    import torch.distributed as dist

    whole = torch.cat([piece.reshape(piece.shape[0], -1) for piece in input_list])
    dist.all_reduce(whole, op=op or dist.ReduceOp.SUM, group=group)
    rank = dist.get_rank(group)
    start = sum(piece.shape[0] for piece in input_list[:rank])
    output.copy_(whole[start : start + input_list[rank].shape[0]].reshape(output.shape))
    return None


class _NoStream:
    """Stand-in for torch.cuda.Stream / current_stream() on CPU: everything is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NoEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoEvent:
    """Stand-in for torch.cuda.Event on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_CUDA_STUBS = {
    "current_device": lambda: 0,
    "synchronize": lambda *a, **k: None,
    "current_stream": lambda *a, **k: _NoStream(),
    "default_stream": lambda *a, **k: _NoStream(),
    "stream": lambda *a, **k: contextlib.nullcontext(),
    "set_device": lambda *a, **k: None,
    "empty_cache": lambda: None,
    "Stream": _NoStream,
    "Event": _NoEvent,
    "memory_allocated": lambda *a, **k: 0,
    "max_memory_allocated": lambda *a, **k: 0,
    "memory_reserved": lambda *a, **k: 0,
    "reset_peak_memory_stats": lambda *a, **k: None,
}
_original_backward_apply = BackwardCFunction.apply


def _backward_apply_on_cpu(self, *args):
    """The autograd engine runs custom backward functions with an empty torch-function mode stack, so
    device="cuda" in e.g. Megatron's reduce-scatter backward (sequence/context parallel) would escape
    the redirect; re-enter it around each of them."""
    if _get_current_function_mode_stack():
        return _original_backward_apply(self, *args)
    with _CudaToCpuMode():
        return _original_backward_apply(self, *args)


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) of everything `activate` swaps in."""
    return [
        *((torch.cuda, name, stub) for name, stub in _CUDA_STUBS.items()),
        # Full activation recompute saves and restores the CUDA generator around each layer; there is
        # none (Megatron restores CPU randomness from torch.get_rng_state), so an empty state stands in.
        (torch.cuda.random, "get_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8)),
        (BackwardCFunction, "apply", _backward_apply_on_cpu),
    ]


_saved_attrs: list[tuple[object, str, object]] = []


def activate() -> None:
    """Redirect CUDA calls to the CPU for the rest of the process (idempotent)."""
    global _mode
    with _lock:
        if _mode is not None:
            return
        for owner, name, replacement in _patches():
            _saved_attrs.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)
        _mode = _CudaToCpuMode()
        _mode.__enter__()


def deactivate() -> None:
    """Undo `activate()` (tests use this to leave the interpreter as they found it)."""
    global _mode
    with _lock:
        if _mode is None:
            return
        _mode.__exit__(None, None, None)
        _mode = None
        for owner, name, original in reversed(_saved_attrs):
            setattr(owner, name, original)
        _saved_attrs.clear()
