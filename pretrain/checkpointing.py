"""Writing and loading Megatron distributed checkpoints (torch_dist) with an atomic `latest` marker.

The folder format (file names, kumihimo.json, run_config.yaml, finding a checkpoint) is
`pretrain.checkpoint_format`'s; this module writes and loads the shards, the optimizer and schedule
state, and the markers, and owns pruning, disk-full handling and the run lock.

A checkpoint is first written to `iter_NNNNNNN.tmp` and renamed once every rank has finished, so a
run killed mid-save never leaves a folder that looks complete. Tensor keys do not depend on TP/PP,
so a checkpoint loads at another layout, and `pretrain/convert/` reads and writes these files with
torch.distributed.checkpoint alone, one tensor at a time and with no model.

With `checkpoint.async_save` the shards are written by a background process per rank while training
goes on (`AsyncSaves`); the rename, metadata and `latest` follow once every rank's write is done.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import multiprocessing
import multiprocessing.managers
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException as WriteFailure

from kumihimo.core import configtree
from kumihimo.core.errors import UserError, is_disk_full
from kumihimo.core.logs import stage_logger
from kumihimo.pretrain import integrity
from kumihimo.pretrain.checkpoint_format import (
    CONFIG_FILE,
    LATEST_FILE,
    LOCK_FILE,
    META_FILE,
    SHARDING_METADATA,
    TrainState,
    iteration_dir,
    read_latest,
    read_meta,
)
from kumihimo.pretrain.distributed import rng_state, set_rng_state, unwrap

if TYPE_CHECKING:
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.parallel import ParallelLayout

log = stage_logger("train")
SAVE_FAILURES = (Exception, WriteFailure)
"""What a failed save raises: torch's CheckpointException (a failed shard write, wrapped by megatron-core)
derives from BaseException, so `except Exception` alone lets it through as a traceback."""

# Megatron-Core is imported inside the functions that need it, so that importing this module (for
# RunLock, prune) does not load it.


def _model_sharded_state_dict(model_chunks) -> dict[str, Any]:
    model_chunks = [unwrap(chunk) for chunk in model_chunks]
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict(metadata=SHARDING_METADATA)}
    return {
        f"model{i}": chunk.sharded_state_dict(metadata=SHARDING_METADATA)
        for i, chunk in enumerate(model_chunks)
    }


def _rng_sharded_object(layout) -> Any:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # CP ranks hold replicas of the same (PP, TP) shard, like DP ranks do
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject(
        "rng_state", rng_state(), (layout.pp, layout.tp), (pp_rank, tp_rank), replica_id=dp_rank
    )


def _save_strategy():
    """torch_dist saving in which the ranks holding replicas of a tensor (data- and context-parallel
    ranks) share its writing, as Megatron-LM does by default; without it DP rank 0 writes every
    replicated tensor and the other DP ranks write nothing."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


