"""`kumihimo slurm submit --dry-run` renders the job from the recipe; the batch scripts and profiles parse.

No Slurm needed: these run everywhere. tests/test_slurm.py runs the scripts on a real (local) Slurm.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from kumihimo.cli import main
from kumihimo.slurm import PROFILE_DIR, SLURM_DIR, parse_time, read_profile
from tests.conftest import REPO


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["slurm", "submit", *args, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def directives(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines as {key: value} (flags map to "")."""
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M)
    return {key: value for key, value in found}


def test_dry_run_of_the_172b_recipe_on_64_nodes(capsys, tmp_path):
    code, out, err = dry_run(
        capsys,
        "configs/pretrain/llmjp3-172b.yaml",
        "--nodes",
        "64",
        "--profile",
        "h100-ib",
        "--time",
        "48:00:00",
        f"output_dir={tmp_path}/run",
        "schedule.train_iters=300000",
    )
    assert code == 0, err
    sbatch = directives(out)
    assert sbatch["nodes"] == "64" and sbatch["ntasks-per-node"] == "8" and sbatch["gpus-per-node"] == "8"
    assert sbatch["job-name"] == "llmjp3-172b" and sbatch["time"] == "48:00:00"
    assert sbatch["signal"] == "USR1@600" and "requeue" in sbatch and sbatch["open-mode"] == "append"
    assert sbatch["output"] == f"{tmp_path}/run/slurm-%j.out"
    assert sbatch["partition"] == "gpu" and sbatch["account"] == "your-account"  # from the profile's SBATCH_*
    # The cluster environment is inlined, exported (set -a) before the body runs.
    environment = out.split("set -a\n", 1)[1].split("set +a\n", 1)[0]
    for line in (
        "CUDA_DEVICE_MAX_CONNECTIONS=1",
        "NCCL_IB_HCA=mlx5_0:1,",
        "UCX_NET_DEVICES=",
        "NCCL_SOCKET_IFNAME=",
    ):
        assert re.search(rf"^{re.escape(line)}", environment, flags=re.M), line
    # The command: the absolute recipe and the overrides, then doctor and the trainer under srun.
    assert (
        f"set -- {REPO}/configs/pretrain/llmjp3-172b.yaml {'output_dir=' + str(tmp_path)}/run "
        "schedule.train_iters=300000" in out
    )
    assert re.search(r'^"\$\{launch\[@\]\}" kumihimo train "\$config"', out, flags=re.M)
    assert "launch=(srun " in out and "kumihimo doctor --config" in out and "scontrol requeue" in out
    assert f"would run: sbatch {tmp_path}/run/submit.sbatch" in out
    assert not (tmp_path / "run").exists(), "a dry run must not write anything"
    script = tmp_path / "rendered.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_world_size_that_does_not_fit_the_layout_is_refused(capsys):
    code, _, err = dry_run(capsys, "configs/pretrain/llmjp3-172b.yaml", "--nodes", "63")
    assert code == 2
    assert "--nodes=63 x --gpus-per-node=8: world size 504 is not divisible by TP x PP x CP" in err


