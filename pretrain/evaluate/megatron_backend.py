"""Score tasks on the Megatron model as it is laid out (TP/PP/CP/DP), without converting it.

Every rank calls `score_rows` with the same rows. The rows are split over data-parallel ranks; each
model-parallel group runs its share as PP micro-batches through Megatron's forward-only schedule (so
pipeline stages pass activations as in training, interleaved chunks included). On the last stage the logits at the scored
positions are picked, summed over context-parallel ranks (each holds its zigzag part of the sequence)
and gathered over tensor-parallel ranks (each holds a slice of the vocabulary); the scores are then
sent to every stage and gathered over data-parallel ranks, so every rank returns every row's scores.

`load_checkpoint_backend` builds the model of a saved run (its run_config.yaml) at any layout through
the trainer's own `build_model` and loads the weights with dist_checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from kumihimo.core.errors import UserError
from kumihimo.pretrain import checkpoint_format, checkpointing
from kumihimo.pretrain.checkpoint_format import source_vocab_rows
from kumihimo.pretrain.distributed import init_process_group
from kumihimo.pretrain.evaluate.scoring import Row, score_picked
from kumihimo.pretrain.model import build_model, context_parallel_positions, slice_for_context_parallel
from kumihimo.pretrain.parallel import ParallelLayout
from kumihimo.tokenizer.base import load_tokenizer


class MegatronBackend:
    def __init__(self, model_chunks: list, vocab_size: int, max_length: int, device: torch.device):
        self.model = model_chunks
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.device = device

    @torch.no_grad()
    def score_rows(self, rows: list[Row]) -> list[tuple[list[float], list[int]]]:
        dp = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        share = math.ceil(len(rows) / dp)
        mine = rows[dp_rank * share : (dp_rank + 1) * share]
        # Every DP rank runs one micro-batch, also when it has no rows (collectives must match).
        results = self._score_local(mine or [Row([0], [0], [0])])[: len(mine)]
        if dp == 1:
            return results
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, results, group=parallel_state.get_data_parallel_group())
        return [item for part in gathered for item in part]

    def _score_local(self, rows: list[Row]) -> list[tuple[list[float], list[int]]]:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        cp = parallel_state.get_context_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        # sequence parallel splits the sequence over TP, context parallel into 2 x CP chunks
        multiple = tp * 2 * cp if cp > 1 else tp
        width = max(len(r.tokens) for r in rows)
        width = -(-width // multiple) * multiple
        # PP micro-batches keep every stage busy (and the interleaved schedule needs at least PP)
        num_micro = pp
        micro_size = -(-len(rows) // num_micro)
        rows = rows + [Row([0], [0], [0])] * (num_micro * micro_size - len(rows))
        tokens = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            tokens[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        positions = torch.arange(width, device=self.device).expand(micro_size, width).contiguous()
        micro = [
            (rows[k : k + micro_size], {"tokens": tokens[k : k + micro_size], "position_ids": positions})
            for k in range(0, len(rows), micro_size)
        ]
        store: list = []

        def forward_step(data_iterator, model):
            micro_rows, batch = next(data_iterator)
            local = slice_for_context_parallel(batch)
            output = model(local["tokens"], local["position_ids"], None)

            def collect(logits):
                store.append(self._picked_logits(logits, micro_rows, width))
                return logits.sum() * 0.0, {}

            return output, collect

        iterators = [iter(micro) for _ in self.model]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=num_micro,
            seq_length=width,
            micro_batch_size=micro_size,
            forward_only=True,
        )
        results = score_picked(torch.cat(store), rows, self.vocab_size) if store else None
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            box = [results]
            dist.broadcast_object_list(
                box,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
            results = box[0]
        return results

    def _picked_logits(self, logits: torch.Tensor, rows: list[Row], width: int) -> torch.Tensor:
        """[b, s_local, V/TP] on the last stage -> [positions of all rows, V] (whole vocabulary)."""
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            picked = torch.cat([logits[i, row.positions] for i, row in enumerate(rows)])
        else:
            held = context_parallel_positions(width, cp, parallel_state.get_context_parallel_rank())
            local_index = torch.full((width,), -1, dtype=torch.long)
            local_index[held] = torch.arange(len(held))
            picked = torch.zeros(
                (sum(len(r.positions) for r in rows), logits.shape[-1]),
                dtype=logits.dtype,
                device=logits.device,
            )
            start = 0
            for i, row in enumerate(rows):
                where = local_index[row.positions]
                here = (where >= 0).nonzero()[:, 0]
                picked[start + here.to(picked.device)] = logits[i, where[here].to(logits.device)]
                start += len(row.positions)
            dist.all_reduce(picked, group=parallel_state.get_context_parallel_group())
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(picked) for _ in range(tp)]
            dist.all_gather(
                parts, picked.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
            )
            picked = torch.cat(parts, dim=-1)
        return picked.float()


# ---------------------------------------------------------------------------------------------
# A saved checkpoint, loaded at any layout
# ---------------------------------------------------------------------------------------------


class SPMCodec:
    """kumihimo's SentencePiece tokenizer with a leading BOS, as its exported HF tokenizer encodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_id
        self.eos_id = tokenizer.eos_id
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eod_id

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        return [self.bos_id, *ids] if self.bos_id is not None else ids

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def codec_for(tokenizer) -> SPMCodec:
    """The codec of a training tokenizer: SentencePiece, or a Hugging Face folder (kumihimo.tokenizer.hf)
    called as lm-evaluation-harness calls it."""
    if hasattr(tokenizer, "hf"):
        from kumihimo.pretrain.evaluate.hf_backend import HFCodec

        return HFCodec(tokenizer.hf)
    return SPMCodec(tokenizer)


