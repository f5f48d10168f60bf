"""`kumihimo pbs submit|launch-node`: training jobs for PBS Professional (ABCI 3.0 and other PBS sites).

`submit` renders slurm/train.pbs for a recipe on N nodes, as `kumihimo slurm submit` does for Slurm:
#PBS lines for the job's shape (`-l select=N:...:ngpus=G`, walltime, queue, project, name, the log under
the run directory), the site profile inlined (its QSUB_* lines become #PBS lines, so resource names can
differ per site), the recipe and its overrides, then the template's body, which starts one rank per GPU
with mpirun from $PBS_NODEFILE (or one torch launcher per node). The parallel layout is checked for the
job's world size before qsub.

PBS has no requeue and no early-warning signal, so a job given a walltime is told to stop by itself:
`schedule.exit_after_minutes` is set to the walltime less a margin for start-up, the trainer saves and
exits 3 before the limit (pretrain/deadline.py, which also reads the job's end from `qstat -f` when it
can: the earlier end applies), and the script submits itself again (the rendered copy in the run
directory), after a hang's exit 5 too.

The profile parsing, the refusal of control characters and the per-node launcher are shared with
`kumihimo.slurm`; only what differs for PBS lives here.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kumihimo.core.errors import UserError
from kumihimo.core.recipes import resolve_recipe
from kumihimo.slurm import (
    SLURM_DIR,
    add_job_shape_arguments,
    add_launch_node_parser,
    find_profile,
    processes_per_node,
    read_profile,
    refuse_control_characters,
    script_tail,
)

TEMPLATE = SLURM_DIR / "train.pbs"
LAUNCHERS = ("mpirun", "torchrun")
STARTUP_MINUTES = 3
"""Minutes of the walltime kept for what runs before the trainer's clock starts (the script, doctor,
imports). Only that: the trainer itself keeps one step, a save and schedule.exit_margin_minutes free
(pretrain/deadline.py), and when it can read the job's end from `qstat -f` the earlier end wins."""

SUBMIT_EXAMPLES = """examples:
  kumihimo pbs submit configs/pretrain/llmjp3-172b.yaml --nodes 32 --profile abci3 --walltime 168:00:00
  kumihimo pbs submit configs/pretrain/llmjp3-1.8b.yaml --nodes 2 --queue rt_HF --project gxx00000 --dry-run
  kumihimo pbs submit configs/pretrain/tiny-cpu.yaml --nodes 1 --gpus-per-node 2 --profile local-cpu

The rendered script is written to OUTPUT_DIR/submit.pbs (output_dir of the recipe) and submitted with
qsub; each job of a chain writes its own log into OUTPUT_DIR (PBS names it JOBNAME.oJOBID). A profile is KEY=value lines sourced inside the
job; its QSUB_QUEUE, QSUB_PROJECT, QSUB_VARIABLES, QSUB_RESOURCES and QSUB_GPU_RESOURCE lines shape the
#PBS lines."""


