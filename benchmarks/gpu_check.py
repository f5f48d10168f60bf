"""One GPU, under 10 minutes: is the GPU path configured and fast as it should be?

    python benchmarks/gpu_check.py                       # on one H100/H200; writes gpu_check.md
    python benchmarks/gpu_check.py --dry-run             # anywhere: the runs it would make

What it runs, each as the real `kumihimo train` CLI on mock data (a fresh process per run):
  1. the smoke recipe end to end (configs/pretrain/smoke-1gpu.yaml, 300 steps, evaluation, a save);
  2. LLM-jp-3 172B's layer shapes (hidden 12288, FFN 38464, 96 heads / 16 KV groups, seq 4096;
     1 layer on an 80 GB GPU, 2 above 120 GB; mock vocabulary 32,768 so the optimizer states fit one
     GPU), TP=1, micro-batch 1: BF16 with the fusions on, BF16 with every fusion off, FP8 (hybrid,
     delayed scaling; needs Transformer Engine) with the fusions on;
  3. beside them a plain PyTorch Llama of the same shape (benchmarks/bench_train_gpu.py's PlainLlama:
     SDPA attention, fused AdamW) and the bf16 matmul roofline of the FFN GEMM ([4096 x 12288] x
     [12288 x 38464], the largest GEMM of the layer);
  4. `kumihimo plan`'s memory prediction beside the measured peak (torch max_allocated) of each run.

TFLOP/s use one formula for every row (pretrain/metrics.py training_flops_per_token: model FLOPs, no
recompute counted, causal attention counted in full), over the median step after the warm-up steps.
The results are written as Markdown in the format of docs/benchmarks.md (--output), with the device,
versions and date, ready to paste there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3
SHAPE_172B = {
    "model.hidden_size": 12288,
    "model.ffn_hidden_size": 38464,
    "model.num_attention_heads": 96,
    "model.num_query_groups": 16,
    "model.seq_length": 4096,
}
MOCK_VOCAB = 32768
FUSION_KEYS = (
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "persist_layer_norm",
)
ROOFLINE_GEMM = (4096, 12288, 38464)  # m, k, n: tokens x hidden @ hidden x FFN


@dataclass(frozen=True)
class Run:
    """One `kumihimo train` process."""

    name: str
    recipe: str
    overrides: tuple[str, ...]
    needs_te: bool = False


@dataclass
class Outcome:
    """What one run measured (or why it did not run)."""

    name: str
    ms_per_step: float | None = None
    tflops: float | None = None
    planned_gb: float | None = None
    measured_gb: float | None = None
    fusions: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="172B-shaped layers (default: 1, 2 above 120 GB)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="steps per layer-shape run (default: %(default)s)"
    )
    parser.add_argument(
        "--smoke-steps", type=int, default=300, help="smoke recipe steps (default: %(default)s)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense BF16 peak for MFU (H100/H200: 989)"
    )
    parser.add_argument("--output", type=Path, default=Path("gpu_check.md"), help="Markdown results file")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit (works without a GPU)")
    args = parser.parse_args(argv)
    if args.layers is not None and not 1 <= args.layers <= 4:
        parser.error(f"--layers={args.layers}: use 1 or 2 (at most 4) 172B-shaped layers on one GPU")
    if args.steps <= WARMUP:
        parser.error(f"--steps={args.steps} must exceed the {WARMUP} warm-up steps")
    if args.smoke_steps < 1:
        parser.error(f"--smoke-steps={args.smoke_steps} must be >= 1")
    if not args.peak_tflops > 0:
        parser.error(f"--peak-tflops={args.peak_tflops} must be > 0")
    return args


def default_layers(gpu_memory_gb: float) -> int:
    """1 layer fits 80 GB with its optimizer states (~18 B/param, ~2.6B params with the embeddings)."""
    return 2 if gpu_memory_gb > 120 else 1


def layer_overrides(layers: int, steps: int) -> tuple[str, ...]:
    shape = [f"{key}={value}" for key, value in SHAPE_172B.items()]
    return (
        *shape,
        f"model.num_layers={layers}",
        f"data.mock_vocab_size={MOCK_VOCAB}",
        "model.recompute=none",
        f"schedule.train_iters={steps}",
        "schedule.micro_batch_size=1",
        "schedule.global_batch_size=1",
        "schedule.lr_warmup_iters=1",
        "schedule.eval_interval=0",
        "checkpoint.enabled=false",
        "logging.log_interval=1",
    )


def planned_runs(args: argparse.Namespace, layers: int) -> list[Run]:
    smoke = Run(
        "smoke recipe", "configs/pretrain/smoke-1gpu.yaml", (f"schedule.train_iters={args.smoke_steps}",)
    )
    base = layer_overrides(layers, args.steps)
    recipe = "configs/pretrain/smoke-1gpu.yaml"
    return [
        smoke,
        Run("kumihimo BF16, fusions on", recipe, base),
        Run("kumihimo BF16, fusions off", recipe, (*base, *(f"fusions.{key}=false" for key in FUSION_KEYS))),
        Run(
            "kumihimo FP8 hybrid (delayed), fusions on",
            recipe,
            (
                *base,
                "precision.fp8=hybrid",
                "precision.fp8_recipe=delayed",
                "model.transformer_impl=transformer_engine",
            ),
            needs_te=True,
        ),
    ]


def command(run: Run, output_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kumihimo.cli",
        "train",
        run.recipe,
        *run.overrides,
        f"output_dir={output_dir}",
    ]


# ---------------------------------------------------------------------------------------------
# Measuring (GPU)
# ---------------------------------------------------------------------------------------------


def flops_per_step(recipe: str, overrides: tuple[str, ...]) -> tuple[float, float]:
    """Model FLOPs per optimizer step of a run, and its planned memory (GB, without the reserve)."""
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.metrics import training_flops_per_token
    from kumihimo.pretrain.plan import make_plan

    config = configtree.load(TrainConfig, REPO / recipe, list(overrides))
    plan = make_plan(config, 1, config.data.mock_vocab_size)
    tokens = config.model.seq_length * config.schedule.global_batch_size
    return training_flops_per_token(config.model, plan.padded_vocab) * tokens, plan.total_gb - plan.reserve_gb


def measure_run(run: Run, out: Path, te: bool) -> Outcome:
    """Train `run` into the fresh folder `out`; its step times, TFLOP/s, memory and fusion line."""
    if run.needs_te and not te:
        return Outcome(
            run.name,
            note="skipped: Transformer Engine is not installed (pip install -e '.[te]' from the checkout)",
        )
    start = time.perf_counter()
    proc = subprocess.run(
        command(run, out),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, WANDB_MODE="disabled"),
    )
    if proc.returncode != 0:
        return Outcome(
            run.name, note=f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "step_time_s" in m]
    times = [m["step_time_s"] for m in train][WARMUP:] or [m["step_time_s"] for m in train]
    step_flops, planned_gb = flops_per_step(run.recipe, run.overrides)
    memory = json.loads((out / "memory_per_rank.json").read_text())[0]
    fusion_lines = [line for line in proc.stderr.splitlines() if "[train] fusions " in line]
    median = statistics.median(times)
    return Outcome(
        run.name,
        ms_per_step=median * 1e3,
        tflops=step_flops / median / 1e12,
        planned_gb=planned_gb,
        measured_gb=memory.get("max_allocated_bytes", 0) / 1e9,
        fusions=fusion_lines[-1].split("[train] fusions ", 1)[1] if fusion_lines else "",
        extra={
            "first_loss": train[0]["loss"],
            "last_loss": train[-1]["loss"],
            "steps": len(train),
            "wall_s": time.perf_counter() - start,
        },
    )


def measure_plain(layers: int, steps: int) -> Outcome:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train_gpu import plain_step_times

    shape = dict(hidden=12288, ffn=38464, heads=96, groups=16, seq=4096, vocab=MOCK_VOCAB)
    import torch

    torch.cuda.reset_peak_memory_stats()
    times = plain_step_times(shape, layers, steps, "cuda")[WARMUP:]
    overrides = layer_overrides(layers, steps)
    step_flops, planned_gb = flops_per_step("configs/pretrain/smoke-1gpu.yaml", overrides)
    median = statistics.median(times)
    measured = torch.cuda.max_memory_allocated() / 1e9
    return Outcome(
        "plain PyTorch Llama (BF16, SDPA, fused AdamW)",
        ms_per_step=median * 1e3,
        tflops=step_flops / median / 1e12,
        measured_gb=measured,
        note="bf16 weights, no fp32 master copy",
    )


def measure_roofline(iterations: int = 20) -> Outcome:
    import torch

    m, k, n = ROOFLINE_GEMM
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iterations
    return Outcome(
        f"bf16 matmul roofline [{m} x {k}] x [{k} x {n}]",
        ms_per_step=seconds * 1e3,
        tflops=2 * m * k * n / seconds / 1e12,
    )


# ---------------------------------------------------------------------------------------------
# Results (docs/benchmarks.md format)
# ---------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_results(header: dict, smoke: Outcome, layer_rows: list[Outcome], layers: int, peak: float) -> str:
    lines = [
        "## GPU check",
        "",
        f"`python benchmarks/gpu_check.py` — measured {header['date']} on {header['device']} "
        f"({header['memory_gb']:.0f} GB), torch {header['torch']}, megatron-core {header['megatron']}, "
        f"Transformer Engine {header['te'] or 'not installed'}; mock data; MFU against {peak:g} TFLOP/s.",
        "",
        f"### Smoke recipe (configs/pretrain/smoke-1gpu.yaml, {smoke.extra.get('steps', '-')} steps)",
        "",
        "| first loss | last loss | median step | TFLOP/s | MFU | wall time | note |",
        "|---:|---:|---:|---:|---:|---:|---|",
        f"| {_num(smoke.extra.get('first_loss'), '.3f')} | {_num(smoke.extra.get('last_loss'), '.3f')} | "
        f"{_num(smoke.ms_per_step, '.1f')} ms | {_num(smoke.tflops, '.1f')} | "
        f"{_num(smoke.tflops and smoke.tflops / peak, '.1%')} | {_num(smoke.extra.get('wall_s'), '.0f')} s | "
        f"{smoke.note} |",
        "",
        f"### LLM-jp-3 172B layer shapes ({layers} layer(s), TP=1, micro-batch 1, seq 4096, vocabulary {MOCK_VOCAB:,})",
        "",
        "| run | ms/step | TFLOP/s per GPU | MFU | note |",
        "|---|---:|---:|---:|---|",
    ]
    for row in layer_rows:
        mfu = row.tflops / peak if row.tflops is not None else None
        lines.append(
            f"| {row.name} | {_num(row.ms_per_step, '.1f')} | {_num(row.tflops, '.1f')} | {_num(mfu, '.1%')} | "
            f"{row.note} |"
        )
    lines += ["", "Fusions as each kumihimo run logged them:", ""]
    lines += [f"- {row.name}: {row.fusions}" for row in [smoke, *layer_rows] if row.fusions]
    lines += [
        "",
        "### Memory: `kumihimo plan` vs the measured peak",
        "",
        "| run | plan (GB, without the reserve) | measured max_allocated (GB) | measured / plan |",
        "|---|---:|---:|---:|",
    ]
    for row in [smoke, *layer_rows]:
        if row.planned_gb is None or row.measured_gb is None:
            continue
        lines.append(
            f"| {row.name} | {row.planned_gb:.1f} | {row.measured_gb:.1f} | {row.measured_gb / row.planned_gb:.2f} |"
        )
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import megatron.core
    import torch

    from kumihimo.pretrain.model import transformer_engine_available

    te = None
    if transformer_engine_available():
        import transformer_engine

        te = getattr(transformer_engine, "__version__", "installed")
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": props.name,
        "memory_gb": props.total_memory / 1e9,
        "torch": torch.__version__,
        "megatron": megatron.core.__version__,
        "te": te,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.dry_run:
        layers = args.layers or 1
        for run in planned_runs(args, layers):
            print(f"{run.name}:\n  {' '.join(command(run, Path('<tmp>') / 'run'))}")
        print(
            "plain PyTorch Llama of the same shape; bf16 matmul roofline", " x ".join(map(str, ROOFLINE_GEMM))
        )
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU; --dry-run lists the runs without one", file=sys.stderr)
        return 2
    header = versions()
    layers = args.layers or default_layers(header["memory_gb"])
    runs = planned_runs(args, layers)
    with tempfile.TemporaryDirectory() as tmp:
        te = header["te"] is not None
        outcomes = [measure_run(run, Path(tmp) / f"run{i}", te) for i, run in enumerate(runs)]
    layer_rows = [*outcomes[1:], measure_plain(layers, args.steps), measure_roofline()]
    text = format_results(header, outcomes[0], layer_rows, layers, args.peak_tflops)
    args.output.write_text(text)
    print(text + f"\n(written to {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
