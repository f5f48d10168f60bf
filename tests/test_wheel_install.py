"""A non-editable wheel install runs the shipped recipes by name, from a folder that is not the checkout.

The wheel is built from a copy of the files git tracks or would track (so the checkout gets no build/ folder) and installed
without dependencies into a new virtual environment that borrows this environment's site-packages
(torch, megatron-core, ...) through a .pth line, never this environment's editable kumihimo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _copy_tracked(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, files.decode().split("\0")):
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    _copy_tracked(work / "src")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "dist"),
            str(work / "src"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (work / "dist").glob("kumihimo-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # A PYTHONPATH naming a checkout with an editable install's kumihimo.egg-info makes pip take the
    # wheel as installed already and skip it.
    clean_env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin/python"),
            "install",
            "--no-deps",
            str(wheel),
        ]
        if _pip_has_python_option()
        else [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return venv


def _pip_has_python_option() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout
    major, minor = (int(x) for x in out.split()[1].split(".")[:2])
    return (major, minor) >= (22, 3)


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_the_stages_recipes_and_batch_scripts(wheel_env, tmp_path):
    code = (
        "import kumihimo, kumihimo.data_prep, kumihimo.pretrain.convert, kumihimo.tokenizer\n"
        "from kumihimo.core.recipes import shipped_recipe, templates_root\n"
        "print(kumihimo.__file__)\n"
        "print(shipped_recipe('pretrain', 'llmjp3-172b').is_file(), (templates_root() / 'train.sbatch').is_file(),"
        " (templates_root() / 'profiles' / 'h100-ib.env').is_file())"
    )
    proc = _run(wheel_env, tmp_path, str(wheel_env / "bin/python"), "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    location, found = proc.stdout.splitlines()
    assert Path(location).is_relative_to(wheel_env) and not Path(location).is_relative_to(REPO), location
    assert found == "True True True"


def test_wheel_runs_a_shipped_recipe_by_name_from_another_folder(wheel_env, tmp_path):
    proc = _run(wheel_env, tmp_path, str(wheel_env / "bin/kumihimo"), "train", "tiny-cpu", "--check")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "TP=1 PP=1 CP=1 DP=1" in proc.stdout
    proc = _run(
        wheel_env,
        tmp_path,
        str(wheel_env / "bin/kumihimo"),
        "train",
        "configs/pretrain/tiny-cpu.yaml",
        "--check",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(wheel_env, tmp_path, str(wheel_env / "bin/kumihimo"), "quickstart", "--help")
    assert proc.returncode == 0 and "usage: kumihimo quickstart" in proc.stdout, proc.stderr[-3000:]
    proc = _run(
        wheel_env,
        tmp_path,
        str(wheel_env / "bin/kumihimo"),
        "slurm",
        "submit",
        "llmjp3-1.8b",
        "--nodes",
        "2",
        "--dry-run",
    )
    assert proc.returncode == 0 and "#SBATCH" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_unknown_recipe_name_lists_the_shipped_ones(wheel_env, tmp_path):
    proc = _run(wheel_env, tmp_path, str(wheel_env / "bin/kumihimo"), "train", "tiny-gpu", "--check")
    assert proc.returncode == 2
    assert "is not a shipped pretrain recipe" in proc.stderr and "tiny-cpu" in proc.stderr, proc.stderr
