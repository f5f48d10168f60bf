"""Outputs get the permissions a plain write would give under the user's umask (issue 12, item 8).

The atomic writers used mkstemp/mkdtemp, which create files 0600 and folders 0700 whatever the
umask: curated data, blend.yaml, reports, run configs, checkpoint metadata and the `latest` marker
were private to their author, so team members could neither read nor resume a run.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kumihimo.core import configtree, files
from kumihimo.data_prep.jsonl_io import AtomicJsonlWriter
from kumihimo.pretrain.convert.dcp_files import staged_output

# group may read, others may not: neither mkstemp's 0600 nor a hard-coded 0644/0755 passes
UMASK = 0o027


@pytest.fixture
def team_umask():
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root: Path) -> list[str]:
    """Every file under `root` (and `root`) whose mode is not what open()/mkdir() give under UMASK."""
    want_file, want_dir = 0o666 & ~UMASK, 0o777 & ~UMASK
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        want = want_dir if path.is_dir() else want_file
        if mode != want:
            wrong.append(f"{path.relative_to(root.parent)}: {mode:o} (want {want:o})")
    return wrong


def test_umask_is_read_without_changing_it(team_umask):
    assert files.current_umask() == UMASK
    assert files.file_mode() == 0o640 and files.dir_mode() == 0o750
    assert os.umask(UMASK) == UMASK  # still set


def test_atomic_writers_respect_the_umask(tmp_path, team_umask):
    out = tmp_path / "out"
    configtree.write_text_atomic(out / "run_config.yaml", "a: 1\n")  # run configs, checkpoint metadata
    configtree.write_text_atomic(out / "latest_checkpointed_iteration.txt", "100\n")  # the `latest` marker
    files.write_bytes_atomic(out / "blob.bin", b"\0")
    with AtomicJsonlWriter(out / "curated" / "ja.jsonl") as writer:  # curated, dropped, quarantine
        writer.write({"text": "x"})
    files.temp_dir(out, ".staging-").rename(out / "staged")
    with staged_output(out / "converted", "convert to-hf") as staging:  # convert's output folder
        (staging / "model.safetensors").write_bytes(b"")
    assert wrong_modes(out) == []


def test_curated_data_datasets_blend_and_report_are_shared(tmp_path, team_umask):
    from kumihimo.data_prep.pipeline import build_datasets, curate
    from tests.test_data_prep_pipeline import train_tiny_spm, write_corpus

    config = write_corpus(tmp_path / "corpus")
    model = train_tiny_spm(tmp_path)
    curate(config)
    build_datasets(config, model)
    out = Path(config.output_dir)
    assert (out / "blend.yaml").is_file() and (out / "report.json").is_file()
    assert wrong_modes(out) == []


def test_trained_tokenizer_folder_is_shared(tmp_path, team_umask):
    from kumihimo.tokenizer import synthetic
    from kumihimo.tokenizer.train import train_tokenizer
    from tests.test_tokenizer_train import make_config, recipe

    synthetic.write_jsonl(tmp_path / "ja.jsonl", "ja", 300)
    synthetic.write_jsonl(tmp_path / "en.jsonl", "en", 300)
    synthetic.write_jsonl(tmp_path / "code.jsonl", "code", 100)
    data = recipe(tmp_path, tmp_path / "tok", vocab_size=1000, input_sentence_size=1000, required_pieces=[])
    train_tokenizer(make_config(data))
    assert wrong_modes(tmp_path / "tok") == []


@pytest.mark.slow
def test_run_folder_and_checkpoint_are_shared(tmp_path):
    """Run config, metrics, checkpoint metadata and the `latest` marker of a real (2-step, CPU) run."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kumihimo.cli",
            "train",
            "configs/pretrain/tiny-cpu.yaml",
            "schedule.train_iters=2",
            "schedule.lr_warmup_iters=0",
            f"checkpoint.dir={tmp_path}/out/ckpt",
            "checkpoint.save_interval=2",
            f"output_dir={tmp_path}/out/run",
        ],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=300,
        umask=UMASK,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "ckpt" / "latest_checkpointed_iteration.txt").is_file()
    assert wrong_modes(tmp_path / "out") == []