def _load_strategy(folder: Path):
    """torch_dist loading in which replicas share the reading: each DP (and CP) rank reads its part of
    the replicated tensors and the parts are exchanged, instead of every rank reading everything."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(folder)),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


@dataclass
class PendingSave:
    """A checkpoint whose shards a background process is writing."""

    folder: Path
    blocking_s: float
    """Seconds training stood still: building the state dict, planning, staging tensors, forking."""
    scheduled_at: float
    background_s: float | None = None
    """Seconds from the end of the blocking part until the checkpoint was complete on every rank."""


class AsyncSaves:
    """Checkpoints being written in the background (`checkpoint.async_save`).

    Megatron-Core's `dist_checkpointing.save(..., async_sharded_save=True)` returns an AsyncRequest
    whose write runs in a process forked per rank (`AsyncCallsQueue(persistent=False)`). The fork is
    the snapshot: staging copies GPU tensors to host memory before it, and on CPU, where that staging
    is a no-op, the child's copy-on-write view of memory still holds the values of the moment of the
    fork, so training may change weights at once. (The persistent worker is not used: it is spawned,
    calls torch.cuda.set_device, which fails without a GPU, and receives CPU tensors through shared
    memory, i.e. the live weights, not a copy.)

    `finalize` must be called on every rank at the same points; it runs the request's finalize steps
    (global shard metadata, then `_publish`) once the write has finished on every rank.
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self.pending: dict[int, PendingSave] = {}

    def schedule(self, request, folder: Path, started: float) -> PendingSave:
        if request.async_fn is not None:  # the writer must not outlive the trainer (kill -9, OOM killer)
            request = request._replace(async_fn=partial(_die_with_parent, request.async_fn, os.getpid()))
        index = self._queue.schedule_async_request(request)
        now = time.perf_counter()
        self.pending[index] = PendingSave(folder, blocking_s=now - started, scheduled_at=now)
        return self.pending[index]

    @property
    def newest(self) -> PendingSave | None:
        return next(reversed(self.pending.values()), None)

    def finalize(self, blocking: bool) -> list[PendingSave]:
        """Complete the saves that every rank has finished writing (with blocking=True: wait for all);
        returns them, oldest first."""
        if not self.pending:
            return []
        done = []
        for index in self._queue.maybe_finalize_async_calls(blocking=blocking):
            save = self.pending.pop(index)
            save.background_s = time.perf_counter() - save.scheduled_at
            done.append(save)
        return done


PR_SET_PDEATHSIG = 1


def _exit_with(parent_pid: int) -> None:
    """In a child of the trainer: ask Linux for SIGKILL when the trainer dies (kill -9, OOM killer), and
    exit at once if it already died before this point."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the lock file still refuses a racing re-run
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _die_with_parent(write, parent_pid: int, *args, **kwargs):
    """Run in the forked writer: a killed run leaves no orphan writing shards into the output."""
    _exit_with(parent_pid)
    return write(*args, **kwargs)


_write_results_manager = None


class _NotDeprecatedHere(logging.Filter):
    """Drops megatron-core 0.19.2's "MCore's async save is deprecated ... use NVRx" warning. It is logged
    by every save, synchronous ones included (their only implementation is that path), and for our
    background saves the choice is deliberate: see AsyncSaves and docs/guarantees.md."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MCore's async save is deprecated")


def _quiet_async_deprecation() -> None:
    torch_strategy = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
    if not any(isinstance(f, _NotDeprecatedHere) for f in torch_strategy.filters):
        torch_strategy.addFilter(_NotDeprecatedHere())


def own_write_results_queue() -> None:
    """Give megatron-core's shard writer a results queue served by a process that dies with the trainer.

    Every save (synchronous ones too) sends its write results through a queue that megatron-core
    0.19.2 creates on first use with a `spawn` multiprocessing Manager: a ~566 MB process re-importing
    the trainer's modules, plus multiprocessing's resource tracker, both of which outlived a trainer
    killed with SIGKILL. This Manager is forked (no re-import, no resource tracker) and gets SIGKILL
    when the trainer dies; a normal exit shuts it down. Call once per trainer process, before saving."""
    global _write_results_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _write_results_manager is not None or filesystem_async._results_queue is not None:
        return
    manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("fork"))
    manager.start(initializer=_exit_with, initargs=(os.getpid(),))
    _write_results_manager = manager
    filesystem_async._results_queue = manager.Queue()