@dataclass
class LoadedCheckpoint:
    backend: MegatronBackend
    codec: SPMCodec
    folder: Path
    iteration: int


def load_checkpoint_backend(
    root: Path,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    device: str = "cpu",
    iteration: int | None = None,
    tokenizer: str | None = None,
) -> LoadedCheckpoint:
    """Set up process groups at the requested layout (world = TP x PP x CP x DP), build the run's
    model and load the checkpoint's weights. Call in every process of the launch."""
    folder = (
        root
        if (root / checkpoint_format.META_FILE).is_file()
        else checkpoint_format.find_checkpoint(root, iteration)
    )
    meta = checkpoint_format.read_meta(folder)
    config = checkpoint_format.read_run_config(folder)
    par = config.parallelism
    par.tensor_model_parallel_size, par.pipeline_model_parallel_size = tensor_parallel, pipeline_parallel
    par.context_parallel_size, par.virtual_pipeline_model_parallel_size = context_parallel, None
    # every rank holds all experts (checkpoint keys do not depend on EP): no expert parallelism
    par.expert_model_parallel_size, par.expert_tensor_parallel_size = 1, None
    par.sequence_parallel = False
    par.use_distributed_optimizer = par.overlap_grad_reduce = par.overlap_param_gather = False
    config.runtime.device = device
    config.model.recompute = "none"  # no backward pass, nothing to recompute
    if device == "cpu":
        from kumihimo.pretrain import cpu_compat

        cpu_compat.activate()
    info = init_process_group(device, config.runtime.distributed_timeout_minutes)
    # one sequence per micro-batch per DP rank satisfies every batch rule; eval ignores the batch sizes
    dp = info.world_size // max(1, tensor_parallel * pipeline_parallel * context_parallel)
    config.schedule.micro_batch_size, config.schedule.global_batch_size = 1, max(dp, 1)
    layout = ParallelLayout.from_config(config, info.world_size)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp,
        )
    model_parallel_cuda_manual_seed(config.runtime.seed, inference_rng_tracker=device == "cpu")
    padded = layout.padded_vocab_size(meta["vocab_size"], config.model.make_vocab_size_divisible_by)
    if padded != meta["padded_vocab_size"]:
        raise UserError(
            f"{folder} was saved with a padded vocabulary of {meta['padded_vocab_size']} but TP={layout.tp} pads "
            f"to {padded}; evaluate at a tensor-parallel size that pads the same (e.g. the training one)"
        )
    chunks = build_model(
        config.model,
        config.precision,
        config.parallelism,
        config.fusions,
        layout,
        padded,
        device=config.runtime.device,
        seed=config.runtime.seed,
        deterministic=config.runtime.deterministic,
        micro_batch_size=config.schedule.micro_batch_size,
        reset_position_ids=config.data.reset_position_ids,
    )
    for chunk in chunks:
        chunk.eval()
    checkpointing.load_weights(folder, chunks)
    recorded = (meta.get("tokenizer") or {}).get("path") or config.data.tokenizer
    if tokenizer is None and recorded is None:
        raise UserError(f"{folder} was trained without a tokenizer (mock data); pass --tokenizer")
    spm = load_tokenizer(tokenizer or recorded)
    recorded_sha = (meta.get("tokenizer") or {}).get("sha256")
    if recorded_sha and getattr(spm, "sha256", recorded_sha) != recorded_sha:
        raise UserError(
            f"tokenizer {tokenizer or recorded} is not the one {folder} was trained with (sha256 {spm.sha256[:12]}... vs "
            f"{recorded_sha[:12]}...); pass the same model with --tokenizer"
        )
    if spm.vocab_size != meta["vocab_size"]:
        raise UserError(
            f"tokenizer {tokenizer or recorded} has {spm.vocab_size} pieces but {folder} was trained with "
            f"{meta['vocab_size']}; pass the tokenizer it was trained with (--tokenizer)"
        )
    device_obj = torch.device("cpu") if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    # Scored over the rows its Hugging Face export has (an import's config.json rows beyond the tokenizer
    # included), so `kumihimo eval` gives the export's numbers.
    rows = source_vocab_rows(meta, config)
    backend = MegatronBackend(chunks, rows, config.model.context_length, device_obj)
    state = meta.get("train_state") or {}
    return LoadedCheckpoint(backend, codec_for(spm), folder, int(state.get("iteration", -1)))