def register(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="pbs_command", metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter
    submit = commands.add_parser(
        "submit",
        help="render the PBS training script from a recipe and submit it with qsub (or print it)",
        description="Render slurm/train.pbs for a recipe on N nodes (one rank per GPU through mpirun from "
        "$PBS_NODEFILE, or one torch launcher per node), check the parallel layout for that world size, "
        "and submit it with qsub.",
        epilog=SUBMIT_EXAMPLES,
        formatter_class=formatter,
    )
    add_job_shape_arguments(submit)
    submit.add_argument("--walltime", default=None, metavar="HH:MM:SS", help="walltime of each job")
    submit.add_argument("--queue", default=None, help="queue (#PBS -q); default: the profile's QSUB_QUEUE")
    submit.add_argument(
        "--project", default=None, help="project / group to charge (#PBS -P); default: the profile's"
    )
    submit.add_argument("--profile", default=None, help="site profile: a name in slurm/profiles/ or a path")
    submit.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="mpirun",
        help="mpirun: one rank per GPU (as LLM-jp's and Swallow's ABCI scripts); torchrun: one torch "
        "launcher per node starting a process per GPU",
    )
    submit.add_argument(
        "--qsub",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #PBS line, e.g. --qsub='-m n' or --qsub='-l place=scatter:excl'; repeatable",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the script and the qsub command only")
    submit.set_defaults(handler=run_submit)

    add_launch_node_parser(
        commands,
        "node rank and node count from mpirun (one process per node). Used by slurm/train.pbs with "
        "--launcher torchrun.",
        "mpirun -np NODES --npernode 1 kumihimo pbs launch-node --nproc-per-node 8 train CONFIG",
    )


_WALLTIME = re.compile(r"(\d+)(?::(\d+))?(?::(\d+))?", re.ASCII)


def parse_walltime(text: str) -> int:
    """Seconds in a PBS walltime: HH:MM:SS, MM:SS or SS (only the leading field may exceed its unit)."""
    match = _WALLTIME.fullmatch(text)
    if not match:
        raise UserError(f"--walltime={text!r} is not a PBS walltime; write HH:MM:SS, e.g. 168:00:00")
    values = [int(part) for part in match.groups() if part is not None]
    if any(value >= 60 for value in values[1:]):
        raise UserError(f"--walltime={text!r} has minutes or seconds >= 60; write HH:MM:SS, e.g. 48:00:00")
    seconds = sum(value * unit for value, unit in zip(reversed(values), (1, 60, 3600)))
    if seconds < 60 * 2 * STARTUP_MINUTES:
        raise UserError(
            f"--walltime={text!r} leaves no time to train after the {STARTUP_MINUTES}-minute start-up "
            f"margin and a save; give at least {2 * STARTUP_MINUTES} minutes"
        )
    return seconds


def exit_after_minutes(walltime_s: int) -> int:
    """When the trainer should stop by itself, counted from its start: the walltime less the start-up
    before it (STARTUP_MINUTES). The trainer keeps a step, a save and its margin free on top of that
    (deadline.py); this limit and the job's end read from qstat are not added: the earlier one applies."""
    return walltime_s // 60 - STARTUP_MINUTES


_QSUB_OPTION = re.compile(r"-[A-Za-z](\s+\S+)?", re.ASCII)


@dataclass(kw_only=True)
class PbsJob:
    """Everything that goes into the #PBS lines and the top of a rendered script."""

    job_name: str
    nodes: int
    processes_per_node: int
    gpus_per_node: int
    gpu_resource: str
    resources: str
    walltime: str | None
    queue: str | None
    project: str | None
    variables: str | None
    output: Path
    """The folder of the job's log (the run directory)."""
    script: Path
    launcher: str
    options: list[str] = field(default_factory=list)
    profile: Path | None = None
    arguments: list[str] = field(default_factory=list)
    layout: str = ""
    """The parallel layout at the job's world size (`ParallelLayout.describe`), recorded in the header."""

    def directives(self) -> list[str]:
        select = [str(self.nodes), *filter(None, self.resources.split(":"))]
        if self.gpus_per_node:
            select.append(f"{self.gpu_resource}={self.gpus_per_node}")
        lines = [f"-N {self.job_name}", f"-l select={':'.join(select)}"]
        if self.walltime:
            lines.append(f"-l walltime={self.walltime}")
        if self.queue:
            lines.append(f"-q {self.queue}")
        if self.project:
            lines.append(f"-P {self.project}")
        if self.variables:
            lines.append(f"-v {self.variables}")
        # A folder: PBS names each job's log JOBNAME.oJOBID in it, so a chain of jobs keeps every log.
        lines += ["-j oe", f"-o {self.output}/", *self.options]
        return lines


def render(job: PbsJob, environment: dict[str, str]) -> str:
    """A self-contained PBS script: #PBS lines, exported settings, inlined profile, arguments, body."""
    for what, value in (
        ("name", job.job_name),
        ("--queue", job.queue),
        ("--project", job.project),
        ("--walltime", job.walltime),
        ("output_dir", str(job.output)),
        ("--profile QSUB_VARIABLES", job.variables),
        ("--profile QSUB_RESOURCES", job.resources),
        *(("--qsub", option) for option in job.options),
        *(("the argument", argument) for argument in job.arguments),
    ):
        if value is not None:
            refuse_control_characters(what, value)
    out = [
        "#!/bin/bash",
        f"# Rendered by `kumihimo pbs submit` on {datetime.datetime.now().isoformat(timespec='seconds')} "
        f"from {TEMPLATE.name}: {job.nodes} node(s) x {job.processes_per_node} process(es).",
        *(f"#PBS {line}" for line in job.directives()),
    ]
    if job.layout:  # TP/PP/CP/DP and, for a mixture of experts, EP and expert TP
        out.append(f"# layout {job.layout}")
    return "\n".join(out + script_tail(environment, job.profile, job.arguments, TEMPLATE)) + "\n"


def _check_word(what: str, value: str | None) -> None:
    """A queue, project or resource name is one word on its #PBS line."""
    if value is not None and (not value or any(char.isspace() for char in value)):
        raise UserError(f"{what}={value!r} must be one word without blanks (it is written on a #PBS line)")


def pbs_job(args: argparse.Namespace, config, profile: Path | None) -> tuple[PbsJob, dict[str, str]]:
    """The job's shape and exported settings from the CLI, the profile and the recipe."""
    from kumihimo.pretrain.parallel import ParallelLayout

    env = read_profile(profile) if profile else {}
    on_cpu = env.get("KUMIHIMO_DEVICE", "cuda") == "cpu"
    per_node = processes_per_node(args, env, config)
    queue = args.queue if args.queue is not None else env.get("QSUB_QUEUE") or None
    project = args.project if args.project is not None else env.get("QSUB_PROJECT") or None
    for what, value in (
        ("--queue", queue),
        ("--project", project),
        ("--profile QSUB_GPU_RESOURCE", env.get("QSUB_GPU_RESOURCE")),
        ("--profile QSUB_RESOURCES", env.get("QSUB_RESOURCES")),
        ("--profile QSUB_VARIABLES", env.get("QSUB_VARIABLES")),
    ):
        if value is not None:
            refuse_control_characters(what, value)
        _check_word(what, value)
    for option in args.qsub:
        refuse_control_characters("--qsub", option)
        if not _QSUB_OPTION.fullmatch(option):
            raise UserError(
                f"--qsub={option!r} is not a qsub option for a #PBS line; write one letter option and its "
                "value, e.g. --qsub='-m n' or --qsub='-l place=scatter:excl'"
            )
    environment = {"KUMIHIMO_PROCS_PER_NODE": str(per_node), "KUMIHIMO_LAUNCHER": args.launcher}
    arguments = [str(resolve_recipe(args.config, "pretrain").resolve()), *args.overrides]
    if args.walltime is not None:
        refuse_control_characters("--walltime", args.walltime)
        stop_after = exit_after_minutes(parse_walltime(args.walltime))
        if not any(o.startswith("schedule.exit_after_minutes=") for o in args.overrides):
            arguments.append(f"schedule.exit_after_minutes={stop_after}")
    output_dir = Path(config.output_dir).resolve()
    job = PbsJob(
        job_name=config.name,
        nodes=args.nodes,
        processes_per_node=per_node,
        gpus_per_node=0 if on_cpu else per_node,
        gpu_resource=env.get("QSUB_GPU_RESOURCE") or "ngpus",
        resources=env.get("QSUB_RESOURCES", ""),
        walltime=args.walltime,
        queue=queue,
        project=project,
        variables=env.get("QSUB_VARIABLES") or None,
        output=output_dir,
        script=output_dir / "submit.pbs",
        launcher=args.launcher,
        options=list(args.qsub),
        profile=profile,
        arguments=arguments,
        # checked by processes_per_node; recorded so the script says how the ranks are split
        layout=ParallelLayout.from_config(config, args.nodes * per_node).describe(),
    )
    environment["KUMIHIMO_PBS_SCRIPT"] = str(job.script)
    return job, environment


def run_submit(args: argparse.Namespace) -> int:
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig

    config = configtree.load(TrainConfig, args.config, args.overrides)
    profile = find_profile(args.profile) if args.profile else None
    job, environment = pbs_job(args, config, profile)
    script = render(job, environment)
    if args.dry_run:
        print(script, end="")
        print(f"# would run: qsub {shlex.quote(str(job.script))}   (log: {shlex.quote(str(job.output))})")
        return 0
    qsub = shutil.which("qsub")
    if qsub is None:
        raise UserError(
            "qsub is not on PATH; run this on a PBS login node, or use --dry-run to see the script"
        )
    job.script.parent.mkdir(parents=True, exist_ok=True)
    configtree.write_text_atomic(job.script, script)
    proc = subprocess.run([qsub, str(job.script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"qsub refused {job.script}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip()
    print(
        f"submitted job {job_id} ({job.job_name}, {job.nodes} node(s) x {job.processes_per_node}); "
        f"script {job.script}; log {job.output}"
    )
    return 0
