"""CPU training throughput of the tiny recipe, for catching regressions (not a performance claim).

Runs `kumihimo train configs/pretrain/tiny-cpu.yaml` on mock data with 1 process, 2 processes (DP=2)
and 2 processes with TP=2, PP=2, TP=2 + sequence parallel and CP=2, and prints steps/s and tokens/s over the steps after warm-up
(median step time). Usage:

    python benchmarks/bench_train_cpu.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "1 process": (1, []),
    "2 processes, DP=2": (2, []),
    "2 processes, TP=2": (2, ["parallelism.tensor_model_parallel_size=2"]),
    "2 processes, PP=2": (2, ["parallelism.pipeline_model_parallel_size=2"]),
    "2 processes, TP=2+SP": (
        2,
        ["parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true"],
    ),
    "2 processes, CP=2": (2, ["parallelism.context_parallel_size=2"]),
}
WARMUP_STEPS = 5


def run(layout: str, steps: int) -> dict[str, float]:
    nproc, overrides = LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "kumihimo.cli",
            "train",
            "configs/pretrain/tiny-cpu.yaml",
            f"schedule.train_iters={steps}",
            "schedule.lr_warmup_iters=1",
            "schedule.eval_interval=0",
            f"output_dir={tmp}",
            "checkpoint.enabled=false",
            *overrides,
            "--nproc-per-node",
            str(nproc),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        metrics = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_time_s"] for m in metrics[WARMUP_STEPS:]]
    step_time = statistics.median(times)
    tokens_per_step = metrics[-1]["consumed_tokens"] / metrics[-1]["step"]
    return {"steps_per_s": 1 / step_time, "tokens_per_s": tokens_per_step / step_time}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"tiny-cpu recipe (4 layers, hidden 64, seq 128, global batch 8), {os.cpu_count()} CPU cores")
    print(f"{'layout':<24}{'steps/s':>10}{'tokens/s':>12}")
    for layout in LAYOUTS:
        result = run(layout, args.steps)
        print(f"{layout:<24}{result['steps_per_s']:>10.2f}{result['tokens_per_s']:>12,.0f}")


if __name__ == "__main__":
    main()
