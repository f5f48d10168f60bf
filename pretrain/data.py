"""Training data: data_prep's indexed datasets blended by Megatron-Core, sampled per DP rank.

The blend comes from `blend.yaml` (written by `kumihimo data tokenize`) or inline in the config.
Megatron's BlendedMegatronDatasetBuilder builds the shuffling indices once on rank 0 into a cache
folder (`.npy` files) that every other rank, and every later run with the same data, reuses.

Sampling is a pure function of `consumed_samples`: the global batch of step s is samples
[s*GBS, (s+1)*GBS) of the blended dataset, cut into micro-batches; data-parallel rank r takes the r-th
slice of each. Resuming from a checkpoint therefore continues with exactly the next sample.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.pretrain import data_inspection
from kumihimo.pretrain.config import DataConfig, ScheduleConfig, TrainConfig
from kumihimo.pretrain.parallel import ParallelLayout
from kumihimo.tokenizer.base import load_tokenizer

log = stage_logger("train")


class MegatronTokenizerView:
    """The few attributes Megatron's GPTDataset asks of a tokenizer."""

    def __init__(self, vocab_size: int, eod: int, pad: int | None, identity: dict | None):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1 if pad is None else pad
        self.identity = identity
        """`Tokenizer.identity()` (path, sha256, special ids) for checkpoints; None for mock data."""
        self.unique_identifiers = OrderedDict(tokenizer=identity["sha256"] if identity else "mock")

    @classmethod
    def from_config(cls, data: DataConfig) -> MegatronTokenizerView:
        if data.tokenizer is None:  # mock data without a tokenizer
            return cls(data.mock_vocab_size, data.mock_vocab_size - 1, None, None)
        tok = load_tokenizer(data.tokenizer)
        return cls(tok.vocab_size, tok.eod_id, tok.pad_id, tok.identity())


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None
    tokenizer: MegatronTokenizerView
    fingerprint: dict
    """What the sample stream depends on (`data_inspection.data_fingerprint`); saved in every checkpoint."""
    valid_by_source: dict[str, torch.utils.data.Dataset] = field(default_factory=dict)
    """Each blend prefix's own validation split, by source name (evaluation.per_source_validation)."""


def num_valid_samples(sched: ScheduleConfig) -> int:
    if sched.eval_interval <= 0:
        return 0
    return sched.eval_iters * sched.global_batch_size


def build_datasets(config: TrainConfig, cache_dir: Path) -> Datasets:
    """Build (or load from the cache) the train and validation splits; call on every rank."""
    # deferred: the batch helpers of this module (batch_indices, microbatches) do not need Megatron's builders
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    data, sched = config.data, config.schedule
    tokenizer = MegatronTokenizerView.from_config(config.data)
    prefixes, weights, infos = data_inspection.check_datasets_and_tokenizer(config.data)
    data_inspection.check_counts_and_ids(config.data, infos, tokenizer.vocab_size)
    sha = tokenizer.identity["sha256"] if tokenizer.identity else None
    fingerprint = data_inspection.data_fingerprint(
        config.data, config.model.seq_length, config.runtime.seed, infos, weights, sha
    )
    # Megatron keys its index cache by path, split, seed and length, not by the files' contents: a
    # dataset re-tokenized into the same path would reuse stale indices. Key the folder by contents.
    cache_dir = cache_dir / f"data-{data_inspection.fingerprint_digest(fingerprint)[:16]}"
    dataset_config = GPTDatasetConfig(
        random_seed=config.runtime.seed,
        sequence_length=config.model.seq_length,
        blend=None if data.mock else (prefixes, weights),
        split=data.split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        # never Megatron's dense [1, s, s] mask (4 GiB of floats per sample at 32k); documents
        # reach the attention as `document_ids` (see with_document_ids)
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    sizes = [sched.train_iters * sched.global_batch_size, num_valid_samples(sched), 0]
    if sizes[1] and float(data.split.split(",")[1]) == 0 and not data.mock:
        raise UserError(
            f"schedule.eval_interval={sched.eval_interval} needs a validation split but "
            f"data.split={data.split!r} gives it weight 0; e.g. data.split=98,2,0"
        )
    cls = MockGPTDataset if data.mock else GPTDataset
    started = time.monotonic()
    log.info(f"dataset indices: building or loading {cache_dir}")
    train, valid, _test = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, dataset_config).build()
    by_source = {}
    if sizes[1] and not data.mock and len(prefixes) > 1 and config.evaluation.per_source_validation:
        by_source = source_validation_sets(prefixes, sizes[1], dataset_config)
    for dataset in (train, valid, *by_source.values()):
        uncache_masks(dataset)
    if data.reset_attention_mask:
        train, valid = (None if d is None else DocumentIds(d, tokenizer.eod) for d in (train, valid))
        by_source = {name: DocumentIds(d, tokenizer.eod) for name, d in by_source.items()}
    log.info(f"dataset indices: ready in {time.monotonic() - started:.1f} s")
    return Datasets(train, valid, tokenizer, fingerprint, by_source)


