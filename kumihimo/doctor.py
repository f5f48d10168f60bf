"""`kumihimo doctor [--config CONFIG]`: check the environment before spending GPU hours.

Prints one line per check (OK / WARN / FAIL) and exits 1 if anything failed. Inside a multi-process
job (torchrun, srun) every rank joins an all-reduce and rank 0 reports the measured bus bandwidth;
the Slurm training script runs this before the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kumihimo.core.errors import UserError

MIN_FREE_GB = 20.0


@dataclass
class Report:
    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: str, check: str, detail: str) -> None:
        self.lines.append((status, check, detail))

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.lines)

    def verdict(self) -> str:
        num_warnings = sum(status == "WARN" for status, _, _ in self.lines)
        if self.failed:
            return "problems found (FAIL above)"
        return f"no failures; {num_warnings} warning(s) above" if num_warnings else "all checks passed"

    def render(self) -> str:
        width = max(len(check) for _, check, _ in self.lines)
        return "\n".join(f"[{status:4}] {check:<{width}}  {detail}" for status, check, detail in self.lines)


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check Python, torch, megatron-core, Transformer Engine, GPUs, communication, disk "
        "space and (with --config) a training recipe, its data and tokenizer."
    )
    parser.epilog = (
        "examples:\n  kumihimo doctor\n  kumihimo doctor --config configs/pretrain/tiny-cpu.yaml\n"
        "  srun kumihimo doctor --config run.yaml     # inside a job: all-reduce bandwidth too"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", help="training recipe to validate against this machine")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for --config")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    report = Report()
    check_software(report)
    check_devices(report)
    config = check_config(report, args.config, args.overrides) if args.config else None
    if config is not None:
        check_config_needs(report, config)
    check_disk(report, config)
    check_allocation(report, os.environ)
    check_communication(report, config)
    from kumihimo.pretrain.distributed import process_info

    if process_info().rank == 0:
        print(report.render())
        print("doctor: " + report.verdict())
    return 1 if report.failed else 0


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # optional packages may fail to import in many ways (missing CUDA libraries)
        return None
    return getattr(mod, "__version__", "installed")


def check_software(report: Report) -> None:
    py = sys.version_info
    report.add(
        "OK" if py >= (3, 12) else "FAIL",
        "python",
        f"{py.major}.{py.minor}.{py.micro}"
        + ("" if py >= (3, 12) else " (megatron-core >= 0.17 needs 3.12)"),
    )
    for module, required in (
        ("torch", True),
        ("megatron.core", True),
        ("transformers", True),
        ("sentencepiece", True),
        ("tokenizers", True),
        ("numpy", True),
        ("transformer_engine", False),
        ("apex", False),
        ("wandb", False),
        ("tensorboard", False),
    ):
        start = time.perf_counter()
        version = _version(module)
        took = time.perf_counter() - start
        if version is None:
            status = "FAIL" if required else "WARN"
            hint = (
                "pip install -e ."
                if required
                else {
                    "transformer_engine": "needed for FP8 and fused kernels; local layers do tensor, "
                    "sequence and context parallelism without it (pip install -e '.[te]' in the kumihimo checkout)",
                    "apex": "optional; TE covers what apex did",
                }.get(module, "optional")
            )
            report.add(status, module, f"not importable; {hint}")
        else:
            report.add("OK", module, f"{version} (import {took:.1f} s)")


def check_devices(report: Report) -> None:
    import torch

    if not torch.cuda.is_available():
        report.add("WARN", "gpus", "no CUDA device visible: only runtime.device=cpu runs will work here")
        return
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    report.add("OK", "gpus", f"{len(names)} visible: {', '.join(sorted(set(names)))}")
    hopper = all(major >= 9 for major, _ in caps)
    report.add(
        "OK" if hopper else "WARN",
        "fp8",
        "Hopper or newer: FP8 possible with TE"
        if hopper
        else f"compute capability {sorted(caps)}: FP8 needs Hopper (9.0) or newer",
    )


def check_config(report: Report, path: str, overrides: list[str]):
    from kumihimo.core import configtree
    from kumihimo.pretrain import preflight
    from kumihimo.pretrain.config import TrainConfig

    try:
        config = configtree.load(TrainConfig, path, overrides)
        preflight.check_paths(config)
    except UserError as exc:
        report.add("FAIL", "config", str(exc))
        return None
    report.add("OK", "config", f"{path} is valid")
    from kumihimo.pretrain.distributed import process_info
    from kumihimo.pretrain.parallel import ParallelLayout

    world = process_info().world_size
    try:
        layout = ParallelLayout.from_config(config, world)
        report.add("OK", "layout", layout.describe())
    except UserError as exc:
        report.add(
            "WARN" if world == 1 else "FAIL",
            "layout",
            f"{exc}"
            + (" (checked for 1 process; run inside the job for its world size)" if world == 1 else ""),
        )
    check_data_matches_tokenizer(report, config)
    return config


def check_data_matches_tokenizer(report: Report, config) -> None:
    """The blend.yaml records the tokenizer its datasets were made with; it must be the one trained on."""
    if config.data.mock or not config.data.blend_file or not config.data.tokenizer:
        return
    from kumihimo.data_prep.blend import read_blend
    from kumihimo.tokenizer.base import load_tokenizer

    try:
        _datasets, recorded_tokenizer = read_blend(config.data.blend_file)
    except UserError as exc:
        report.add("FAIL", "data/tokenizer", str(exc))
        return
    recorded = (recorded_tokenizer or {}).get("sha256")
    current = load_tokenizer(config.data.tokenizer).sha256
    if recorded is None:
        report.add("WARN", "data/tokenizer", f"{config.data.blend_file} records no tokenizer; cannot check")
    elif recorded != current:
        report.add(
            "FAIL",
            "data/tokenizer",
            f"datasets in {config.data.blend_file} were tokenized with another "
            f"tokenizer (sha256 {recorded[:12]}... vs {current[:12]}...); retokenize or fix data.tokenizer",
        )
    else:
        report.add("OK", "data/tokenizer", "datasets were made with data.tokenizer")


def check_config_needs(report: Report, config) -> None:
    """What this recipe needs from this machine: a GPU for runtime.device=cuda, TE for FP8 or TE layers."""
    import torch

    if config.runtime.device == "cuda" and not torch.cuda.is_available():
        report.add(
            "FAIL",
            "device",
            "runtime.device=cuda but no CUDA device is visible; run on a GPU node or set runtime.device=cpu",
        )
    from kumihimo.pretrain.model import describe_fusions, resolve_fusions

    choices = resolve_fusions(config.model, config.fusions, config.runtime.device)
    # a GPU run without a kernel it asked for is slower than the recipe's source run: say so
    missing = config.runtime.device == "cuda" and any(
        not c.on and not c.reason.startswith(("fusions.", "unused")) for c in choices
    )
    report.add("WARN" if missing else "OK", "fusions", describe_fusions(choices))
    needs_te = config.model.transformer_impl == "transformer_engine" or config.precision.fp8 is not None
    if needs_te and _version("transformer_engine") is None:
        report.add(
            "FAIL",
            "transformer_engine",
            f"model.transformer_impl={config.model.transformer_impl}, precision.fp8={config.precision.fp8} "
            "need Transformer Engine; pip install -e '.[te]' in the kumihimo checkout or use local layers without FP8",
        )


def checkpoint_gb(config) -> float:
    """About what one checkpoint takes: the weights in the parameter dtype, plus fp32 main weights (bf16
    runs) and Adam's two fp32 moments: 14 B per parameter in bf16, 12 in fp32; all experts counted."""
    from kumihimo.pretrain.parallel import padded_vocab_size
    from kumihimo.pretrain.plan import model_params, param_dtype_bytes
    from kumihimo.tokenizer.base import load_tokenizer

    m = config.model
    vocab = config.data.mock_vocab_size
    if not config.data.mock and config.data.tokenizer:
        try:
            vocab = load_tokenizer(config.data.tokenizer).vocab_size
        except UserError:
            pass  # the config check reports the missing tokenizer
    # every expert of a mixture of experts is in the checkpoint
    params = model_params(m, padded_vocab_size(vocab, m.make_vocab_size_divisible_by, 1))
    weight_bytes = param_dtype_bytes(config.precision)
    return (weight_bytes + (12 if weight_bytes == 2 else 8)) * params / 2**30


