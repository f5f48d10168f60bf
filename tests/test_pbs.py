"""PBS Professional: `kumihimo pbs submit` renders ABCI 3.0-style scripts, and their bodies run for real.

OpenPBS is not packaged in Debian, so the scheduler itself is simulated: the rendered script runs with
the variables PBS gives a job (PBS_NODEFILE, PBS_JOBID, PBS_O_WORKDIR) and starts its ranks with
Debian's Open MPI (`openmpi-bin`, apt-get installed when missing), on this machine and across two
network-namespaced nodes (mpirun reaches each node through an rsh agent that enters its namespace, as
it would ssh to a compute node). `qsub` is a stand-in that records what it was asked to submit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.pbs import exit_after_minutes, parse_walltime, pbs_job, register, render
from kumihimo.pretrain.config import TrainConfig
from kumihimo.slurm import find_profile, node_of_job
from tests.conftest import read_metrics
from tests.slurm_cluster import SYSTEM_PATH

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny-cpu.yaml"
SHORT = ["schedule.train_iters=4", "schedule.lr_warmup_iters=1", "schedule.eval_interval=0"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser)
    return parser.parse_args(["submit", *argv])


def _render(tmp_path: Path, *argv: str, profile: str | None = "abci3", overrides=()) -> str:
    if "--gpus-per-node" not in argv:
        argv = (*argv, "--gpus-per-node", "1")  # tiny-cpu's global batch of 8 fits 1 x 1 or 2 x 1
    args = _args(str(TINY), *overrides, f"output_dir={tmp_path / 'run'}", *argv)
    config = configtree.load(TrainConfig, args.config, args.overrides)
    job, environment = pbs_job(args, config, find_profile(profile) if profile else None)
    return render(job, environment)


def test_abci_script_header(tmp_path):
    script = _render(
        tmp_path, "--nodes", "2", "--gpus-per-node", "1", "--walltime", "48:00:00", "--qsub", "-m n"
    )
    header = [line for line in script.splitlines() if line.startswith("#PBS")]
    assert header == [
        "#PBS -N tiny-cpu",
        "#PBS -l select=2:ncpus=192:ngpus=1",
        "#PBS -l walltime=48:00:00",
        "#PBS -q rt_HF",
        "#PBS -P your-group",
        "#PBS -v RTYPE=rt_HF",
        "#PBS -j oe",
        f"#PBS -o {tmp_path / 'run'}/",
        "#PBS -m n",
    ]
    # 48 h less 3 minutes of start-up: the trainer stops by itself, PBS gives no warning signal
    assert f"set -- {TINY} output_dir={tmp_path / 'run'} schedule.exit_after_minutes=2877" in script
    assert f"export KUMIHIMO_PBS_SCRIPT={tmp_path / 'run' / 'submit.pbs'}" in script
    assert "mpirun --hostfile" in script and "$PBS_NODEFILE" not in script.split("# ---- train.pbs")[0]


def test_options_override_the_profile_and_resource_names_come_from_it(tmp_path):
    profile = tmp_path / "site.env"
    profile.write_text("QSUB_QUEUE=gpu\nQSUB_GPU_RESOURCE=gpus\nKUMIHIMO_GPUS_PER_NODE=4\n")
    args = _args(str(TINY), f"output_dir={tmp_path}", "schedule.global_batch_size=32", "--nodes", "2")
    args.queue, args.project = "debug", "p1"
    config = configtree.load(TrainConfig, args.config, args.overrides)
    job, _ = pbs_job(args, config, profile)
    assert job.directives()[1:4] == ["-l select=2:gpus=4", "-q debug", "-P p1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--queue", "rt_HF\nrm -rf ~"], "control character"),
        (["--qsub", "-m n\n#PBS -q other"], "control character"),
        (["--qsub=--mail"], "not a qsub option"),
        (["--project", "two words"], "one word"),
        (["--walltime", "1:99:00"], "minutes or seconds"),
        (["--walltime", "tomorrow"], "not a PBS walltime"),
        (["--walltime", "00:04:00"], "no time to train"),
        (["--gpus-per-node", "3"], "--nodes=1 x --gpus-per-node=3"),
    ],
)
def test_bad_options_are_refused_in_one_line(tmp_path, argv, message):
    overrides = ["parallelism.tensor_model_parallel_size=2"] if "3" in argv else []
    with pytest.raises(UserError, match=message) as caught:
        _render(tmp_path, "--nodes", "1", *argv, overrides=overrides)
    assert "\n" not in str(caught.value).replace("\\n", "")


def test_an_argument_with_a_newline_is_refused(tmp_path):
    with pytest.raises(UserError, match="control character"):
        _render(tmp_path, "--nodes", "1", overrides=["name=a\nb"])


def test_walltime_arithmetic():
    assert parse_walltime("168:00:00") == 168 * 3600
    assert parse_walltime("90:00") == 5400
    # only the start-up before the trainer: deadline.py keeps a step, a save and its margin free itself
    assert exit_after_minutes(parse_walltime("1:00:00")) == 57
    assert exit_after_minutes(parse_walltime("168:00:00")) == 10080 - 3


def test_launch_node_reads_its_node_from_slurm_or_mpirun():
    assert node_of_job({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2"}) == (4, 2, "7")
    mpirun = {"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "1", "PBS_JOBID": "12.pbs"}
    assert node_of_job(mpirun) == (3, 1, "12.pbs")
    assert node_of_job({}) == (1, 0, "local")


# ------------------------------------------------------------------ the script bodies, run for real


def _install_openmpi() -> str:
    mpirun = shutil.which("mpirun", path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH)
    if mpirun:
        return mpirun
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("Open MPI is not installed and cannot be: installing it needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEM_PATH)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openmpi-bin"]
    if subprocess.run(install, env=env, capture_output=True, text=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"apt-get install openmpi-bin failed: {proc.stderr.strip()[-300:]}")
    return shutil.which("mpirun", path=SYSTEM_PATH)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _job_environment(tmp_path: Path, nodes: list[str], bin_dir: Path) -> dict[str, str]:
    mpirun = _install_openmpi()
    node_file = tmp_path / "nodefile"
    node_file.write_text("".join(f"{node}\n" for node in nodes))
    path = os.pathsep.join(
        [str(bin_dir), str(Path(sys.executable).parent), str(Path(mpirun).parent), SYSTEM_PATH]
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OMPI_", "SLURM_", "PBS_"))}
    return env | {
        "PATH": path,
        "PBS_NODEFILE": str(node_file),
        "PBS_JOBID": "4242.pbs-server",
        "PBS_O_WORKDIR": str(tmp_path),
        # the tests run as root; Open MPI refuses that unless told it is meant
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    }


FAKE_KUMIHIMO = """#!/bin/bash
# stands in for kumihimo: records its arguments and rank, exits as told for `train`
echo "rank=${OMPI_COMM_WORLD_RANK:-?} size=${OMPI_COMM_WORLD_SIZE:-?} master=$MASTER_ADDR:$MASTER_PORT $*" \
  >> "$FAKE_LOG"