def uncache_masks(dataset) -> None:
    """Make every GPTDataset under `dataset` (a blend holds one per prefix) build each sample's loss
    mask afresh.

    megatron-core 0.19's GPTDataset caches the loss mask of the first sample a process reads (when no
    reset_* / eod_mask_loss setting makes it sample-dependent) and then zeroes, in place, the positions
    whose label is the tokenizer's pad id: the cached mask itself keeps those zeros, so every later
    sample of that process loses the same positions from its loss. Which sample comes first differs
    between DP ranks, DP sizes and a resumed run, so losses depended on the layout and on whether the run
    was resumed (issue 22). Any tokenizer with a pad id that occurs as a label hits it; mock data
    without a tokenizer (pad id -1) does not. Rebuilding the mask costs O(seq_length) per sample.
    Upstream: Megatron-LM issues #1269 and #1711, pull request #6981 (open in 2026-12).
    """
    if dataset is None:
        return
    for part in getattr(dataset, "datasets", ()):
        uncache_masks(part)
    if hasattr(dataset, "masks_and_position_ids_are_cacheable"):
        dataset.masks_and_position_ids_are_cacheable = False


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """The index of each token's document within its row ([..., s] -> [..., s], int64).

    A document ends with, and includes, its end-of-document token: the boundaries Megatron's
    reset_attention_mask cuts its dense mask at (every key up to an EOD is hidden from the queries
    after it). The indices rise along the row, which the local attention relies on.
    """
    is_eod = (tokens == eod).to(torch.int64)
    return torch.cumsum(is_eod, dim=-1) - is_eod


class DocumentIds(torch.utils.data.Dataset):
    """A dataset whose samples also carry `document_ids` (data.reset_attention_mask): s integers per
    sequence where a dense mask would take s^2 bytes."""

    def __init__(self, dataset: torch.utils.data.Dataset, eod: int):
        self.dataset = dataset
        self.eod = eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        return {**sample, "document_ids": document_ids(sample["tokens"], self.eod)}


def source_validation_sets(
    prefixes: list[str], num_samples: int, dataset_config
) -> dict[str, torch.utils.data.Dataset]:
    """The validation split of each prefix alone (the same documents the blend validates on, since a
    prefix's split is cut by document before blending), `num_samples` sequences each."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    out = {}
    for prefix in prefixes:
        name = data_inspection.source_name(prefix)
        if name in out:
            raise UserError(
                f"two blend prefixes end in {name!r}; per-source validation names sources by file name, so "
                "rename one or set evaluation.per_source_validation=false"
            )
        single = dataclasses.replace(dataset_config, blend=([prefix], None))
        _train, valid, _test = BlendedMegatronDatasetBuilder(
            GPTDataset, [0, num_samples, 0], lambda: True, single
        ).build()
        out[name] = valid
    return out


def batch_indices(consumed_samples: int, layout: ParallelLayout, dp_rank: int) -> list[list[int]]:
    """Dataset indices of this DP rank's micro-batches for the step starting at consumed_samples."""
    mbs, dp = layout.micro_batch_size, layout.dp
    batches = []
    for micro in range(layout.num_microbatches):
        start = consumed_samples + micro * mbs * dp + dp_rank * mbs
        batches.append(list(range(start, start + mbs)))
    return batches


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the model inputs; the blend's extra fields (e.g. dataset_id) are not model inputs."""
    return {
        key: torch.stack([s[key] for s in samples])
        for key in BATCH_KEYS
        if isinstance(samples[0].get(key), torch.Tensor)
    }


def microbatches(
    dataset, indices: list[list[int]], device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of one step, moved to the device (tokens, labels, loss_mask, position_ids, and
    document_ids with data.reset_attention_mask)."""
    for batch in indices:
        tensors = collate([dataset[i] for i in batch])
        yield {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