def check_disk(report: Report, config) -> None:
    """Free space where checkpoints go: FAIL when one checkpoint (or 1 GiB) does not fit, WARN below
    MIN_FREE_GB or two checkpoints."""
    saves = bool(config and config.checkpoint_dir)
    target = Path(config.checkpoint_dir if saves else ".").resolve()
    while not target.exists():
        target = target.parent
    free_gb = shutil.disk_usage(target).free / 2**30
    needed_gb = checkpoint_gb(config) if saves else 0.0
    detail = f"{free_gb:,.1f} GiB free at {target}"
    if saves:
        detail += f"; one checkpoint of this recipe takes about {needed_gb:,.1f} GiB"
    if free_gb < max(needed_gb, 1.0):
        report.add("FAIL", "disk", detail + ("; free space or set checkpoint.dir elsewhere" if saves else ""))
    else:
        report.add("OK" if free_gb >= max(MIN_FREE_GB, 2 * needed_gb) else "WARN", "disk", detail)


def check_allocation(report: Report, env) -> None:
    """Inside a batch job, the processes started must fill the nodes the scheduler gave: Slurm's node and
    task counts, or PBS's node file (one line per node, or per slot) against mpirun's world. A job whose
    launcher started too few ranks per node trains on part of what it pays for; too many oversubscribe."""
    from kumihimo.pretrain.distributed import process_info

    info = process_info()
    if "PBS_JOBID" in env:
        node_file = env.get("PBS_NODEFILE")
        if not node_file or not Path(node_file).is_file():
            report.add(
                "FAIL", "allocation", f"PBS job {env['PBS_JOBID']} has no readable PBS_NODEFILE ({node_file})"
            )
            return
        nodes = list(
            dict.fromkeys(line.strip() for line in Path(node_file).read_text().splitlines() if line.strip())
        )
        where = f"PBS job {env['PBS_JOBID']}: {len(nodes)} node(s) in PBS_NODEFILE"
    elif "SLURM_JOB_ID" in env:
        nodes = [str(i) for i in range(int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1"))))]
        where = f"Slurm job {env['SLURM_JOB_ID']}: {len(nodes)} node(s)"
    else:
        return  # not inside a batch job: nothing to compare
    if info.world_size % len(nodes):
        report.add(
            "FAIL",
            "allocation",
            f"{where}, but {info.world_size} process(es) were started, not a multiple of the node count; "
            "start the same number of ranks on every node (mpirun --npernode / srun --ntasks-per-node)",
        )
        return
    report.add("OK", "allocation", f"{where}, {info.world_size // len(nodes)} process(es) per node")


def check_communication(report: Report, config) -> None:
    """All-reduce across the job's ranks (or a one-process gloo group) and measure bus bandwidth."""
    import torch
    import torch.distributed as dist

    from kumihimo.pretrain.distributed import init_process_group, process_info

    info = process_info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        init_process_group(device, timeout_minutes=5)
        tensor = torch.ones(16 * 2**20 // 4, device=device)  # 16 MiB of fp32
        dist.all_reduce(tensor)
        iterations = 5
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            dist.all_reduce(tensor)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / iterations
        ok = bool(tensor[0].item() == float(info.world_size) ** (iterations + 1))
        size = tensor.numel() * 4
        bus_gbps = (
            2 * (info.world_size - 1) / info.world_size * size / elapsed / 1e9 if info.world_size > 1 else 0
        )
        detail = f"{dist.get_backend()} all-reduce over {info.world_size} rank(s): " + (
            f"{bus_gbps:.1f} GB/s bus bandwidth" if info.world_size > 1 else "works (single process)"
        )
        report.add("OK" if ok else "FAIL", "communication", detail if ok else "all-reduce gave a wrong sum")
        if info.world_size > 1:
            check_same_inputs(report, config)
    except Exception as exc:  # any failure here is what the user needs to see, whatever its type
        report.add("FAIL", "communication", f"{type(exc).__name__}: {exc}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def input_fingerprint(config) -> dict | None:
    """What this process reads as the run's tokenizer and datasets: the tokenizer file's sha256 and each
    dataset's .bin/.idx sizes (sizes, not hashes: a 10 TB corpus cannot be hashed before every job)."""
    if config is None:
        return None
    if config.data.mock:
        return {"mock data": True}
    from kumihimo.pretrain.data_inspection import read_blend
    from kumihimo.tokenizer.base import load_tokenizer

    fingerprint: dict = {}
    try:
        fingerprint["tokenizer"] = (
            load_tokenizer(config.data.tokenizer).sha256 if config.data.tokenizer else None
        )
        prefixes, _weights, _recorded = read_blend(config.data)
    except (UserError, OSError) as exc:
        return {**fingerprint, "error": str(exc)}
    for prefix in prefixes:
        sizes = [
            Path(prefix + suffix).stat().st_size if Path(prefix + suffix).is_file() else None
            for suffix in (".bin", ".idx")
        ]
        fingerprint[f"dataset {prefix}"] = sizes
    return fingerprint


def check_same_inputs(report: Report, config) -> None:
    """Every node of the job must see the same tokenizer and datasets (node-local copies drift). Each rank
    sends its node name and fingerprint to all; rank 0 reports which nodes differ from the first."""
    import os
    import socket

    import torch.distributed as dist

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    # Only rank 0 prints: a node that could not even load the config (its own FAIL lines) says why here.
    failures = [f"{check}: {detail}" for status, check, detail in report.lines if status == "FAIL"]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (node, input_fingerprint(config), failures))
    by_node: dict[str, dict | None] = {}
    failures_by_node: dict[str, list[str]] = {}
    for name, fingerprint, node_failures in gathered:
        by_node.setdefault(name, fingerprint)
        failures_by_node.setdefault(name, node_failures)
    if all(fingerprint is None for fingerprint in by_node.values()):
        return  # no --config: nothing to compare
    first_node, reference = next(iter(by_node.items()))
    differing = {name: fp for name, fp in by_node.items() if fp != reference}
    if not differing:
        what = (
            "mock data"
            if reference and "mock data" in reference
            else (f"tokenizer and {sum(key.startswith('dataset ') for key in reference or {})} dataset(s)")
        )
        report.add("OK", "same inputs", f"{len(by_node)} node(s) see the same {what}")
        return
    details = []
    for name, fingerprint in differing.items():
        if fingerprint is None or reference is None:
            unreadable = name if fingerprint is None else first_node
            reasons = "; ".join(failures_by_node[unreadable]) or "no config"
            details.append(f"{unreadable} cannot read the run's inputs ({reasons})")
            continue
        keys = sorted(set(reference or {}) | set(fingerprint or {}))
        diff = [
            f"{key}: {_short((fingerprint or {}).get(key))} vs {_short((reference or {}).get(key))}"
            for key in keys
            if (fingerprint or {}).get(key) != (reference or {}).get(key)
        ]
        details.append(f"{name} differs from {first_node} in " + "; ".join(diff or ["its config"]))
    report.add(
        "FAIL",
        "same inputs",
        " | ".join(dict.fromkeys(details))
        + "; give every node the same files (shared storage, or copy them again)",
    )


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if isinstance(value, str) and len(value) == 64 else text
