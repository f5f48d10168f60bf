"""`kumihimo slurm submit|launch-node`: batch jobs rendered from a training recipe.

`submit` turns a recipe plus a node count into a complete batch script: #SBATCH lines for the job's
shape (nodes, one task per GPU, time, name, logs under the run directory), the cluster profile
(slurm/profiles/*.env) inlined, and the body of slurm/train.sbatch (or train-torchrun.sbatch), which
stays the one place that knows how a job runs. The parallel layout is checked for the job's world size before anything is
submitted, so a recipe that cannot run on N nodes fails here with exit code 2, not after the queue wait.

`launch-node` is the per-node launcher of slurm/train-torchrun.sbatch: torch's elastic launcher (the
engine behind torchrun) with a static rendezvous from Slurm's variables, returning the trainer's own
exit code (the torchrun command reports every worker failure as 1, which would hide exit 3 = requeue).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kumihimo.core.errors import UserError
from kumihimo.core.recipes import resolve_recipe, templates_root

SLURM_DIR = templates_root()
"""The shipped batch scripts and profiles (the checkout's slurm/ folder, package data when installed)."""
PROFILE_DIR = SLURM_DIR / "profiles"
LAUNCHERS = {"srun": SLURM_DIR / "train.sbatch", "torchrun": SLURM_DIR / "train-torchrun.sbatch"}
"""The batch script each launcher renders: one srun task per GPU, or one launcher per node."""
DEFAULT_SIGNAL_BEFORE_S = 600
"""Ten minutes between the warning signal and the time limit: enough to finish a step and save a 172B
checkpoint to a parallel file system."""

SUBMIT_EXAMPLES = """examples:
  kumihimo slurm submit configs/pretrain/llmjp3-172b.yaml --nodes 64 --profile h100-ib --time 48:00:00
  kumihimo slurm submit configs/pretrain/llmjp3-1.8b.yaml --nodes 2 --dry-run schedule.train_iters=10000
  kumihimo slurm submit configs/pretrain/tiny-cpu.yaml --nodes 1 --gpus-per-node 2 --profile local-cpu \\
      parallelism.tensor_model_parallel_size=2

The rendered script is written to OUTPUT_DIR/submit.sbatch (output_dir of the recipe) and submitted
with sbatch; logs go to OUTPUT_DIR/slurm-JOBID.out and are appended to when the job is requeued.
A profile is KEY=value lines sourced inside the job (NCCL/UCX settings, KUMIHIMO_VENV, module loads);
its SBATCH_<OPTION> lines become #SBATCH --<option> lines (SBATCH_PARTITION=gpu -> --partition=gpu)."""


def register(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="slurm_command", metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter
    submit = commands.add_parser(
        "submit",
        help="render the training batch script from a recipe and submit it (or print it)",
        description="Render slurm/train.sbatch for a recipe on N nodes (one task per GPU; or "
        "train-torchrun.sbatch), check the parallel layout for that world size, and submit it "
        "with sbatch.",
        epilog=SUBMIT_EXAMPLES,
        formatter_class=formatter,
    )
    add_job_shape_arguments(submit)
    submit.add_argument(
        "--time",
        default=None,
        metavar="[D-]HH:MM:SS",
        help="time limit of each allocation (default: the partition's)",
    )
    submit.add_argument(
        "--signal-before",
        type=int,
        default=None,
        metavar="SECONDS",
        help="send USR1 this long before the time limit so the trainer saves and requeues; "
        f"default {DEFAULT_SIGNAL_BEFORE_S}, or a tenth of a shorter --time (Slurm may "
        "send it up to a minute earlier)",
    )
    submit.add_argument(
        "--profile",
        default=None,
        help="cluster profile: a name in slurm/profiles/ (h100-ib, local-cpu) or a path",
    )
    submit.add_argument(
        "--launcher",
        choices=sorted(LAUNCHERS),
        default="srun",
        help="srun: one task per GPU (slurm/train.sbatch); torchrun: one per-node launcher "
        "starting a process per GPU (slurm/train-torchrun.sbatch)",
    )
    submit.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option, e.g. --sbatch=--qos=high; repeatable",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    submit.set_defaults(handler=run_submit)

    add_launch_node_parser(
        commands,
        "node rank SLURM_NODEID of SLURM_JOB_NUM_NODES. Used by slurm/train-torchrun.sbatch.",
        "srun --ntasks-per-node=1 kumihimo slurm launch-node --nproc-per-node 8 train CONFIG",
    )


def add_job_shape_arguments(submit: argparse.ArgumentParser) -> None:
    """The recipe, its overrides and the job's size: the arguments every `submit` verb takes."""
    submit.add_argument("config", help="training recipe (configs/pretrain/*.yaml)")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, passed to the trainer too")
    submit.add_argument("--nodes", type=int, required=True, help="number of nodes")
    submit.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="processes (GPUs) per node; default: the profile's KUMIHIMO_GPUS_PER_NODE or 8. "
        "With a CPU profile (KUMIHIMO_DEVICE=cpu) these are CPU processes",
    )


def add_launch_node_parser(commands, started_by: str, example: str) -> None:
    """`launch-node`, the per-node launcher of a batch script (Slurm's or PBS's)."""
    launch = commands.add_parser(
        "launch-node",
        help="start this node's processes (torchrun's engine) and return the trainer's exit code",
        description="Run `kumihimo COMMAND ...` in N processes on this node under torch's elastic launcher "
        f"with a static rendezvous at MASTER_ADDR:MASTER_PORT, {started_by}",
        epilog=f"example (inside a job, one launcher per node):\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    launch.add_argument("--nproc-per-node", type=int, required=True, help="processes to start on this node")
    launch.add_argument("command", nargs=argparse.REMAINDER, help="kumihimo verb and its arguments")
    launch.set_defaults(handler=run_launch_node)


# --------------------------------------------------------------------------------------------
# Profiles and times
# --------------------------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def find_profile(name: str) -> Path:
    """A profile by path, or by name in slurm/profiles/."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    named = PROFILE_DIR / f"{name}.env"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.env"))) or "none"
    raise UserError(
        f"--profile={name!r} is neither a file nor a profile in {PROFILE_DIR} (known: {known}); "
        "pass a path or one of those names"
    )


def read_profile(path: Path) -> dict[str, str]:
    """The KEY=value assignments of a profile; other lines (module loads, comments) run in the job only.

    The profile is inlined into the batch script, so a control character in any line (an escape, a
    carriage return of a Windows-edited file) is refused here as in every other rendered value; a tab
    is whitespace to bash and stays allowed."""
    values = {}
    text = path.read_bytes().decode("utf-8")  # not read_text: it would turn a lone \r into a new line
    for number, line in enumerate(text.split("\n"), start=1):
        refuse_control_characters(f"--profile {path} line {number}", line.replace("\t", " "))
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            words = shlex.split(match.group(2), comments=True)
            values[match.group(1)] = words[0] if words else ""
    return values


_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", re.ASCII)


def parse_time(text: str) -> int:
    """Seconds in a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.

    Only the leading field may exceed its unit (48:00:00, 90); 99:99:99 and 1-25:00 are refused
    rather than rendered into a script that sbatch reads differently or rejects after the queue.
    """
    match = _TIME.fullmatch(text)
    if not match:
        raise UserError(f"--time={text!r} is not a Slurm time limit; write [D-]HH:MM:SS, e.g. 48:00:00")
    days, *parts = match.groups()
    values = [int(p) for p in parts if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        units, limits = (3600, 60, 1), (24, 60, 60)
    else:  # a bare number is minutes, as in sbatch; MM:SS; HH:MM:SS
        units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(values)]
        limits = (None, 60, 60)
    if any(limit is not None and value >= limit for value, limit in zip(values, limits)):
        raise UserError(
            f"--time={text!r} has a field out of range (hours < 24 after a day, minutes and seconds < 60); "
            "write [D-]HH:MM:SS, e.g. 48:00:00 or 2-00:00:00"
        )
    seconds = int(days or 0) * 86400 + sum(value * unit for value, unit in zip(values, units))
    if seconds == 0:
        raise UserError(
            f"--time={text!r} is no limit at all (Slurm reads 0 as unlimited), so the save-before-timeout "
            "signal could never come; give a limit, e.g. 48:00:00, or leave --time out for the partition's"
        )
    return seconds


def refuse_control_characters(what: str, value: str) -> None:
    """A value rendered into a batch script must not carry a newline (or any control character): it
    would end its line and run the rest as a shell command."""
    bad = next((i for i, char in enumerate(value) if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0), None)
    if bad is not None:
        raise UserError(
            f"{what}{' ' if ' ' in what else '='}{value!r} holds the control character {value[bad]!r} "
            f"at position {bad}, which would break the batch script line it is written on; remove it"
        )


_SBATCH_OPTION = re.compile(r"--?[a-z][a-z0-9-]*(=\S+)?", re.ASCII)


def check_sbatch_option(what: str, option: str) -> None:
    """An option written on an #SBATCH line: `--name` or `--name=value`, the value without blanks.
    sbatch splits #SBATCH lines at blanks, so `--comment=two words` passed --dry-run and was then
    rejected by sbatch (or read as two options)."""
    if not _SBATCH_OPTION.fullmatch(option):
        raise UserError(
            f"{what}: {option!r} is not an sbatch option sbatch can read from an #SBATCH line "
            "(--name or --name=value, lower-case name, no blanks in the value); fix or remove it"
        )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class JobSpec:
    """Everything that goes into the #SBATCH lines and the top of a rendered script."""

    job_name: str
    template: Path
    """The batch script whose body runs the job."""
    nodes: int
    tasks_per_node: int
    processes_per_node: int
    gpus_per_node: int
    cpus_per_task: int | None
    time: str | None
    signal_before_s: int
    output: Path
    environment: dict[str, str] = field(default_factory=dict)
    """Exported before the profile (the per-node launcher's process count)."""
    options: list[str] = field(default_factory=list)
    """Further sbatch options (from the profile's SBATCH_* lines and --sbatch)."""
    profile: Path | None = None
    arguments: list[str] = field(default_factory=list)
    """The script's arguments: the recipe and its overrides."""
    layout: str = ""
    """The parallel layout at the job's world size (`ParallelLayout.describe`), recorded in the header."""

    def directives(self) -> list[str]:
        lines = [
            f"--job-name={self.job_name}",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.tasks_per_node}",
        ]
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            lines.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.time:
            lines.append(f"--time={self.time}")
        lines += [
            "--exclusive",
            "--requeue",
            f"--signal=USR1@{self.signal_before_s}",
            "--open-mode=append",
            f"--output={self.output}",
            *self.options,
        ]
        return lines


def script_body(template: Path) -> str:
    """The part of a batch script after its #SBATCH or #PBS block (the header is what `submit` renders)."""
    lines = template.read_text(encoding="utf-8").splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith(("#SBATCH", "#PBS")))
    return "".join(lines[last + 1 :])