if [ "$1" = train ]; then exit "$TRAIN_EXIT"; fi
exit 0
"""
FAKE_QSUB = """#!/bin/bash
echo "qsub $*" >> "$FAKE_LOG"
echo 4243.pbs-server
"""


@pytest.mark.parametrize(("train_exit", "script_exit"), [(3, 0), (5, 0), (4, 4), (0, 0)])
def test_exit_codes_cross_mpirun_and_exits_3_and_5_submit_the_next_job(tmp_path, train_exit, script_exit):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "kumihimo", FAKE_KUMIHIMO)
    _executable(bin_dir / "qsub", FAKE_QSUB)
    script = tmp_path / "job.pbs"
    script.write_text(_render(tmp_path, "--nodes", "1", "--gpus-per-node", "2", profile="local-cpu"))
    env = _job_environment(tmp_path, ["localhost", "localhost"], bin_dir)
    env |= {"FAKE_LOG": str(tmp_path / "calls.log"), "TRAIN_EXIT": str(train_exit)}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == script_exit, proc.stdout + proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    trains = [c for c in calls if " train " in c]
    assert sorted(c.split()[0] for c in trains) == ["rank=0", "rank=1"]
    assert all("size=2 master=localhost:" in c for c in trains)
    assert all("runtime.device=cpu" in c and f"output_dir={tmp_path / 'run'}" in c for c in trains)
    qsubs = [c for c in calls if c.startswith("qsub")]
    if train_exit in (3, 5):  # stopped before the walltime, or a hang ended by the watchdog
        assert qsubs == [f"qsub {tmp_path / 'run' / 'submit.pbs'}"]
        assert "[pbs] submitted 4243.pbs-server" in proc.stdout
    else:
        assert qsubs == []


def test_torchrun_launcher_starts_one_launch_node_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "kumihimo", FAKE_KUMIHIMO)
    script = tmp_path / "job.pbs"
    argv = ("--nodes", "1", "--gpus-per-node", "2", "--launcher", "torchrun")
    script.write_text(_render(tmp_path, *argv, profile="local-cpu"))
    env = _job_environment(tmp_path, ["localhost"], bin_dir) | {
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "TRAIN_EXIT": "0",
    }
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c.split(" ", 3)[3].split(" ", 5)[:5] for c in calls] == [
        ["pbs", "launch-node", "--nproc-per-node", "2", "doctor"],
        ["pbs", "launch-node", "--nproc-per-node", "2", "train"],
    ]


@pytest.mark.slow
def test_pbs_script_trains_across_two_namespaced_nodes(tmp_path):
    """The real script body: mpirun from the first node's namespace starts one gloo rank on each of two
    namespaced nodes (through an rsh agent that enters the node's namespace), doctor checks the
    allocation and the all-reduce, and training runs to its end."""
    from tests.slurm_multinode import _check_can_run, _create_network, _remove_network, remove_stale_networks

    _check_can_run()
    remove_stale_networks()
    tag = str(os.getpid())
    subnet = f"10.213.{os.getpid() % 250}"
    try:
        _bridge, nodes = _create_network(tag, subnet, 2)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        namespaces = " ".join(f"[{n.name}]={n.namespace}" for n in nodes)
        _executable(
            bin_dir / "node-rsh",
            "#!/bin/bash\n# mpirun's rsh agent: run the command on node $1, i.e. in its network namespace\n"
            f"declare -A namespace=({namespaces})\n"
            'host=$1; shift; exec nsenter --net=/run/netns/${namespace[$host]} bash -c "$*"\n',
        )
        profile = tmp_path / "namespaced.env"
        profile.write_text(
            (REPO / "slurm/profiles/local-cpu.env").read_text()
            + f"KUMIHIMO_MASTER_ADDR_COMMAND='echo {nodes[0].address}'\n"
            + f"KUMIHIMO_MPIRUN_OPTIONS='--mca plm_rsh_agent {bin_dir / 'node-rsh'}"
            + f" --mca oob_tcp_if_include {subnet}.0/24 --mca btl_tcp_if_include {subnet}.0/24'\n"
        )
        script = tmp_path / "job.pbs"
        script.write_text(
            _render(tmp_path, "--nodes", "2", "--gpus-per-node", "1", profile=str(profile), overrides=SHORT)
        )
        env = _job_environment(tmp_path, [n.name for n in nodes], bin_dir)
        command = ["nsenter", f"--net=/run/netns/{nodes[0].namespace}", "bash", str(script)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert (
            "[OK  ] allocation          PBS job 4242.pbs-server: 2 node(s) in PBS_NODEFILE, 1 process(es)"
            in log
        )
        assert "gloo all-reduce over 2 rank(s)" in log
        assert "[pbs] training finished" in log
        steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
        assert steps[-1] == 4
    finally:
        _remove_network(tag)


@pytest.mark.parametrize(
    ("script", "arguments", "expected"),
    [
        ("convert.pbs", "to-hf --checkpoint /c --output /h", "convert to-hf --checkpoint /c --output /h"),
        (
            "data_prep.pbs",
            "web.yaml --tokenizer t.model",
            "data run web.yaml --tokenizer t.model num_workers=3",
        ),
    ],
)
def test_data_prep_and_convert_scripts_take_their_arguments_from_qsub_v(
    tmp_path, script, arguments, expected
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "kumihimo", '#!/bin/bash\necho "$*" > "$FAKE_LOG"\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PBS_", "KUMIHIMO_"))}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{SYSTEM_PATH}",
        "PBS_JOBID": "7.pbs",
        "PBS_O_WORKDIR": str(tmp_path),
        "NCPUS": "3",  # what PBS sets from select=1:ncpus=N
        "FAKE_LOG": str(tmp_path / "calls.log"),
    }
    missing = subprocess.run(["bash", str(REPO / "slurm" / script)], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "set KUMIHIMO_ARGS" in missing.stderr
    env["KUMIHIMO_ARGS"] = arguments
    proc = subprocess.run(["bash", str(REPO / "slurm" / script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "calls.log").read_text().strip() == expected