class CheckpointManager:
    """This run's checkpoints, built once from the config, the layout and the metadata every checkpoint
    records: save (blocking, or in the background with checkpoint.async_save), complete background
    saves, make room on a full disk, prune, find `latest` and load. `save` and `finish_pending` must be
    called on every rank at the same points; status lines go to the `kumihimo.train` logger."""

    def __init__(
        self,
        config: TrainConfig,
        layout: ParallelLayout,
        meta: dict[str, Any],
        device: torch.device,
        is_main: bool,
    ):
        ckpt = config.checkpoint
        self.root: Path | None = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        """The checkpoint folder; None when the run saves nothing (checkpoint.enabled=false)."""
        self.keep_last: int | None = ckpt.keep_last
        self.keep_multiples_of: int | None = ckpt.keep_multiples_of
        self.config, self.layout, self.meta = config, layout, meta
        self.device, self.is_main = device, is_main
        self.async_saves = AsyncSaves() if ckpt.async_save else None
        if self.root is not None:
            own_write_results_queue()
            _quiet_async_deprecation()
        self.expected_bytes = 0
        """This rank's estimate of one checkpoint's size (make_room): a failed write with less free space
        left than that is taken for a full disk, whatever error the writer reported."""

    def latest(self) -> Path | None:
        """The folder `latest` names under the save root, or None."""
        iteration = read_latest(self.root) if self.root else None
        return None if iteration is None else iteration_dir(self.root, iteration)

    def prune(self, keep_last: int | None = None) -> list[Path]:
        return prune(self.root, keep_last or self.keep_last, self.keep_multiples_of)

    def load(self, folder: Path, model_chunks, optimizer, scheduler) -> TrainState:
        return load_checkpoint(folder, model_chunks, optimizer, scheduler, self.layout)

    def save(self, state: TrainState, model_chunks, optimizer, scheduler) -> Path | None:
        """Save a checkpoint; with async saves, start writing it in the background (after the previous
        one is complete: one save in flight at a time). Returns None, writing nothing, when weights or
        optimizer state hold NaN/Inf: such a state cannot recover, and publishing it would move `latest`
        onto it and let keep_last prune the good ones. Raises DiskFull when it cannot fit."""
        self.finish_pending(blocking=True)
        bad, total, names = integrity.count_nonfinite(model_chunks, optimizer, self.device)
        if bad:
            latest = read_latest(self.root)
            kept = "no checkpoint exists" if latest is None else f"latest stays iter_{latest:07d}"
            log.info(
                f"not saving step {state.iteration}: {bad} of {total} weight/optimizer tensors "
                f"hold NaN or Inf ({', '.join(names[:3]) or 'on other ranks'}); nothing written, {kept}"
            )
            return None
        local = sum(t.numel() * t.element_size() for _, t in integrity.state_tensors(model_chunks, optimizer))
        pruned = self.make_room(local)
        if pruned:
            log.info(f"disk nearly full: pruned {', '.join(p.name for p in pruned)} before saving")
        # With overlap_param_gather each DP rank's copy of the weights it does not own is updated by the
        # next forward's all-gather; sync it now (as Megatron-LM does), since every DP rank writes a share.
        hooked = [chunk for chunk in model_chunks if getattr(chunk, "use_forward_hook", False)]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            folder = self._write(state, model_chunks, optimizer, scheduler)
        finally:
            for chunk in hooked:
                chunk.enable_forward_pre_hook()
        if self.async_saves is None:
            log.info(f"saved checkpoint {folder}")
        else:
            log.info(
                f"writing checkpoint {folder} in the background "
                f"(training blocked {self.async_saves.newest.blocking_s:.2f} s)"
            )
        return folder

    def _write(self, state: TrainState, model_chunks, optimizer, scheduler) -> Path:
        """Save on every rank; returns the final folder. With async saves the shards are written in the
        background and the folder appears (with `latest` pointing at it) at a later `finish_pending`."""
        from megatron.core import dist_checkpointing

        started = time.perf_counter()
        final = iteration_dir(self.root, state.iteration)
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        train_state = copy.deepcopy(state.__dict__)  # training goes on while an async save completes
        sharded = _model_sharded_state_dict(model_chunks)
        model_sd = sharded["model"] if "model" in sharded else sharded
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=SHARDING_METADATA)
        sharded["rng_state"] = _rng_sharded_object(self.layout)
        sharded["scheduler"] = scheduler.state_dict()
        sharded["train_state"] = train_state
        meta_text = json.dumps(
            {**self.meta, "train_state": train_state, "layout": self.layout.__dict__}, indent=2, default=str
        )
        publish = partial(self._publish, tmp, final, state.iteration, meta_text)
        if self.async_saves is None:
            try:
                dist_checkpointing.save(
                    sharded, str(tmp), sharded_strategy=_save_strategy(), content_metadata=SHARDING_METADATA
                )
                publish()
            except SAVE_FAILURES as exc:
                raise_if_disk_full(exc, self.root, self.expected_bytes, tmp)
                raise
            return final
        request = dist_checkpointing.save(
            sharded,
            str(tmp),
            sharded_strategy=_save_strategy(),
            content_metadata=SHARDING_METADATA,
            async_sharded_save=True,
            async_strategy="mcore",
        )
        request.add_finalize_fn(publish)
        self.async_saves.schedule(request, final, started)
        return final

    def _publish(self, tmp: Path, final: Path, iteration: int, meta_text: str) -> None:
        """On every rank, once all shards are written: rank 0 adds the config and metadata, renames tmp
        to final, points `latest` at it and prunes."""
        dist.barrier()
        if dist.get_rank() == 0:
            configtree.save(self.config, tmp / CONFIG_FILE)
            configtree.write_text_atomic(tmp / META_FILE, meta_text)
            if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
                shutil.rmtree(final)
            tmp.rename(final)
            configtree.write_text_atomic(self.root / LATEST_FILE, f"{iteration}\n")
            if self.keep_last:
                self.prune()
        dist.barrier()

    def finish_pending(self, blocking: bool) -> None:
        """Complete the background saves every rank has finished writing (all of them when blocking).
        Call on every rank at the same points."""
        if self.async_saves is None:
            return
        try:
            finished = self.async_saves.finalize(blocking)
        except SAVE_FAILURES as exc:
            pending = [p.folder.with_name(p.folder.name + ".tmp") for p in self.async_saves.pending.values()]
            raise_if_disk_full(exc, self.root, self.expected_bytes, *(pending if self.is_main else []))
            raise
        for done in finished:
            log.info(
                f"saved checkpoint {done.folder} (training blocked {done.blocking_s:.2f} s, "
                f"written in the background in {done.background_s:.2f} s)"
            )

    def make_room(self, local_bytes: int) -> list[Path]:
        """Before a save, on every rank: expect it to be as large as the newest checkpoint (or, for the
        first, as the state: `local_bytes` summed over ranks / DP). If the disk cannot hold it, prune
        down to keep_last - 1 first (never `latest`), so a full disk frees itself where keep_last
        allows; if it still cannot, raise DiskFull. Rank 0 decides for all. Returns the pruned folders."""
        root = self.root
        latest = read_latest(root)
        need = torch.tensor([float(local_bytes), 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(need)
        self.expected_bytes = int(need[0]) // max(1, self.layout.dp)
        problem, pruned = "free space is checked on rank 0", []
        if dist.get_rank() == 0:
            expected = int(need[0]) // max(1, self.layout.dp)
            if latest is not None and iteration_dir(root, latest).is_dir():
                expected = integrity.folder_bytes(iteration_dir(root, latest))
            problem = integrity.free_space_problem(root, expected)
            if problem and self.keep_last:
                pruned = self.prune(max(1, self.keep_last - 1))
                problem = integrity.free_space_problem(root, expected)
            need[1] = 1.0 if problem else 0.0
        dist.broadcast(need, src=0)
        if need[1]:
            raise integrity.DiskFull(root, latest, problem)
        return pruned


def raise_if_disk_full(exc: BaseException, root: Path, expected_bytes: int, *leftovers: Path) -> None:
    """After a failed save: if the disk is full, remove what the save left (freeing its space; `latest`
    and the folders it names are untouched) and raise DiskFull, one line with the recovery.

    The disk counts as full when the error says so or when less than the save's expected size (at
    least 64 MiB) is free: a shard writer that hits ENOSPC reaches us as torch's "unexpected pos" zip
    error wrapped in megatron-core's "Worker failure ... <class 'RuntimeError'>", with no errno left."""
    target = root if root.exists() else root.parent
    if not is_disk_full(exc) and shutil.disk_usage(target).free > max(64 * 2**20, expected_bytes):
        return
    detail = (
        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if is_disk_full(exc)
        else f"a shard write failed with {shutil.disk_usage(target).free / 2**20:.1f} MiB free"
    )
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    raise integrity.DiskFull(root, read_latest(root), detail) from exc


def clean_leftovers(root: Path) -> list[Path]:
    """Remove what a killed or failed save left in `root`: unfinished iter_*.tmp folders and the
    temporary files of atomic writes. Call only while holding the lock (no other run writes there)."""
    removed = [p for p in root.glob("iter_*.tmp")] + [p for p in root.glob(f".{LATEST_FILE}.*")]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


class RunLock:
    """`<checkpoint folder>/.kumihimo-train.lock` holding the owner's host and pid: a second run writing
    into the same folder (e.g. an immediate re-run while a killed run's processes still live) is refused.
    A lock whose process is gone on this host is stale and taken over; one from another host cannot be
    checked from here, so it is taken over with a warning (a requeued Slurm job lands on another node)."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self.owned = False

    def acquire(self) -> str | None:
        """Take the lock; returns a warning to print, if any. Raises UserError if a live run holds it."""
        host, warning = socket.gethostname(), None
        if self.path.is_file():
            try:
                owner = json.loads(self.path.read_text())
            except (OSError, ValueError):
                owner = {}
            pid, owner_host = owner.get("pid"), owner.get("host")
            if owner_host == host and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                raise UserError(
                    f"another training run (pid {pid} on {host}) is writing to {self.path.parent}; wait for it "
                    f"to finish or stop it (kill {pid}), then rerun"
                )
            if owner_host not in (None, host):
                warning = (
                    f"warning: {self.path} names a run on {owner_host} (pid {pid}); taking it over. "
                    "Two jobs writing one checkpoint folder corrupt it: make sure that run is gone"
                )
        configtree.write_text_atomic(self.path, json.dumps({"host": host, "pid": os.getpid()}) + "\n")
        self.owned = True
        return warning

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False


def _alive(pid: int) -> bool:
    """Whether `pid` is a live kumihimo process on this host (a reused pid of another program is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b") ", 1)[1][:1]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return True
    return state != b"Z" and (not cmdline or b"kumihimo" in cmdline)


def prune(root: Path, keep_last: int, keep_multiples_of: int | None = None) -> list[Path]:
    """Delete all but the newest keep_last checkpoints, except multiples of keep_multiples_of and the
    one `latest` points at. Returns the deleted folders."""
    latest = read_latest(root)
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    deleted = []
    for old in done[:-keep_last]:
        step = int(old.name.removeprefix("iter_"))
        if step == latest or (keep_multiples_of and step % keep_multiples_of == 0):
            continue
        shutil.rmtree(old, ignore_errors=True)
        deleted.append(old)
    return deleted


def load_checkpoint(folder: Path, model_chunks, optimizer, scheduler, layout) -> TrainState:
    """Load model, optimizer, scheduler, RNG and train state saved at any TP/PP. With scheduler=None (a
    branch) the optimizer's state (moments, step counts, main weights) is loaded but its learning-rate
    and other hyperparameters stay this run's: the checkpoint's param groups would otherwise bring back
    the source's peak and current learning rate. A resume continues the saved schedule with this run's
    optimizer.lr and min_lr."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    from kumihimo.pretrain.convert.dcp_files import describe_failure

    meta = read_meta(folder)
    saved_layout = meta.get("layout", {})
    same_layout = (saved_layout.get("tp"), saved_layout.get("pp")) == (layout.tp, layout.pp)
    check_optimizer_layout(folder, saved_layout, layout, optimizer)
    sharded = _model_sharded_state_dict(model_chunks)
    model_sd = sharded["model"] if "model" in sharded else sharded
    _allocate_distributed_optimizer_state(optimizer)
    sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=SHARDING_METADATA)
    if same_layout:
        sharded["rng_state"] = _rng_sharded_object(layout)
    with torch.no_grad():
        try:
            loaded = dist_checkpointing.load(sharded, str(folder), sharded_strategy=_load_strategy(folder))
        except CheckpointingException as exc:
            raise UserError(
                f"{folder} does not fit this model and optimizer ({str(exc).splitlines()[0][:300]}); resume "
                f"with the settings in its {CONFIG_FILE} or start a new run (new checkpoint.dir)"
            ) from exc
        except (CheckpointException, EOFError) as exc:  # a truncated .distcp: EOFError, wrapped or not
            _reraise_interruption(exc)
            raise UserError(
                f"{folder} cannot be read ({describe_failure(exc)}); write an earlier iteration into "
                f"{folder.parent / LATEST_FILE} to resume from it, or start a new run"
            ) from exc
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    configured = [_hyperparameters(group) for group in optimizer.param_groups]
    _match_saved_param_groups(optimizer, folder)
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_step_counts(optimizer)
    if scheduler is None:
        for group, values in zip(optimizer.param_groups, configured, strict=True):
            group.update(values)
    else:
        _load_schedule(scheduler, loaded["scheduler"], optimizer, configured)
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return TrainState(**loaded["train_state"])


def _reraise_interruption(exc: BaseException) -> None:
    """DCP wraps whatever stopped a read, SIGTERM's StoppedBeforeTraining and Ctrl-C's KeyboardInterrupt
    included, in a CheckpointException: raise those again as themselves, so that a signalled load ends
    the run as a signal does (exit 3) instead of calling the checkpoint unreadable."""
    from kumihimo.pretrain.convert.dcp_files import failure_cause

    cause = failure_cause(exc)
    if not isinstance(cause, Exception) and cause is not exc:
        raise cause from None


def check_optimizer_layout(folder: Path, saved_layout: dict, layout, optimizer) -> None:
    """Refuse, in one line, a load whose optimizer state cannot fit this run: state saved by the
    distributed optimizer (megatron-core's dp_reshardable format: bucket-shaped, one bucket layout per
    TP/PP/virtual-pipeline split) loads at another DP or CP size but not at another TP, PP or virtual
    pipeline size, and neither optimizer kind reads the other's state. (megatron-core fails with a raw
    KeyError there.) Weights alone load at any layout: checkpoint.pretrained."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    config_file = folder / CONFIG_FILE
    saved = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    saved_distributed = bool((saved.get("parallelism") or {}).get("use_distributed_optimizer", False))
    distributed = any(isinstance(opt, DistributedOptimizer) for opt in inner_optimizers(optimizer))
    split = {"TP": layout.tp, "PP": layout.pp, "VPP": layout.vpp}
    saved_split = {"TP": saved_layout.get("tp"), "PP": saved_layout.get("pp"), "VPP": saved_layout.get("vpp")}
    weights_only = (
        f"or start a new run from its weights alone (checkpoint.pretrained={folder.parent}, new "
        "checkpoint.dir; the optimizer state restarts)"
    )
    if saved_distributed != distributed:
        raise UserError(
            f"{folder} holds {'distributed' if saved_distributed else 'non-distributed'} optimizer state; "
            f"resume with parallelism.use_distributed_optimizer={str(saved_distributed).lower()} "
            + weights_only
        )
    if distributed and saved_split != split:
        described = " ".join(f"{k}={v or 1}" for k, v in saved_split.items())
        raise UserError(
            f"{folder} holds distributed-optimizer state saved at {described}, which loads only at the same "
            f"TP, PP and virtual pipeline size (DP and CP may change); resume with "
            f"parallelism.tensor_model_parallel_size={saved_split['TP']} "
            f"parallelism.pipeline_model_parallel_size={saved_split['PP']} "
            f"parallelism.virtual_pipeline_model_parallel_size={saved_split['VPP'] or 'null'}, "
            + weights_only
        )


def inner_optimizers(optimizer) -> list:
    """The Megatron optimizers a (possibly chained) Megatron optimizer is made of."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer's torch AdamW its state tensors before the load fills them.

    Without Apex or Transformer Engine (CPU), megatron-core's DistributedOptimizer reads Adam's step
    count from the torch state, which is empty until a first step, and asserts one value. Take one step
    with zero gradients and a learning rate of 0 (megatron-core's own dummy-state helper), so nothing
    but the state's allocation changes; the load then overwrites every value."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in inner_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer) or opt.optimizer.state:
            continue
        groups = opt.optimizer.param_groups
        configured = [(group["lr"], group["weight_decay"]) for group in groups]
        for group in groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        opt._init_optimizer_states_with_dummy_values()
        for group, (lr, weight_decay) in zip(groups, configured, strict=True):
            group["lr"], group["weight_decay"] = lr, weight_decay


def _restore_step_counts(optimizer) -> None:
    """Give every parameter its own Adam step count, the one the checkpoint saved, after a load.

    With torch AdamW (no Apex/TE, e.g. on CPU) megatron-core's DistributedOptimizer loses it twice:
    load_state_dict puts one step tensor object into every parameter's state (torch AdamW increments
    each parameter's step in place, so the shared count would rise by the number of parameters per
    step), and the dp_reshardable parameter state then copies the pre-load (allocation) step over it.
    The saved count survives in each loaded param group's `step`, which is what the distributed
    optimizer writes there (and reads back from the state when it saves)."""
    for opt in inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param, {})
                if not isinstance(state.get("step"), torch.Tensor):
                    continue
                step = state["step"].clone()
                if "step" in group:
                    step.fill_(float(group["step"]))
                state["step"] = step


def _load_schedule(scheduler, saved: dict, optimizer, configured: list[dict]) -> None:
    """Continue at the saved step with this run's schedule: its peak and minimum learning rate (resuming
    with a lower optimizer.lr or min_lr is the recovery from a NaN stop), warm-up, decay length and
    style all apply from the next step, as Megatron-LM's --override-opt_param-scheduler does (a longer
    schedule.train_iters lengthens the decay). Megatron's scheduler would otherwise keep the
    checkpoint's values without a word; integrity.check_resume prints what changed."""
    max_lr, min_lr = scheduler.max_lr, scheduler.min_lr
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update({key: values[key] for key in ("max_lr", "min_lr") if key in values})
    override = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True  # keep this run's values; take only the step count
    try:
        scheduler.load_state_dict(saved)
    finally:
        scheduler.override_opt_param_scheduler = override
    scheduler.max_lr, scheduler.min_lr = max_lr, min_lr
    scheduler.step(increment=0)  # the current learning rate from this run's values


