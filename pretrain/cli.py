"""`kumihimo train CONFIG [key=value ...]`.

Inside a launcher (torchrun, srun, mpirun) every process runs the trainer. Outside one,
`--nproc-per-node N` starts N local processes through torch.distributed.run; the config is loaded
and its parallel layout checked here first, so a bad config fails once, with exit code 2, before
any process starts.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from kumihimo.core import configtree
from kumihimo.core.errors import UserError


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pretrain a Llama-style model with Megatron-Core. CONFIG is a recipe from configs/pretrain/; "
        "override any field with dotted key=value pairs."
    )
    parser.epilog = (
        "examples:\n"
        "  kumihimo train configs/pretrain/tiny-cpu.yaml schedule.train_iters=50\n"
        "  kumihimo train configs/pretrain/tiny-cpu.yaml --nproc-per-node 2 "
        "parallelism.tensor_model_parallel_size=2\n"
        "  torchrun --nproc-per-node 8 -m kumihimo.cli train configs/pretrain/llmjp3-1.8b.yaml\n"
        "  kumihimo train --help-config      # every field with its documentation"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", help="YAML recipe (configs/pretrain/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-4")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="start this many local processes (torchrun) when not already under a launcher (default: 1)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and layout, then exit (without --nproc-per-node: for the smallest world "
        "size the layout allows, TP x PP x CP, or a multiple that also holds EP x ETP per stage)",
    )
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.set_defaults(handler=run)


def _under_launcher() -> bool:
    from kumihimo.core.processes import process_info

    return process_info().world_size > 1 or "RANK" in os.environ


def run(args: argparse.Namespace) -> int:
    from kumihimo.pretrain.config import TrainConfig

    if args.help_config:
        for key, type_name, doc in configtree.describe(TrainConfig):
            print(f"{key} ({type_name})\n    {doc}")
        return 0
    if not args.config:
        raise UserError("kumihimo train needs a CONFIG (e.g. configs/pretrain/tiny-cpu.yaml)")
    config = configtree.load(TrainConfig, args.config, args.overrides)
    launched = _under_launcher()
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
    if launched and not args.check and config.resilience.hang_timeout_factor is not None:
        from kumihimo.pretrain import watchdog

        # this process watches its rank's trainer (the child does the checks below and trains); it
        # imports no torch, so each rank's supervisor stays small
        if watchdog.HEARTBEAT_ENV not in os.environ:
            return watchdog.supervise(
                [sys.executable, "-m", "kumihimo.cli", "train", args.config, *args.overrides]
            )
    from kumihimo.core.processes import process_info
    from kumihimo.pretrain import preflight
    from kumihimo.pretrain.parallel import ParallelLayout

    if args.nproc_per_node is None:
        # --check launches nothing: check a multi-GPU recipe at the smallest world its layout allows
        par = config.parallelism
        pp = par.pipeline_model_parallel_size
        # the dense (TP x CP x DP) and expert (ETP x EP x expert DP) grids both tile each stage's ranks
        smallest = (
            math.lcm(
                par.tensor_model_parallel_size * par.context_parallel_size,
                par.expert_tp * par.expert_model_parallel_size,
            )
            * pp
        )
        args.nproc_per_node = smallest if args.check and not launched else 1
    world = process_info().world_size if launched else args.nproc_per_node
    layout = ParallelLayout.from_config(config, world)
    preflight.check_paths(config)
    if args.check:
        for note in [*config.cpu_notes(), *preflight.check_pretrained_at_check(config, layout.tp)]:
            print(f"[check] {note}")
        from kumihimo.pretrain.model import describe_fusions, resolve_fusions

        print(f"config OK: {layout.describe()}")
        print(
            f"fusions {describe_fusions(resolve_fusions(config.model, config.fusions, config.runtime.device))}"
        )
        return 0
    if not launched and args.nproc_per_node > 1:
        return _spawn_local(args)
    from kumihimo.pretrain.training import run_training

    return run_training(config).exit_code


def _spawn_local(args: argparse.Namespace) -> int:
    return spawn_local(args.nproc_per_node, ["train", args.config, *args.overrides])


def spawn_local(nproc_per_node: int, verb_args: list[str]) -> int:
    """Run `kumihimo <verb_args>` in `nproc_per_node` local processes under torchrun (one node, one OMP
    thread per process unless OMP_NUM_THREADS says otherwise); its exit code. The rendezvous is
    torchrun's --standalone one: its store binds a port the system picks, so two launches on one
    machine cannot take the same port (a port found free and bound later can be taken in between).

    A user error in the processes comes out as a single-process run's does: each distinct line once
    (the ranks write theirs to ERROR_DIR_ENV instead of printing), exit 2, and no torchrun traceback."""
    import tempfile

    from kumihimo.core.processes import die_with_parent

    cmd = [
        sys.executable,
        "-c",
        "from kumihimo.pretrain.cli import torchrun_quietly; torchrun_quietly()",
        f"--nproc-per-node={nproc_per_node}",
        "--standalone",
        "-m",
        "kumihimo.cli",
        *verb_args,
    ]
    launcher = os.getpid()
    with tempfile.TemporaryDirectory(prefix="kumihimo-errors-") as errors:
        env = dict(
            os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **{ERROR_DIR_ENV: errors}
        )
        # torchrun gets SIGKILL when this process dies (kill -9 included), and its ranks when it dies
        # (kumihimo.core.processes.die_with_torchrun): nothing of the launch outlives it.
        code = subprocess.call(cmd, env=env, preexec_fn=lambda: die_with_parent(launcher))
        reports = sorted(Path(errors).glob("rank*.txt"), key=lambda p: int(p.stem.removeprefix("rank")))
        lines = list(dict.fromkeys(p.read_text(encoding="utf-8").strip() for p in reports))
    if lines:
        raise UserError("\n".join(lines))
    return code


ERROR_DIR_ENV = "KUMIHIMO_ERROR_DIR"
"""Set by spawn_local for its processes: where each rank writes its one-line user error (rank<N>.txt)."""


def torchrun_quietly() -> None:
    """torch.distributed.run, exiting with the first failed process's exit code instead of raising
    ChildFailedError (whose traceback would bury the processes' own one-line errors)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as failed:
        _rank, failure = failed.get_first_failure()
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