# What the user sets for each JobSpec field that is written into the script (for error messages).
_RENDERED_FROM = {
    "job_name": "name",
    "time": "--time",
    "output": "output_dir",
    "options": "--sbatch (or a profile's SBATCH_* line)",
    "environment": "--gpus-per-node",
    "arguments": "the argument",
}


def render(spec: JobSpec) -> str:
    """A self-contained batch script: header, inlined profile, arguments, then the template's body."""
    for name, what in _RENDERED_FROM.items():
        value = getattr(spec, name)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in items:
            if item is not None:
                refuse_control_characters(what, str(item))
    out = [
        "#!/bin/bash",
        f"# Rendered by `kumihimo slurm submit` on {datetime.datetime.now().isoformat(timespec='seconds')} "
        f"from {spec.template.name}: {spec.nodes} node(s) x {spec.processes_per_node} process(es).",
        *(f"#SBATCH {line}" for line in spec.directives()),
    ]
    if spec.layout:  # TP/PP/CP/DP and, for a mixture of experts, EP and expert TP
        out.append(f"# layout {spec.layout}")
    return "\n".join(out + script_tail(spec.environment, spec.profile, spec.arguments, spec.template)) + "\n"


def script_tail(
    environment: dict[str, str], profile: Path | None, arguments: list[str], template: Path
) -> list[str]:
    """What follows a rendered script's header, for Slurm and PBS alike: the exported settings, the
    profile inlined (rather than sourced, so the script in the run directory records the exact
    environment), the recipe and its overrides as the script's arguments, then the template's body."""
    out = [f"export {key}={shlex.quote(value)}" for key, value in environment.items()]
    if profile:
        out += [
            f"# ---- cluster profile {profile} ----",
            "set -a",
            profile.read_text(encoding="utf-8").rstrip("\n"),
            "set +a",
            "unset KUMIHIMO_PROFILE",
        ]
    return out + [
        "# ---- recipe and overrides ----",
        "set -- " + shlex.join(arguments),
        f"# ---- {template.name} ----",
        script_body(template).rstrip("\n"),
    ]