def test_cpu_profile_asks_for_tasks_not_gpus(capsys, tmp_path):
    code, out, err = dry_run(
        capsys,
        "configs/pretrain/tiny-cpu.yaml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--profile",
        "local-cpu",
        "--time",
        "00:10:00",
        f"output_dir={tmp_path}",
        "parallelism.tensor_model_parallel_size=2",
        "--sbatch=--qos=debug",
    )
    assert code == 0, err
    sbatch = directives(out)
    assert "gpus-per-node" not in sbatch
    assert sbatch["ntasks-per-node"] == "2" and sbatch["cpus-per-task"] == "1" and sbatch["qos"] == "debug"
    assert sbatch["signal"] == "USR1@60", "a short limit gets a tenth of it as warning by default"
    assert "KUMIHIMO_TRAIN_OVERRIDES=runtime.device=cpu" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--time", "00:05:00", "--signal-before", "600"],
            "--signal-before=600 s is not within (0, --time=00:05:00",
        ),
        (["--time", "five minutes"], "is not a Slurm time limit"),
        (["--profile", "no-such-cluster"], "known: abci3, h100-ib, local-cpu"),
        # issue 12 item 9: nothing may inject a line into the script, and times are checked
        (
            ["--sbatch", "--qos=high\necho injected"],
            "--sbatch='--qos=high\\necho injected' holds the control",
        ),
        (["--sbatch", "qos=high"], "--sbatch='qos=high' is not an sbatch option"),
        (["name=job\necho injected"], "the argument 'name=job\\necho injected' holds the control"),
        (['name="job\\necho injected"'], "name='job\\necho injected' holds the control character"),
        (["output_dir=/tmp/run\rx"], "output_dir="),
        (["--signal-before", "-5"], "--signal-before=-5 s must be > 0"),
        (["--signal-before", "0"], "--signal-before=0 s must be > 0"),
        (["--time", "99:99:99"], "--time='99:99:99' has a field out of range"),
        (["--time", "1-24:00:00"], "--time='1-24:00:00' has a field out of range"),
        (["--time", "48:00:00\n"], "is not a Slurm time limit"),
        (["--time", "0"], "--time='0' is no limit at all"),
        # issue 23.10: sbatch splits #SBATCH lines at blanks; --dry-run passed these, sbatch refused them
        (
            ["--sbatch", "--comment=two words"],
            "'--comment=two words' is not an sbatch option sbatch can read",
        ),
    ],
)
def test_bad_submit_options_are_one_line_errors(capsys, args, message):
    code, _, err = dry_run(
        capsys, "configs/pretrain/tiny-cpu.yaml", "--nodes", "1", "--gpus-per-node", "1", *args
    )
    assert code == 2 and message in err and err.count("\n") == 1


def test_parse_time_reads_slurm_formats():
    assert parse_time("48:00:00") == 48 * 3600
    assert parse_time("1-02:00:00") == 26 * 3600
    assert parse_time("1-02:30") == 26 * 3600 + 30 * 60
    assert parse_time("05:30") == 330
    assert parse_time("90") == 90 * 60
    assert parse_time("2-12") == 60 * 3600  # days-hours, as sbatch reads it
    assert parse_time("100:00:00") == 100 * 3600  # only the leading field may exceed its unit


@pytest.mark.parametrize("script", sorted(SLURM_DIR.glob("*.sbatch")), ids=lambda p: p.name)
def test_batch_scripts_are_thin_valid_bash(script: Path):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "set -euo pipefail" in text and "#SBATCH --job-name=" in text
    assert "kumihimo " in text, "each script is one call into kumihimo"


@pytest.mark.parametrize("profile", sorted(PROFILE_DIR.glob("*.env")), ids=lambda p: p.name)
def test_profiles_are_env_files_bash_can_source(profile: Path):
    assert subprocess.run(["bash", "-n", str(profile)]).returncode == 0
    values = read_profile(profile)
    assert values, "a profile sets variables"
    if values.get("KUMIHIMO_DEVICE") != "cpu":
        assert values.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "export NCCL_DEBUG=INFO\x1b[2J",
            "line 2 'export NCCL_DEBUG=INFO\\x1b[2J' holds the control character",
        ),
        ("SBATCH_PARTITION=gpu\r", "holds the control character '\\r'"),
        ("SBATCH_PARTITION='gpu large'", "SBATCH_PARTITION: '--partition=gpu large' is not an sbatch option"),
        ("SBATCH_BAD$=x", None),  # not an assignment: bash runs it, nothing is rendered from it
    ],
)
def test_profile_lines_are_checked_like_every_rendered_value(capsys, tmp_path, line, message):
    """Issue 23.10: a profile line with an escape character was rendered into the script; profile
    SBATCH_* values were not checked."""
    profile = tmp_path / "p.env"
    profile.write_text("KUMIHIMO_DEVICE=cpu\n" + line + "\nKUMIHIMO_CPUS_PER_TASK=1\n", encoding="utf-8")
    code, out, err = dry_run(
        capsys,
        "configs/pretrain/tiny-cpu.yaml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--profile",
        str(profile),
    )
    if message is None:
        assert code == 0, err
    else:
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_the_would_run_line_is_shell_quoted(capsys, tmp_path):
    run = tmp_path / "my run; rm -rf x"
    code, out, _ = dry_run(
        capsys, "configs/pretrain/tiny-cpu.yaml", "--nodes", "1", "--gpus-per-node", "1", f"output_dir={run}"
    )
    last = out.rstrip("\n").splitlines()[-1]
    assert code == 0 and last.startswith("# would run: sbatch ")
    assert shlex.split(last.removeprefix("# would run: ").split("   (logs:")[0]) == [
        "sbatch",
        str(run / "submit.sbatch"),
    ]