def _match_saved_param_groups(optimizer, folder: Path) -> None:
    """Megatron finds each saved param group by its (max_lr, min_lr, wd_mult, ...) and refuses a load
    (`Could not find parameter group`) whose optimizer.lr or min_lr differ from the checkpoint's. Every
    group's max_lr/min_lr is this trainer's optimizer.lr/min_lr, so take the saved ones for the load (the
    caller puts this run's back after it)."""
    config_file = folder / CONFIG_FILE
    saved = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    source = saved.get("optimizer") or {}
    for group in optimizer.param_groups:
        for key, name in (("max_lr", "lr"), ("min_lr", "min_lr")):
            if key in group and name in source:
                group[key] = float(source[name])


def _hyperparameters(group: dict) -> dict:
    """A param group's settings: everything but its parameters and Adam's step count (which is state)."""
    return {key: copy.copy(value) for key, value in group.items() if key not in ("params", "step")}


def load_weights(folder: Path, model_chunks) -> None:
    """Load only the model weights (any TP/PP), e.g. from a `kumihimo convert from-hf` checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    sharded = _model_sharded_state_dict(model_chunks)
    with torch.no_grad():
        try:
            loaded = dist_checkpointing.load(sharded, str(folder), sharded_strategy=_load_strategy(folder))
        except CheckpointException as exc:
            _reraise_interruption(exc)
            raise
    for name, chunk in zip(sharded, model_chunks):
        unwrap(chunk).load_state_dict(loaded[name])
