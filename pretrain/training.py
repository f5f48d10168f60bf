"""The training loop: setup -> loop { step -> log -> maybe eval -> maybe save } -> final save.

Everything Megatron-Core needs is built in `setup()` from the config; `Trainer.train()` reads top to
bottom. Run it through `kumihimo train` (one process, or torchrun / srun for several).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import megatron.core
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    finalize_model_grads,
)
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from kumihimo import __version__
from kumihimo.core import configtree
from kumihimo.core.logs import log_to_stderr, stage_logger
from kumihimo.pretrain import checkpoint_format, checkpointing, fault_injection, integrity
from kumihimo.pretrain.branch import resolve_lineage
from kumihimo.pretrain.checkpoint_format import TrainState, source_vocab_rows
from kumihimo.pretrain.checkpointing import CheckpointManager
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.data import Datasets, batch_indices, build_datasets, microbatches
from kumihimo.pretrain.deadline import Deadline
from kumihimo.pretrain.distributed import ProcessInfo, destroy, init_process_group, seed_everything, unwrap
from kumihimo.pretrain.evaluate.in_loop import InLoopEvaluation, perplexity, source_metrics
from kumihimo.pretrain.evaluate.plot import write_plot
from kumihimo.pretrain.loss import cross_entropy_and_z
from kumihimo.pretrain.memory import ActivationMeter, state_bytes
from kumihimo.pretrain.metrics import MetricsSink, StepTimer, training_flops_per_token
from kumihimo.pretrain.model import build_model, slice_for_context_parallel
from kumihimo.pretrain.moe import RouterStatistics
from kumihimo.pretrain.optimizer import build_ddp_config, build_optimizer_config, build_scheduler
from kumihimo.pretrain.parallel import ParallelLayout
from kumihimo.pretrain.signals import (
    EXIT_BAD_LOSS,
    EXIT_REQUEUE,
    LossGuard,
    StoppedBeforeTraining,
    StopRequest,
)
from kumihimo.pretrain.stragglers import StragglerDetector
from kumihimo.pretrain.watchdog import Heartbeat

log = stage_logger("train")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    state: TrainState | None = None
    exit_code: int = 0


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor, extra: torch.Tensor | None = None):
    """Token-mean loss of one micro-batch (+ an extra per-token term such as z-loss); the reported
    (sum, count) is the cross entropy alone, so curves compare across z-loss settings."""
    mask = loss_mask.float().reshape(-1)
    losses = output.float().reshape(-1)
    reported = torch.sum(losses * mask)
    loss_sum = reported if extra is None else reported + torch.sum(extra.reshape(-1) * mask)
    num_tokens = mask.sum()
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size > 1:
        # Each CP rank holds part of every sequence. Megatron divides this rank's sum by the count we
        # return and DDP averages gradients over DP x CP, so return the whole sequence's count and scale
        # by CP: the gradient is then exactly that of the token mean over the whole sequence.
        num_tokens = num_tokens.detach().clone()
        dist.all_reduce(num_tokens, group=parallel_state.get_context_parallel_group())
        loss_sum = loss_sum * cp_size
    return loss_sum, num_tokens.to(torch.int), {"lm loss": torch.stack([reported.detach(), mask.sum()])}


def z_loss_func(loss_mask: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float, logits: torch.Tensor):
    cross_entropy, z_term = cross_entropy_and_z(logits, labels, z_loss_coeff)
    return loss_func(loss_mask, cross_entropy, z_term)


def forward_step(data_iterator, model, z_loss_coeff: float = 0.0, meter: ActivationMeter | None = None):
    batch = slice_for_context_parallel(next(data_iterator))
    # document_ids (data.reset_attention_mask) reach the core attention as its attention_mask argument
    with meter.record(model) if meter else contextlib.nullcontext():
        if z_loss_coeff:
            # The model returns [b, s, vocab/TP] logits (hidden states on earlier pipeline stages).
            output = model(batch["tokens"], batch["position_ids"], batch.get("document_ids"))
            return output, partial(z_loss_func, batch["loss_mask"], batch["labels"], z_loss_coeff)
        output = model(
            batch["tokens"], batch["position_ids"], batch.get("document_ids"), labels=batch["labels"]
        )
        return output, partial(loss_func, batch["loss_mask"])


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        res = config.resilience
        self.loss_guard = LossGuard(res.spike_factor, res.spike_warmup_steps)
        self.consecutive_skips = 0
        # Listen from the start: Slurm's warning may come while the model is still being built.
        self.stop = StopRequest()
        self.lock: checkpointing.RunLock | None = None
        self.lineage: dict | None = None
        """Where a branch started (resolve_lineage); recorded in each of its checkpoints."""
        self.started = time.time()
        """When this process started training work: schedule.exit_after_minutes counts from here."""

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.config
        if cfg.runtime.device == "cpu":
            # deferred: the GPU path never imports the CUDA-to-CPU redirection
            from kumihimo.pretrain import cpu_compat

            cpu_compat.activate()
        self.info: ProcessInfo = init_process_group(
            cfg.runtime.device, cfg.runtime.distributed_timeout_minutes
        )
        log_to_stderr(self.info.rank)
        self._setup_resilience()
        self.layout = ParallelLayout.from_config(cfg, self.info.world_size)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.layout.tp,
            pipeline_model_parallel_size=self.layout.pp,
            virtual_pipeline_model_parallel_size=self.layout.vpp,
            context_parallel_size=self.layout.cp,
            expert_model_parallel_size=self.layout.ep,
            expert_tensor_parallel_size=self.layout.etp,
        )
        seed_everything(cfg.runtime.seed)
        model_parallel_cuda_manual_seed(cfg.runtime.seed, inference_rng_tracker=cfg.runtime.device == "cpu")
        if cfg.runtime.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = (
            torch.device("cpu")
            if cfg.runtime.device == "cpu"
            else torch.device("cuda", torch.cuda.current_device())
        )
        # every rank: the resolved branch.iteration and source_sha256 go into run_config.yaml
        self.lineage = resolve_lineage(cfg)
        self.is_logger = self.info.is_main
        if self.is_logger:
            self._claim_save_folder()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            configtree.save(cfg, self.output_dir / "run_config.yaml")
            log.info(
                f"resolved config (saved to {self.output_dir / 'run_config.yaml'}):\n"
                + configtree.dump_yaml(cfg).rstrip()
            )
            log.info(f"layout {self.layout.describe()}")
            if cfg.checkpoint.async_save and not cfg.checkpoint.enabled:
                log.info(
                    "warning: checkpoint.async_save=true is ignored: checkpoint.enabled is false, so "
                    "this run saves nothing"
                )

        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.output_dir / "data_cache"
        self.datasets: Datasets = build_datasets(cfg, cache_dir)
        vocab = self.datasets.tokenizer.vocab_size
        self.padded_vocab = self.layout.padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by)
        started = time.perf_counter()
        log.info(f"building the model and optimizer ({self.layout.describe()})")
        self._build_model_and_optimizer()
        log.info(f"model and optimizer built in {time.perf_counter() - started:.1f} s")
        self.flops_per_token = training_flops_per_token(cfg.model, self.padded_vocab)
        self._record_parameter_counts()
        self.memory_meter: ActivationMeter | None = ActivationMeter(self.model)
        self.router_stats = (
            RouterStatistics(cfg.model, self.model, cfg.parallelism.sequence_parallel)
            if cfg.model.moe.enabled
            else None
        )
        self.metrics = MetricsSink(cfg, self.output_dir, enabled=self.is_logger)
        self.step_timer = StepTimer(torch.cuda.synchronize if self.device.type == "cuda" else None)
        self.downstream = InLoopEvaluation.from_config(
            cfg, self.model, self.device, self.output_dir, self.is_logger
        )
        self.checkpoints = CheckpointManager(
            cfg, self.layout, self._build_checkpoint_meta(), self.device, self.info.is_main
        )
        self._maybe_resume()
        self.deadline.note_save(self.state.extra.get("longest_save_s", 0.0))
        if self.deadline.end is not None:
            log.info(f"deadline: saving and exiting for requeue before {self.deadline.describe()}")
        if self.downstream:  # known after the load: an import's rows beyond the tokenizer, as to-hf exports
            self.downstream.backend.vocab_size = source_vocab_rows(self.checkpoints.meta)

    def _setup_resilience(self) -> None:
        """The hang watchdog's heartbeat, the straggler report and the deadline (docs/clusters.md)."""
        res, sched = self.config.resilience, self.config.schedule
        self.heartbeat = Heartbeat.from_env(
            res.hang_timeout_factor, res.hang_timeout_floor_s, res.hang_initial_timeout_s, self.info.rank
        )
        device = torch.device("cpu") if self.config.runtime.device == "cpu" else torch.device("cuda")
        self.stragglers = StragglerDetector(
            res.straggler_interval, res.straggler_factor, device, self.info.is_main
        )
        # rank 0 judges the deadline; StopRequest.agree tells the others
        self.deadline = Deadline.from_schedule(
            sched.exit_after_minutes if self.info.is_main else None,
            sched.exit_at_job_end and self.info.is_main,
            sched.exit_margin_minutes,
            self.started,
        )

    def _claim_save_folder(self) -> None:
        """Rank 0: lock the checkpoint folder against a second run, then clear what a killed save left."""
        if self.config.checkpoint_dir is None:
            return
        root = Path(self.config.checkpoint_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.lock = checkpointing.RunLock(root)
        warning = self.lock.acquire()
        if warning:
            log.info(warning)
        removed = checkpointing.clean_leftovers(root)
        if removed:
            log.info(
                f"removed {len(removed)} leftover(s) of an interrupted save: {', '.join(p.name for p in removed)}"
            )

    def _build_model_and_optimizer(self) -> None:
        cfg = self.config
        chunks = build_model(
            cfg.model,
            cfg.precision,
            cfg.parallelism,
            cfg.fusions,
            self.layout,
            self.padded_vocab,
            device=cfg.runtime.device,
            seed=cfg.runtime.seed,
            deterministic=cfg.runtime.deterministic,
            micro_batch_size=cfg.schedule.micro_batch_size,
            reset_position_ids=cfg.data.reset_position_ids,
        )
        bf16 = cfg.precision.params_dtype == "bf16"
        if bf16:  # before DDP, else the optimizer's sharded state dict mismatches parameter ids
            chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
        ddp_config = build_ddp_config(cfg.precision, cfg.parallelism)
        self.model = [
            DistributedDataParallel(
                config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
            )
            for i, chunk in enumerate(chunks)
        ]
        self.optimizer = get_megatron_optimizer(
            build_optimizer_config(cfg.optimizer, cfg.precision, cfg.parallelism), self.model
        )
        self.scheduler = build_scheduler(cfg.optimizer, cfg.schedule, self.optimizer)
        tconfig = self.model[0].config
        tconfig.grad_scale_func = self.optimizer.scale_loss
        tconfig.finalize_model_grads_func = self.stragglers.wrap_finalize(finalize_model_grads)
        syncs = [m.no_sync for m in self.model]
        tconfig.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
        if cfg.parallelism.overlap_grad_reduce:
            grads = [m.start_grad_sync for m in self.model]
            tconfig.grad_sync_func = grads[0] if len(grads) == 1 else grads
        if cfg.parallelism.overlap_param_gather:
            params = [m.start_param_sync for m in self.model]
            tconfig.param_sync_func = params[0] if len(params) == 1 else params

    def _record_parameter_counts(self) -> None:
        """Parameters held by each rank, to parameters_per_rank.json (`kumihimo plan` predicts them)."""
        local = sum(p.numel() for chunk in self.model for p in unwrap(chunk).parameters())
        row = {
            "rank": self.info.rank,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "parameters": local,
        }
        rows = [None] * self.info.world_size
        dist.all_gather_object(rows, row)
        if self.is_logger:
            configtree.write_text_atomic(
                self.output_dir / "parameters_per_rank.json", json.dumps(rows, indent=1)
            )
            log.info(f"{max(r['parameters'] for r in rows):,} parameters on the most loaded rank")

    def _record_memory(self) -> None:
        """What each rank holds after its first step, to memory_per_rank.json (`kumihimo plan` predicts it)."""
        row = {
            "rank": self.info.rank,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "cp_rank": parallel_state.get_context_parallel_rank(),
            **state_bytes(self.model, self.optimizer),
            "activation_bytes_per_microbatch": self.memory_meter.activation_bytes,
        }
        if self.device.type == "cuda":
            row["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        self.memory_meter = None
        rows = [None] * self.info.world_size
        dist.all_gather_object(rows, row)
        if self.is_logger:
            configtree.write_text_atomic(self.output_dir / "memory_per_rank.json", json.dumps(rows, indent=1))

    def _build_checkpoint_meta(self) -> dict:
        """What every checkpoint of this run records beside its state (fixed for the run)."""
        cfg = self.config
        return {
            "format": "kumihimo-torch_dist-v1",
            "vocab_size": self.datasets.tokenizer.vocab_size,
            "padded_vocab_size": self.padded_vocab,
            "tokenizer": self.datasets.tokenizer.identity,
            "data": {
                "blend_file": cfg.data.blend_file,
                "mock": cfg.data.mock,
                "split": cfg.data.split,
                "seed": cfg.runtime.seed,
            },
            "data_fingerprint": self.datasets.fingerprint,
            **({"lineage": self.lineage} if self.lineage else {}),
            "versions": {
                "kumihimo": __version__,
                "megatron.core": megatron.core.__version__,
                "torch": torch.__version__,
            },
        }

    def _maybe_resume(self) -> None:
        ckpt = self.config.checkpoint
        root = ckpt.load or self.config.checkpoint_dir
        if root is None or checkpoint_format.read_latest(Path(root)) is None:
            if ckpt.load is not None:
                raise configtree.ConfigError(
                    f"checkpoint.load={ckpt.load!r} holds no complete checkpoint; check the path or unset it"
                )
            if self.lineage is not None:
                self._start_branch()
            elif ckpt.pretrained is not None:
                self._load_pretrained(Path(ckpt.pretrained))
            return
        folder = checkpoint_format.find_checkpoint(Path(root))
        meta = checkpoint_format.read_meta(folder)
        if meta.get("weights_only"):
            raise configtree.ConfigError(
                f"{folder} holds weights only (no optimizer state) and cannot be resumed; pass it as "
                f"checkpoint.pretrained={root} with a new checkpoint.dir"
            )
        self._check_resume_compatible(meta, folder)
        started = _announce_load(folder, "checkpoint")
        self.state = self.checkpoints.load(folder, self.model, self.optimizer, self.scheduler)
        self._inherit_source(meta)
        self.loss_guard.load_state_dict(self.state.extra.get("loss_guard", {}))
        log.info(
            f"resumed from {folder} at step {self.state.iteration} "
            f"({self.state.consumed_samples} samples consumed) in {time.perf_counter() - started:.1f} s"
        )

    def _load_pretrained(self, root: Path) -> None:
        folder = checkpoint_format.find_checkpoint(root)
        meta, tokenizer = checkpoint_format.read_meta(folder), self.datasets.tokenizer
        for note in integrity.check_pretrained(
            meta,
            folder,
            self.config,
            tokenizer.identity,
            tokenizer.vocab_size,
            self.padded_vocab,
            self.layout.tp,
        ):
            log.info(note)
        started = _announce_load(folder, "weights")
        checkpointing.load_weights(folder, self.model)
        self._inherit_source(meta)
        # bf16 runs keep fp32 main weights inside the optimizer, copied when it was built.
        self.optimizer.reload_model_params()
        log.info(
            f"initialised weights from {folder} in {time.perf_counter() - started:.1f} s "
            "(optimizer, schedule and data start fresh)"
        )

    def _start_branch(self) -> None:
        """Model and optimizer state (and RNG at the same TP/PP) from the branch's source; the step, data
        position and learning-rate schedule stay at this config's start."""
        folder = Path(self.lineage["source"])
        meta = checkpoint_format.read_meta(folder)
        self._check_resume_compatible(meta, folder, branch=True)
        self._inherit_source(meta)
        started = _announce_load(folder, "checkpoint")
        checkpointing.load_checkpoint(folder, self.model, self.optimizer, None, self.layout)
        log.info(
            f"branched from {folder} in {time.perf_counter() - started:.1f} s (its step {self.lineage['iteration']}, "
            f"{self.lineage['source_consumed_tokens']:,} tokens): model and optimizer state loaded; step, "
            "data position and learning-rate schedule start at 0 as configured"
        )

    def _inherit_source(self, meta: dict) -> None:
        """Carry the record of the Hugging Face model the weights were imported from (`convert from-hf`'s
        `source`: its folder, model type and config.json vocab_size) into this run's checkpoints, so that
        `convert to-hf` exports all of that model's embedding rows even after the import is deleted."""
        if meta.get("source") and "source" not in self.checkpoints.meta:
            self.checkpoints.meta["source"] = meta["source"]

    def _check_resume_compatible(self, meta: dict, folder: Path, branch: bool = False) -> None:
        """Refuse a resume that would not continue the same run (integrity.check_resume); print its notes.
        A branch may change the data (it starts the new blend at its first sample)."""
        notes = integrity.check_resume(
            meta, folder, self.config, self.datasets.fingerprint, self.padded_vocab, branch=branch
        )
        saved_dp = meta.get("layout", {}).get("dp")
        if not branch and saved_dp is not None and saved_dp != self.layout.dp:
            notes.append(
                f"warning: data-parallel size changed {saved_dp} -> {self.layout.dp}; samples continue "
                "in order but per-rank batches differ, so the loss curve will not match bit for bit"
            )
        for note in notes:
            log.info(note)

    # ---------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        cfg, sched = self.config, self.config.schedule
        result = TrainResult()
        save_root = self.checkpoints.root
        last_step = sched.exit_after_iters or sched.train_iters
        first_step = self.state.iteration
        stop = self.stop
        stop.training = True  # from here a stop signal saves at the next step boundary
        while self.state.iteration < last_step:
            iteration_started = time.perf_counter()
            upcoming = self.state.iteration + 1
            self.heartbeat.begin("step", upcoming)
            timed = cfg.logging.time_every_step or self.metrics.prints(upcoming, upcoming in (1, last_step))
            values = self.train_step(timed=timed)
            result.losses.append(values["loss"])
            step = self.state.iteration
            values.update(self.stragglers.report(step))
            evaluated = bool(sched.eval_interval) and step % sched.eval_interval == 0
            if evaluated or (self.downstream and self.downstream.due(step)):
                self.heartbeat.begin("eval", step)
            if evaluated:
                values["val_loss"] = self.evaluate()
                values["val_ppl"] = perplexity(values["val_loss"])
                result.val_losses.append((step, values["val_loss"]))
                values.update(source_metrics(self.evaluate, self.datasets.valid_by_source))
            if self.downstream and self.downstream.due(step):
                evaluated = True
                values.update(self.downstream.run(step, stop))  # ends early when a stop signal comes
            self.metrics.log(step, values, force=step in (1, last_step))
            if evaluated and self.is_logger:
                write_plot(self.output_dir, cfg.name)
            if self._gives_up(values):
                result.exit_code = EXIT_BAD_LOSS
                break
            self.deadline.note_step(time.perf_counter() - iteration_started)
            why = stop.agree(self.device, self.deadline.due())
            if why is not None:
                if why == "signal":
                    log.info(f"stop signal received: saving at step {step} and exiting for requeue")
                else:
                    log.info(
                        f"the deadline is near: saving at step {step} and exiting for requeue"
                        + (f" (before {self.deadline.describe()})" if self.deadline.end is not None else "")
                    )
                result.exit_code = EXIT_REQUEUE
                if save_root and self.save() is None:
                    result.exit_code = EXIT_BAD_LOSS
                break
            if save_root and step != last_step and cfg.checkpoint.should_save(step):
                if self.save() is None:
                    result.exit_code = EXIT_BAD_LOSS
                    break
            self.checkpoints.finish_pending(blocking=False)
        stop.restore()
        finished = result.exit_code == 0
        if finished and save_root and cfg.checkpoint.save_at_end and self.state.iteration > first_step:
            if self.save() is None:
                result.exit_code = EXIT_BAD_LOSS
        # every exit (end, requeue, bad loss): `latest` is final
        self.checkpoints.finish_pending(blocking=True)
        self.heartbeat.idle(self.state.iteration)
        if save_root:
            result.last_checkpoint = self.checkpoints.latest()
            if result.exit_code == EXIT_BAD_LOSS:
                log.info(
                    f"newest checkpoint: {result.last_checkpoint or 'none'} (its weights were checked finite)"
                )
        self.metrics.close()
        if self.is_logger:  # every run folder gets its plot, also a run that never evaluated
            write_plot(self.output_dir, cfg.name)
        result.state = self.state
        return result

    def _forward_backward(self, iterators: list, forward_only: bool) -> list:
        """One step's micro-batches through Megatron's schedule (pipelined and interleaved as the layout
        says): the losses it returns, with gradients accumulated unless `forward_only`."""
        return get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.layout.num_microbatches,
            seq_length=self.config.model.seq_length,
            micro_batch_size=self.layout.micro_batch_size,
            forward_only=forward_only,
        )

    @property
    def forward_step(self):
        return partial(forward_step, z_loss_coeff=self.config.model.z_loss_coeff, meter=self.memory_meter)

    def _gives_up(self, values: dict) -> bool:
        """After a bad step: stop now (policy `stop`) or after too many bad steps in a row."""
        res = self.config.resilience
        if not values.get("skipped"):
            return False
        if res.on_bad_loss == "stop" or self.consecutive_skips >= res.max_consecutive_skips:
            log.info(
                f"stopping at step {self.state.iteration}: {values['skipped']} "
                f"({self.consecutive_skips} bad step(s) in a row); nothing from this step on is saved"
            )
            return True
        return False

    def train_step(self, timed: bool = True) -> dict[str, float]:
        """One optimizer step. `timed`: report this step's time (and on a GPU synchronize for it,
        metrics.StepTimer); an untimed GPU step's values carry no step time, throughput or MFU."""
        start = time.perf_counter()
        rank, step = self.info.rank, self.state.iteration + 1
        fault_injection.inject("stop", rank, step)
        self.stragglers.start_step()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        dp_rank = parallel_state.get_data_parallel_rank()
        indices = batch_indices(self.state.consumed_samples, self.layout, dp_rank)
        iterators = [
            self.stragglers.timed(
                fault_injection.slowed(microbatches(self.datasets.train, indices, self.device), rank, step)
            )
            for _ in self.model
        ]
        losses = self._forward_backward(iterators, forward_only=False)
        self.stragglers.end_step()
        fault_injection.inject("collective", rank, step)
        loss = self._reduce_loss(losses)
        verdict = self.loss_guard.check(loss)  # same loss on every rank, so the same decision
        grad_norm, skipped = None, None
        if verdict.ok:
            ok, grad_norm, _zeros = self.optimizer.step()
            skipped = None if ok else "optimizer skipped the step (overflow)"
        else:
            skipped = verdict.reason
        if self.memory_meter is not None:  # after the optimizer's first step has created its states
            self._record_memory()
        lr = self.optimizer.param_groups[0]["lr"]
        if skipped is None:
            self.scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            self.state.skipped_iterations += 1
            self.consecutive_skips += 1
            log.info(f"step {self.state.iteration + 1} skipped: {skipped}")
        self.state.iteration += 1
        self.state.extra["loss_guard"] = self.loss_guard.state_dict()
        gbs = self.layout.global_batch_size
        self.state.consumed_samples += gbs
        self.state.consumed_tokens += gbs * self.config.model.seq_length
        elapsed = self.step_timer.stop(start, reported=timed)
        values = {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_time_s": elapsed,
            "tokens_per_s": None,
            "consumed_tokens": self.state.consumed_tokens,
            "skipped": skipped,
        }
        if elapsed is None:  # an untimed GPU step: its time is in the next reported step's mean
            del values["step_time_s"], values["tokens_per_s"]
        else:
            values["tokens_per_s"] = gbs * self.config.model.seq_length / elapsed
        if self.router_stats is not None:  # load balance of the experts (every rank takes part)
            values.update(self.router_stats.step_values(self.layout.num_microbatches))
        if self.device.type == "cuda":  # FLOP rates against a GPU peak mean nothing on CPU
            if elapsed is not None:
                tflops = self.flops_per_token * values["tokens_per_s"] / self.info.world_size / 1e12
                values["tflops_per_gpu"] = tflops
                values["mfu"] = tflops / self.config.logging.peak_tflops
            values["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return values

    def _reduce_loss(self, losses: list[dict]) -> float:
        """Token-weighted mean loss of the step over all micro-batches and DP ranks, on every rank."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        # every CP rank reports its own tokens' share; TP ranks hold the same numbers
        is_reporter = (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        )
        if is_reporter:
            for item in losses:
                total += item["lm loss"].to(torch.float64)
        dist.all_reduce(total)  # non-reporters add zeros
        return float(total[0] / total[1].clamp(min=1))

    @torch.no_grad()
    def evaluate(self, dataset=None) -> float:
        """Validation loss on `dataset` (default: the blend's validation split)."""
        for chunk in self.model:
            chunk.eval()
        dp_rank = parallel_state.get_data_parallel_rank()
        gathered = []
        try:
            for i in range(self.config.schedule.eval_iters):
                indices = batch_indices(i * self.layout.global_batch_size, self.layout, dp_rank)
                iterators = [
                    microbatches(self.datasets.valid if dataset is None else dataset, indices, self.device)
                    for _ in self.model
                ]
                gathered += self._forward_backward(iterators, forward_only=True)
        finally:  # an evaluation that raises (a caught stop, a bad batch) must not leave dropout off
            for chunk in self.model:
                chunk.train()
        return self._reduce_loss(gathered)

    def save(self) -> Path | None:
        """Save a checkpoint of the current state (CheckpointManager.save): None when the state holds
        NaN/Inf and nothing was written. Call on every rank."""
        self.heartbeat.begin("save", self.state.iteration)
        fault_injection.inject("save", self.info.rank, self.state.iteration)
        started = time.perf_counter()
        self.state.extra["longest_save_s"] = self.deadline.longest_save  # for a chained job's deadline
        saved = self.checkpoints.save(self.state, self.model, self.optimizer, self.scheduler)
        # the longest rank's time, the same on every rank (it is part of the next checkpoint's common state)
        seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=self.device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        self.deadline.note_save(float(seconds.item()))
        return saved


def _announce_load(folder: Path, what: str) -> float:
    """Say that a checkpoint read (minutes for a large model on a shared file system) starts, and how
    much it reads; returns the start time for the line that ends it. SIGTERM meanwhile ends the run
    (signals.StopRequest: nothing is written during a load)."""
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    log.info(f"loading {what} {folder} ({size / 1e9:.2f} GB)")
    return time.perf_counter()


def run_training(config: TrainConfig) -> TrainResult:
    """Set up, train, tear down; the entry point of `kumihimo train` in every process."""
    trainer = Trainer(config)
    try:
        trainer.setup()
        return trainer.train()
    except StoppedBeforeTraining as stopped:
        log.info(f"{stopped.signal_name} before the first step: exiting (nothing trained, nothing to save)")
        return TrainResult(exit_code=EXIT_REQUEUE)
    finally:
        trainer.stop.restore()
        if trainer.lock is not None:
            trainer.lock.release()
        destroy()