def processes_per_node(args: argparse.Namespace, env: dict[str, str], config) -> int:
    """Processes per node (--gpus-per-node, else the profile's), refused unless the recipe's parallel
    layout fits --nodes x that many processes."""
    from kumihimo.pretrain.parallel import ParallelLayout

    per_node = (
        args.gpus_per_node if args.gpus_per_node is not None else int(env.get("KUMIHIMO_GPUS_PER_NODE", 8))
    )
    if args.nodes < 1 or per_node < 1:
        raise UserError(f"--nodes={args.nodes} and --gpus-per-node={per_node} must both be >= 1")
    try:
        ParallelLayout.from_config(config, args.nodes * per_node)
    except UserError as exc:
        raise UserError(f"--nodes={args.nodes} x --gpus-per-node={per_node}: {exc}") from exc
    return per_node


def job_spec(args: argparse.Namespace, config, profile: Path | None) -> JobSpec:
    """The job's shape from the CLI, the profile and the recipe, refusing what cannot run."""
    from kumihimo.pretrain.parallel import ParallelLayout

    env = read_profile(profile) if profile else {}
    on_cpu = env.get("KUMIHIMO_DEVICE", "cuda") == "cpu"
    per_node = processes_per_node(args, env, config)
    signal_before = DEFAULT_SIGNAL_BEFORE_S if args.signal_before is None else args.signal_before
    if signal_before <= 0:
        raise UserError(
            f"--signal-before={signal_before} s must be > 0: the trainer needs the warning before the time "
            f"limit to save; leave it out for the default ({DEFAULT_SIGNAL_BEFORE_S} s)"
        )
    for option in args.sbatch:
        refuse_control_characters("--sbatch", option)
        if not option.startswith("-"):
            raise UserError(f"--sbatch={option!r} is not an sbatch option; write it as --sbatch=--qos=high")
        check_sbatch_option("--sbatch", option)
    if args.time is not None:
        limit_s = parse_time(args.time)
        if args.signal_before is None:
            signal_before = min(DEFAULT_SIGNAL_BEFORE_S, limit_s // 10)
        if not 0 < signal_before < limit_s:
            raise UserError(
                f"--signal-before={signal_before} s is not within (0, --time={args.time} = {limit_s} s); "
                "the job would be told to stop at once or never; choose a value in that range"
            )
    options = [
        f"--{key[len('SBATCH_') :].lower().replace('_', '-')}={value}"
        for key, value in env.items()
        if key.startswith("SBATCH_") and value
    ]
    for key, option in zip(
        [k for k, v in env.items() if k.startswith("SBATCH_") and v], options, strict=True
    ):
        check_sbatch_option(f"--profile {profile} {key}", option)
    per_node_launcher = args.launcher == "torchrun"
    cpus = int(env["KUMIHIMO_CPUS_PER_TASK"]) if env.get("KUMIHIMO_CPUS_PER_TASK") else None
    if cpus and per_node_launcher:
        cpus *= per_node  # one task holds every process of its node
    output_dir = Path(config.output_dir).resolve()
    return JobSpec(
        job_name=config.name,
        template=LAUNCHERS[args.launcher],
        nodes=args.nodes,
        tasks_per_node=1 if per_node_launcher else per_node,
        processes_per_node=per_node,
        gpus_per_node=0 if on_cpu else per_node,
        cpus_per_task=cpus,
        time=args.time,
        signal_before_s=signal_before,
        output=output_dir / "slurm-%j.out",
        environment={"KUMIHIMO_PROCS_PER_NODE": str(per_node)} if per_node_launcher else {},
        options=[*options, *args.sbatch],
        profile=profile,
        # the file the recipe argument names from here (a shipped name, or configs/... outside the checkout)
        arguments=[str(resolve_recipe(args.config, "pretrain").resolve()), *args.overrides],
        # checked by processes_per_node; recorded so the script says how the ranks are split
        layout=ParallelLayout.from_config(config, args.nodes * per_node).describe(),
    )


def run_submit(args: argparse.Namespace) -> int:
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig

    config = configtree.load(TrainConfig, args.config, args.overrides)
    profile = find_profile(args.profile) if args.profile else None
    spec = job_spec(args, config, profile)
    script = render(spec)
    output_dir = spec.output.parent
    path = output_dir / "submit.sbatch"
    if args.dry_run:
        print(script, end="")
        print(f"# would run: sbatch {shlex.quote(str(path))}   (logs: {shlex.quote(str(spec.output))})")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(
            "sbatch is not on PATH; run this on a Slurm login node, or use --dry-run to see the script"
        )
    output_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    configtree.write_text_atomic(path, script)
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch refused {path}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(
        f"submitted job {job_id} ({spec.job_name}, {spec.nodes} node(s) x {spec.processes_per_node}); "
        f"script {path}; log {str(spec.output).replace('%j', job_id)}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# Per-node launcher (slurm/train-torchrun.sbatch)
# --------------------------------------------------------------------------------------------


def node_of_job(env) -> tuple[int, int, str]:
    """(node count, this node's rank, job id) of a launcher started once per node: by srun under Slurm,
    or by mpirun with one process per node (slurm/train.pbs under PBS)."""
    if "SLURM_JOB_ID" in env or "SLURM_NODEID" in env:
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        return nodes, int(env.get("SLURM_NODEID", "0")), env.get("SLURM_JOB_ID", "local")
    if "OMPI_COMM_WORLD_SIZE" in env:
        job = env.get("PBS_JOBID", "local")
        return int(env["OMPI_COMM_WORLD_SIZE"]), int(env.get("OMPI_COMM_WORLD_RANK", "0")), job
    return 1, 0, "local"


def run_launch_node(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    command = [word for word in args.command if word != "--"]
    if not command:
        raise UserError(
            "launch-node needs a kumihimo command, e.g. `launch-node --nproc-per-node 8 train CONFIG`"
        )
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
    num_nodes, node_rank, job_id = node_of_job(os.environ)
    if num_nodes > 1 and "MASTER_PORT" not in os.environ:
        raise UserError(
            "MASTER_ADDR/MASTER_PORT are not set; launch-node runs inside slurm/train-torchrun.sbatch "
            "or slurm/train.pbs"
        )
    endpoint = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    config = LaunchConfig(
        min_nodes=num_nodes,
        max_nodes=num_nodes,
        nproc_per_node=args.nproc_per_node,
        run_id=job_id,
        rdzv_backend="static",
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": node_rank},
        max_restarts=0,
        monitor_interval=1,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Slurm's warning signal reaches every process of the step. The trainers catch it and save; this
    # launcher must outlive them to collect their exit codes, so it ignores it (the workers inherit the
    # ignore until the trainer installs its handler, so a signal during start-up is not fatal either).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        elastic_launch(config, sys.executable)("-m", "kumihimo.cli", *command)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
        print(f"[launch-node] rank {rank} exited with {code}; returning it", file=sys.stderr)
        return code
    return 0
