"""The trainer never trains on, resumes into or publishes the wrong thing without a word (issue 12).

Each test is one way a hostile or careless user got a silent wrong result before: another tokenizer
than the data's (at start and at resume), a NaN state saved as `latest` with good checkpoints pruned,
re-tokenized data / another split / another sequence length / another model accepted at resume, corrupt
datasets found only mid-run, NaN/Inf config values and unusable output folders passed as valid, a full
disk, and a killed run's background writer living on.

Runs are the real `kumihimo train` CLI on the tiny CPU recipe with a 1000-piece tokenizer and a small
synthetic dataset written with data_prep's own writer; the resume cases share one trained run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.data_prep.blend import BlendEntry, write_blend
from kumihimo.data_prep.indexed import IndexedDatasetWriter
from kumihimo.pretrain import checkpoint_format, checkpointing, data_inspection, integrity, preflight
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.signals import EXIT_BAD_LOSS
from tests.conftest import REPO, run_cli

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = ("schedule.lr_warmup_iters=1", "schedule.eval_interval=0", "logging.log_interval=1")


def write_dataset(prefix: Path, seed: int, num_docs: int = 120) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 200, num_docs)
    writer = IndexedDatasetWriter(prefix, vocab_size=1000)
    writer.add_documents(rng.integers(4, 1000, int(lengths.sum())), lengths)
    writer.finish()


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def train(run_dir: Path, *overrides: str, timeout: float = 300):
    return run_cli(
        "train",
        TINY,
        *BASE,
        f"output_dir={run_dir}",
        f"checkpoint.dir={run_dir}/ckpt",
        *overrides,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def tokenizers(work) -> tuple[Path, Path]:
    """Two tokenizers of the same vocabulary size trained on different text."""
    from kumihimo.tokenizer.base import load_tokenizer
    from tests.test_convert_to_hf import train_spm

    a, b = train_spm(work / "tok_a", seed=1), train_spm(work / "tok_b", seed=2)
    assert load_tokenizer(a).vocab_size == load_tokenizer(b).vocab_size
    assert load_tokenizer(a).sha256 != load_tokenizer(b).sha256
    return a, b


@pytest.fixture(scope="module")
def blend_file(work, tokenizers) -> Path:
    """blend.yaml over one dataset made with tokenizer a, as `kumihimo data tokenize` writes it."""
    from kumihimo.tokenizer.base import load_tokenizer

    prefix = work / "data" / "web"
    write_dataset(prefix, seed=0)
    path = work / "data" / "blend.yaml"
    write_blend(path, [BlendEntry("web", prefix, 20000, 120, 1.0)], load_tokenizer(tokenizers[0]).identity())
    return path


@pytest.fixture(scope="module")
def trained(work, tokenizers) -> tuple[Path, Path, tuple[str, ...]]:
    """(run dir, dataset prefix, overrides): 2 steps on an inline data.blend (which records no
    tokenizer, so only the checkpoint can tell), saved at the end."""
    prefix = work / "resume_data" / "web"
    write_dataset(prefix, seed=0)
    run_dir = work / "trained"
    overrides = (f"data.blend=[{{prefix: {prefix}, weight: 1.0}}]", "data.mock=false", "data.split=90,10,0")
    proc = train(run_dir, *overrides, f"data.tokenizer={tokenizers[0]}", "schedule.train_iters=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, prefix, overrides


# ------------------------------------------------------------------ 1. tokenizer provenance


def test_training_refuses_data_made_with_another_tokenizer(work, tokenizers, blend_file):
    from kumihimo.tokenizer.base import load_tokenizer

    proc = train(
        work / "other_tok",
        f"data.blend_file={blend_file}",
        "data.mock=false",
        f"data.tokenizer={tokenizers[1]}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert (
        load_tokenizer(tokenizers[0]).sha256[:12] in line
        and load_tokenizer(tokenizers[1]).sha256[:12] in line
    )
    assert f"set data.tokenizer={tokenizers[0]}" in line
    assert not (work / "other_tok" / "ckpt" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.slow
def test_resume_refuses_another_tokenizer(trained, tokenizers):
    from kumihimo.tokenizer.base import load_tokenizer

    run_dir, _prefix, overrides = trained
    proc = train(run_dir, *overrides, f"data.tokenizer={tokenizers[1]}", "schedule.train_iters=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert "trained with tokenizer sha256" in line and f"resume with data.tokenizer={tokenizers[0]}" in line
    assert (
        load_tokenizer(tokenizers[0]).sha256[:12] in line
        and load_tokenizer(tokenizers[1]).sha256[:12] in line
    )
    assert checkpoint_format.read_latest(run_dir / "ckpt") == 2


# ---------------------------------------------------------------- 3. resume data fingerprint


@pytest.mark.slow
def test_resume_refuses_another_split_and_sequence_length(trained, tokenizers):
    run_dir, _prefix, overrides = trained
    proc = train(
        run_dir, *overrides, f"data.tokenizer={tokenizers[0]}", "schedule.train_iters=3", "data.split=80,20,0",
        "model.seq_length=64",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(
        "kumihimo: error: the data changed since iter_0000002: split '90,10,0' -> '80,20,0'; "
    )
    assert "seq_length 128 -> 64" in line and "checkpoint.allow_data_change=true" in line


@pytest.mark.slow
def test_resume_refuses_retokenized_data_unless_allowed(trained, tokenizers):
    """Other text tokenized into the same prefix: refused; with checkpoint.allow_data_change it warns,
    continues, and Megatron's index cache is rebuilt (keyed by the new fingerprint), not reused."""
    run_dir, prefix, overrides = trained
    backup = prefix.parent.with_name("backup")
    shutil.copytree(prefix.parent, backup)
    try:
        write_dataset(prefix, seed=7, num_docs=130)
        args = (*overrides, f"data.tokenizer={tokenizers[0]}", "schedule.train_iters=3")
        caches = set((run_dir / "data_cache").glob("data-*"))
        proc = train(run_dir, *args)
        assert len(set((run_dir / "data_cache").glob("data-*")) - caches) == 1  # not the stale cache
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "re-tokenized" in last_line(proc.stderr) and "num_documents 121 -> 131" in last_line(
            proc.stderr
        )

        proc = train(run_dir, *args, "checkpoint.allow_data_change=true", "checkpoint.save_at_end=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "warning: data changed since iter_0000002" in proc.stderr
    finally:
        shutil.rmtree(prefix.parent)
        backup.rename(prefix.parent)


def test_fingerprint_comparison_names_each_change():
    entry = {"prefix": "/d/web", "dtype_code": 8, "num_sequences": 3, "num_documents": 4, "idx_bytes": 94}
    entry |= {"bin_bytes": 60, "idx_sample_sha256": "x", "weight": 1.0}
    saved = {"tokenizer_sha256": "a" * 64, "mock": False, "split": "98,2,0", "seq_length": 128, "seed": 1}
    saved["datasets"] = [entry]
    assert data_inspection.compare_fingerprints(saved, saved) == (None, [], [])
    moved = {**saved, "datasets": [{**entry, "prefix": "/e/web"}]}
    assert data_inspection.compare_fingerprints(saved, moved) == (
        None,
        [],
        ["/d/web moved to /e/web (same contents)"],
    )
    changed = {**saved, "seq_length": 64, "datasets": [{**entry, "weight": 0.5, "bin_bytes": 62}]}
    tokenizer, changes, _ = data_inspection.compare_fingerprints(saved, changed)
    assert tokenizer is None
    assert changes == [
        "seq_length 128 -> 64",
        "/d/web: bin_bytes 60 -> 62 (re-tokenized)",
        "/d/web: blend weight 1.0 -> 0.5",
    ]
    tokenizer, _, _ = data_inspection.compare_fingerprints(saved, {**saved, "tokenizer_sha256": "b" * 64})
    assert tokenizer == "tokenizer sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb"


# ------------------------------------------------------------------- 7. model shape at resume


def test_resume_refuses_another_model_shape(trained, tokenizers):
    run_dir, _prefix, overrides = trained
    proc = train(
        run_dir, *overrides, f"data.tokenizer={tokenizers[0]}", "schedule.train_iters=3", "model.num_layers=2"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CheckpointingException" not in proc.stderr
    assert "holds another model shape (model.num_layers 4 -> 2)" in last_line(proc.stderr)


# ------------------------------------------------------------------------ 5. corrupt datasets


def corrupt_copies(folder: Path) -> list[str]:
    """A good prefix and four broken ones: truncated .bin, truncated .idx, bad header, missing .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["good", "short_bin", "short_idx", "bad_header", "no_bin"]
    for i, name in enumerate(names):
        write_dataset(folder / name, seed=i, num_docs=30)
    with open(folder / "short_bin.bin", "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 100)
    with open(folder / "short_idx.idx", "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 8)
    with open(folder / "bad_header.idx", "r+b") as handle:
        handle.write(b"NOTANIDX")
    (folder / "no_bin.bin").unlink()
    return [str(folder / n) for n in names]


def test_corrupt_datasets_are_listed_one_line_each(tmp_path):
    prefixes = corrupt_copies(tmp_path)
    with pytest.raises(UserError) as caught:
        data_inspection.check_datasets(prefixes, "blend.yaml")
    lines = str(caught.value).splitlines()
    assert lines[0] == "4 problem(s) with the datasets of blend.yaml:"
    assert "short_bin.bin is 7190 bytes but short_bin.idx indexes 7290: truncated" in lines[1]
    assert "short_idx.idx is" in lines[2] and "truncated or corrupt" in lines[2]
    assert "bad_header.idx is not a Megatron index" in lines[3]
    assert lines[4].strip().startswith(f"{tmp_path}/no_bin.bin is missing")
    assert all("kumihimo data tokenize" in line for line in lines[1:])
    infos = data_inspection.check_datasets(prefixes[:1], "x")
    assert infos[0]["num_documents"] == 31 and infos[0]["bin_bytes"] > 0


def test_training_refuses_corrupt_datasets_before_building_the_model(work, tokenizers):
    from kumihimo.tokenizer.base import load_tokenizer

    prefixes = corrupt_copies(work / "corrupt")
    blend = work / "corrupt" / "blend.yaml"
    entries = [BlendEntry(Path(p).name, Path(p), 1000, 30, 1.0) for p in prefixes]
    write_blend(blend, entries, load_tokenizer(tokenizers[0]).identity())
    proc = train(
        work / "corrupt_run", f"data.blend_file={blend}", "data.mock=false", f"data.tokenizer={tokenizers[0]}"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "4 problem(s) with the datasets of" in proc.stderr and "Traceback" not in proc.stderr
    assert "parameters on the most loaded rank" not in proc.stderr  # refused before the model was built


# ------------------------------------------------------------------ 7. one-line config errors


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.weight_decay=.nan", "optimizer.weight_decay=nan is not a finite number"),
        ("optimizer.adam_eps=nan", "optimizer.adam_eps='nan' is not a finite number"),
        ("optimizer.clip_grad=.nan", "optimizer.clip_grad=nan is not a finite number"),
        ("optimizer.lr=.inf", "optimizer.lr=inf is not a finite number"),
        ("optimizer.lr=.nan", "optimizer.lr=nan is not a finite number"),
        ("logging.peak_tflops=-.inf", "logging.peak_tflops=-inf is not a finite number"),
        ("optimizer.adam_eps=0", "optimizer.adam_eps=0.0 must be > 0"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 is negative"),
    ],
)
def test_non_finite_and_out_of_range_floats_are_refused(override, message):
    with pytest.raises(configtree.ConfigError) as caught:
        configtree.load(TrainConfig, TINY, [override])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_unusable_output_folders_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for key in ("output_dir", "checkpoint.dir", "data.cache_dir"):
        for path, problem in ((a_file, "is a file, not a folder"), (a_file / "sub", "which is a file")):
            config = configtree.load(TrainConfig, TINY, [f"{key}={path}"])
            with pytest.raises(UserError, match=problem):
                preflight.check_paths(config)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: every folder is writable")
    with pytest.raises(UserError, match="is not writable"):
        preflight.check_paths(configtree.load(TrainConfig, TINY, [f"checkpoint.dir={locked}/ckpt"]))


def test_convert_refuses_a_file_as_output(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args in (
        ("to-hf", "--checkpoint", str(tmp_path), "--output", str(a_file / "hf")),
        ("from-hf", "--model", str(tmp_path), "--output", str(a_file)),
    ):
        proc = run_cli("convert", *args, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and f"--output={str(a_file)!r}"[:20] in last_line(proc.stderr)


# ------------------------------------------------------------------------ 2. NaN checkpoints


@pytest.mark.slow
def test_non_finite_state_is_never_saved_and_good_checkpoints_survive(tmp_path):
    """A weight turns NaN during step 3 (as optimizer.lr=inf did): step 3 is not saved, the run stops
    with the bad-loss code, `latest` stays at step 2 and keep_last=1 did not prune it."""
    proc = helper("poison", tmp_path)
    assert proc.returncode == EXIT_BAD_LOSS, proc.stderr[-3000:]
    root = tmp_path / "ckpt"
    assert checkpoint_format.read_latest(root) == 2
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000002"]
    assert (
        "not saving step 3: 1 of" in proc.stderr
        and "nothing written, latest stays iter_0000002" in proc.stderr
    )
    assert f"newest checkpoint: {root / 'iter_0000002'}" in proc.stderr


def test_finite_check_sees_nan_and_inf_in_every_float_dtype():
    import torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for value, finite in (
            (0.5, True),
            (float("nan"), False),
            (float("inf"), False),
            (-float("inf"), False),
        ):
            tensor = torch.randn(64).to(dtype)
            tensor[9] = value
            assert bool(integrity.is_finite(tensor)) is finite, (dtype, value)


# ------------------------------------------------------------------------------ 6. disk full


@pytest.mark.slow
def test_full_disk_is_refused_before_saving_and_latest_stays(tmp_path, trained, small_disk):
    size = integrity.folder_bytes(trained[0] / "ckpt" / "iter_0000002")
    disk = small_disk(int(size * 1.6))
    proc = run_cli(
        "train", TINY, *BASE, "schedule.train_iters=3", "checkpoint.save_interval=1", "checkpoint.keep_last=null",
        f"output_dir={tmp_path}/run", f"checkpoint.dir={disk}", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"kumihimo: error: disk full at {disk}") and "latest stays iter_0000001" in line
    assert checkpoint_format.read_latest(disk) == 1 and not list(disk.glob("*.tmp"))


@pytest.mark.slow
def test_full_disk_frees_itself_by_pruning_first(tmp_path, trained, small_disk):
    """keep_last=2 on a disk that holds 2.6 checkpoints: before the third save the oldest is pruned
    (never `latest`), so the run completes instead of failing on the full disk."""
    size = integrity.folder_bytes(trained[0] / "ckpt" / "iter_0000002")
    disk = small_disk(int(size * 2.6))
    proc = run_cli(
        "train", TINY, *BASE, "schedule.train_iters=4", "checkpoint.save_interval=1", "checkpoint.keep_last=2",
        f"output_dir={tmp_path}/run", f"checkpoint.dir={disk}", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disk nearly full: pruned iter_0000001 before saving" in proc.stderr
    assert sorted(p.name for p in disk.glob("iter_*")) == ["iter_0000003", "iter_0000004"]


@pytest.mark.slow
def test_enospc_during_a_save_keeps_latest(tmp_path):
    """The shard writer fails with ENOSPC in the step-2 save: one line, its folder removed, latest=1."""
    proc = helper("enospc", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disk full at" in proc.stdout and "latest stays iter_0000001" in proc.stdout
    assert checkpoint_format.read_latest(tmp_path / "ckpt") == 1 and not list(
        (tmp_path / "ckpt").glob("*.tmp")
    )


@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"], ids=["sync", "async"])
def test_enospc_inside_a_shard_write_is_one_line_and_keeps_latest(tmp_path, small_disk, async_save):
    """The disk fills up (another writer) after the free-space check of the step-2 save: the kernel's
    ENOSPC inside megatron-core's shard writer ends the run with the one-line `disk full` and the user
    error code, its iter_0000002.tmp removed and `latest` still 1."""
    disk = small_disk(40 * 2**20)
    proc = helper("fill_disk", tmp_path, str(disk), async_save)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"kumihimo: error: disk full at {disk}") and "latest stays iter_0000001" in line
    assert "Traceback" not in proc.stderr
    assert checkpoint_format.read_latest(disk) == 1 and not list(disk.glob("*.tmp"))


# --------------------------------------------------------------------------- 4. killed runs


def test_second_run_on_a_live_lock_is_refused_and_leftovers_are_cleaned(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "kumihimo"])
    while b"kumihimo" not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
        time.sleep(0.01)
    try:
        lock = tmp_path / checkpoint_format.LOCK_FILE
        lock.write_text(f'{{"host": "{os.uname().nodename}", "pid": {holder.pid}}}\n')
        with pytest.raises(UserError, match=f"another training run \\(pid {holder.pid} on "):
            checkpointing.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "iter_0000005.tmp").mkdir()
    (tmp_path / f".{checkpoint_format.LATEST_FILE}.abc123").write_text("5")
    run_lock = checkpointing.RunLock(tmp_path)
    assert run_lock.acquire() is None  # the holder is dead: its lock is stale
    assert sorted(p.name for p in checkpointing.clean_leftovers(tmp_path)) == [
        f".{checkpoint_format.LATEST_FILE}.abc123",
        "iter_0000005.tmp",
    ]
    run_lock.release()
    assert not lock.exists()


@pytest.mark.slow
def test_async_writer_dies_with_a_killed_trainer(tmp_path):
    """kill -9 of the trainer while its background writer is still writing: the writer goes too."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.test_pretrain_integrity", "slow_async", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pid_file = tmp_path / "writer.pid"
    deadline = time.monotonic() + 180
    while not pid_file.is_file():
        assert time.monotonic() < deadline and child.poll() is None, "the save did not start"
        time.sleep(0.1)
    writer = int(pid_file.read_text())
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{writer}").exists() and b"Z" not in _state(writer):
        if time.monotonic() > deadline:
            os.kill(writer, signal.SIGKILL)
            pytest.fail("the async checkpoint writer outlived the killed trainer")
        time.sleep(0.1)


@pytest.mark.slow
def test_nothing_a_killed_trainer_started_outlives_it(tmp_path):
    """kill -9 of a one-process trainer after its first save: every process it started (megatron-core's
    write-results Manager, multiprocessing's resource tracker) is gone too. The saves print no
    deprecation warning."""
    import psutil

    child = subprocess.Popen(
        [sys.executable, "-m", "kumihimo.cli", "train", TINY, *BASE, "schedule.train_iters=200",
         "checkpoint.save_interval=1", f"output_dir={tmp_path}", f"checkpoint.dir={tmp_path}/ckpt"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.txt").open("w"),  # a pipe would stay open in a surviving child
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while checkpoint_format.read_latest(tmp_path / "ckpt") is None:
        assert time.monotonic() < deadline and child.poll() is None, "no checkpoint was saved"
        time.sleep(0.1)
    started = psutil.Process(child.pid).children(recursive=True)
    child.send_signal(signal.SIGKILL)
    child.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    deadline = time.monotonic() + 15
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for leftover in alive:
        leftover.kill()
    assert not alive, f"outlived the killed trainer: {[' '.join(p.cmdline())[:120] for p in alive]}"
    assert "[train] saved checkpoint" in stderr
    assert "async save is deprecated" not in stderr


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[1][:1]
    except (OSError, IndexError):
        return b"Z"


# ------------------------------------------------------------------- in-process helpers


def helper(mode: str, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "tests.test_pretrain_integrity", mode, str(run_dir), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _fill_disk_after_the_check(run_dir: str, disk: str, async_save: str) -> int:
    """`kumihimo train` (in this process) whose step-2 save finds room, after which the disk is filled."""
    import shutil

    from kumihimo import cli

    make_room = checkpointing.CheckpointManager.make_room

    def make_room_then_fill(self, local_bytes):
        pruned = make_room(self, local_bytes)
        if checkpoint_format.read_latest(Path(disk)) == 1:
            with open(Path(disk) / "filler", "wb") as filler:
                filler.write(b"\0" * (shutil.disk_usage(disk).free - 200_000))
        return pruned

    checkpointing.CheckpointManager.make_room = make_room_then_fill
    return cli.main(
        ["train", TINY, *BASE, "schedule.train_iters=3", "checkpoint.save_interval=1",
         f"checkpoint.async_save={async_save}", f"output_dir={run_dir}", f"checkpoint.dir={disk}"]
    )  # fmt: skip


def _run(mode: str, run_dir: str) -> int:
    """Train the tiny model in this process with one fault injected (see the tests above)."""
    import torch
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from kumihimo.pretrain.distributed import destroy, unwrap
    from kumihimo.pretrain.training import Trainer

    overrides = [
        *BASE,
        f"output_dir={run_dir}",
        f"checkpoint.dir={run_dir}/ckpt",
        "checkpoint.save_interval=1",
    ]
    if mode == "poison":
        overrides += ["schedule.train_iters=4", "checkpoint.keep_last=1"]
    elif mode == "enospc":
        overrides += ["schedule.train_iters=3"]
    else:
        overrides += ["schedule.train_iters=3", "checkpoint.async_save=true"]
    trainer = Trainer(configtree.load(TrainConfig, TINY, overrides))
    write = FileSystemWriterAsync.write_preloaded_data_multithread
    try:
        trainer.setup()
        if mode == "poison":
            step = trainer.optimizer.step

            def poisoned_step():
                result = step()
                if trainer.state.iteration == 2:  # inside step 3
                    with torch.no_grad():
                        next(unwrap(trainer.model[0]).parameters()).fill_(float("nan"))
                return result

            trainer.optimizer.step = poisoned_step
        elif mode == "enospc":

            def full_disk(*args, **kwargs):
                if trainer.state.iteration == 2:
                    raise OSError(28, "No space left on device")
                return write(*args, **kwargs)

            FileSystemWriterAsync.write_preloaded_data_multithread = staticmethod(full_disk)
        else:

            def slow_write(*args, **kwargs):  # runs in the forked writer
                Path(run_dir, "writer.pid").write_text(str(os.getpid()))
                time.sleep(60)
                return write(*args, **kwargs)

            FileSystemWriterAsync.write_preloaded_data_multithread = staticmethod(slow_write)
        try:
            return trainer.train().exit_code
        except integrity.DiskFull as exc:
            print(exc)
            return 0
    finally:
        if trainer.lock is not None:
            trainer.lock.release()
        destroy()


if __name__ == "__main__":
    if sys.argv[1] == "fill_disk":
        sys.exit(_fill_disk_after_the_check(*sys.argv[2:]))
    sys.exit(_run(sys.argv[1], sys.argv[2]))
