"""`kumihimo plan` against measured CPU runs for mixture-of-experts layouts (docs/benchmarks.md).

Trains one step of configs/pretrain/tiny-moe-cpu.yaml (mock data) per layout with the real CLI and
prints, per layout, the plan's bytes per GPU beside what the ranks held (memory_per_rank.json: weights,
gradient buffers, optimizer states; activations saved for one micro-batch, mean over ranks, since each
rank's experts take the rows routed to them). Usage:

    python benchmarks/bench_moe_plan.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = "configs/pretrain/tiny-moe-cpu.yaml"
ONE_STEP = ["schedule.train_iters=1", "schedule.lr_warmup_iters=0", "schedule.eval_interval=0"]
LAYOUTS = {
    "1 process": (1, []),
    "1 process, dense first layer + gated shared expert": (
        1,
        [
            "model.moe.dense_first_layers=1",
            "model.moe.shared_expert_ffn_hidden_size=32",
            "model.moe.shared_expert_gate=true",
        ],
    ),
    "EP=2, distributed optimizer": (
        2,
        ["parallelism.expert_model_parallel_size=2", "parallelism.use_distributed_optimizer=true"],
    ),
    "TP=2 (SP) x EP=2, ETP=2": (
        4,
        [
            "parallelism.tensor_model_parallel_size=2",
            "parallelism.sequence_parallel=true",
            "parallelism.expert_model_parallel_size=2",
        ],
    ),
}


def measure(nproc: int, overrides: list[str], folder: Path) -> list[dict]:
    args = [sys.executable, "-m", "kumihimo.cli", "train", RECIPE, *ONE_STEP, *overrides]
    args += [f"output_dir={folder}", "checkpoint.enabled=false"]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True)
    return json.loads((folder / "memory_per_rank.json").read_text())


def main() -> None:
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.parallel import ParallelLayout
    from kumihimo.pretrain.plan import ActivationSizes, make_plan, microbatch_activation_bytes

    print("| layout | bytes | planned | measured (mean over ranks) | measured / planned |")
    print("|---|---|---:|---:|---:|")
    for name, (nproc, overrides) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(nproc, overrides, Path(tmp))
        config = configtree.load(TrainConfig, RECIPE, overrides)
        layout = ParallelLayout.from_config(config, nproc)
        vocab = config.data.mock_vocab_size
        padded = layout.padded_vocab_size(vocab, config.model.make_vocab_size_divisible_by)
        plan = make_plan(config, nproc, vocab)
        planned = {
            "weights_bytes": plan.weights_gb * 1e9,
            "grads_bytes": plan.grads_gb * 1e9,
            "optimizer_bytes": plan.optimizer_gb * 1e9,
            "activation_bytes_per_microbatch": microbatch_activation_bytes(
                config.model, layout, padded, 0, ActivationSizes.of(config)
            ),
        }
        for key, value in planned.items():
            measured = sum(row[key] for row in rows) / len(rows)
            label = key.removesuffix("_bytes").removesuffix("_bytes_per_microbatch")
            print(f"| {name} | {label} | {value:,.0f} | {measured:,.0f} | {measured / value:.4f} |")


if __name__ == "__main__":
    main()
