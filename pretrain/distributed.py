"""Process setup: who am I (torchrun, Slurm srun or mpirun variables), process groups, seeds, and the
model inside the data-parallel wrappers (`unwrap`).

One process per GPU (or per CPU worker). The rendezvous address comes from MASTER_ADDR/MASTER_PORT,
which torchrun sets and the Slurm scripts derive from the job's first node.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from kumihimo.core.errors import UserError
from kumihimo.core.processes import (
    ProcessInfo,
    process_info,
)  # no torch there: the watchdog's parent reads it


def init_process_group(device: str, timeout_minutes: int) -> ProcessInfo:
    """Initialise torch.distributed (gloo on CPU, NCCL on GPU); a single process needs no launcher."""
    info = process_info()
    if dist.is_initialized():
        return info
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("runtime.device=cuda but no GPU is visible; set runtime.device=cpu for a CPU run")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if info.world_size == 1:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_PORT" not in os.environ:
        raise UserError(
            "MASTER_PORT is not set for a multi-process run; launch with torchrun, "
            "`kumihimo train --nproc-per-node N`, or the slurm/ scripts"
        )
    if device != "cuda" and info.world_size > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = interface_towards(os.environ["MASTER_ADDR"])
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group(
        backend="nccl" if device == "cuda" else "gloo",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return info


def interface_towards(host: str) -> str | None:
    """The name of this machine's network interface that traffic to `host` leaves from (None if unknown).

    gloo binds to the address its host name resolves to unless GLOO_SOCKET_IFNAME names an interface,
    and many machines resolve their own name to a loopback address (Debian's 127.0.1.1), which ranks on
    other nodes cannot reach. The interface that routes to the rendezvous host is one they can.
    """
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # a UDP connect sends nothing; it only picks the route
            local_address = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as query:
                try:  # SIOCGIFADDR: the interface's IPv4 address
                    packed = fcntl.ioctl(query.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue  # no IPv4 address on this interface
            if socket.inet_ntoa(packed[20:24]) == local_address:
                return name
    except OSError:
        return None
    return None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Seed the host-side generators; model init has its own per-tensor generators (pretrain.model)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers: checkpoint keys must not carry `module.`
    prefixes, so checkpoints stay interchangeable with Megatron-LM's."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module
