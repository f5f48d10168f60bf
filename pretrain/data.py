"""Training data: data_prep's indexed datasets blended by Megatron-Core, sampled per DP rank.

The blend comes from `blend.yaml` (written by `kumihimo data tokenize`) or inline in the config.
Megatron's BlendedMegatronDatasetBuilder builds the shuffling indices once on rank 0 into a cache
folder (`.npy` files) that every other rank, and every later run with the same data, reuses.

Sampling is a pure function of `consumed_samples`: the global batch of step s is samples
[s*GBS, (s+1)*GBS) of the blended dataset, cut into micro-batches; data-parallel rank r takes the r-th
slice of each. Resuming from a checkpoint therefore continues with exactly the next sample.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from kumihimo.errors import UserError
from pretrain.config import TrainConfig
from pretrain.parallel import ParallelLayout
from tokenizer.spm import Tokenizer


class MegatronTokenizerView:
    """The few attributes Megatron's GPTDataset asks of a tokenizer."""

    def __init__(self, vocab_size: int, eod: int, pad: int | None, identity: str):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1 if pad is None else pad
        self.unique_identifiers = OrderedDict(tokenizer=identity)

    @classmethod
    def from_config(cls, config: TrainConfig) -> MegatronTokenizerView:
        if config.data.tokenizer is None:  # mock data without a tokenizer
            return cls(config.data.mock_vocab_size, config.data.mock_vocab_size - 1, None, "mock")
        tok = Tokenizer.load(config.data.tokenizer)
        return cls(tok.vocab_size, tok.eod_id, tok.pad_id, tok.sha256)


def read_blend(config: TrainConfig) -> tuple[list[str], list[float]]:
    """Prefixes and weights of the blend; prefixes in blend.yaml are relative to its folder."""
    if config.data.blend_file is None:
        return [e.prefix for e in config.data.blend], [e.weight for e in config.data.blend]
    path = Path(config.data.blend_file)
    try:
        entries = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("blend")
    except yaml.YAMLError as exc:
        raise UserError(f"data.blend_file={str(path)!r} is not valid YAML ({exc}); regenerate it") from exc
    if not entries:
        raise UserError(f"data.blend_file={str(path)!r} has no 'blend' entries; regenerate it with "
                        "`kumihimo data tokenize`")
    prefixes, weights = [], []
    for i, entry in enumerate(entries):
        prefix = Path(entry["prefix"])
        prefix = prefix if prefix.is_absolute() else path.parent / prefix
        if not Path(f"{prefix}.idx").is_file():
            raise UserError(f"{path}: blend[{i}].prefix={str(prefix)!r} has no .idx file; rerun "
                            "`kumihimo data tokenize` or fix the path")
        prefixes.append(str(prefix))
        weights.append(float(entry["weight"]))
    return prefixes, weights


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None
    tokenizer: MegatronTokenizerView


def num_valid_samples(config: TrainConfig) -> int:
    sched = config.schedule
    if sched.eval_interval <= 0:
        return 0
    return sched.eval_iters * sched.global_batch_size


def build_datasets(config: TrainConfig, cache_dir: Path) -> Datasets:
    """Build (or load from the cache) the train and validation splits; call on every rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    data, sched = config.data, config.schedule
    tokenizer = MegatronTokenizerView.from_config(config)
    blend = None if data.mock else read_blend(config)
    dataset_config = GPTDatasetConfig(
        random_seed=config.runtime.seed,
        sequence_length=config.model.seq_length,
        blend=blend,
        split=data.split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=data.reset_attention_mask,
        mmap_bin_files=True,
    )
    sizes = [sched.train_iters * sched.global_batch_size, num_valid_samples(config), 0]
    if sizes[1] and float(data.split.split(",")[1]) == 0 and not data.mock:
        raise UserError(f"schedule.eval_interval={sched.eval_interval} needs a validation split but "
                        f"data.split={data.split!r} gives it weight 0; e.g. data.split=98,2,0")
    cls = MockGPTDataset if data.mock else GPTDataset
    train, valid, _test = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, dataset_config).build()
    return Datasets(train=train, valid=valid, tokenizer=tokenizer)


def batch_indices(consumed_samples: int, layout: ParallelLayout, dp_rank: int) -> list[list[int]]:
    """Dataset indices of this DP rank's micro-batches for the step starting at consumed_samples."""
    mbs, dp = layout.micro_batch_size, layout.dp
    batches = []
    for micro in range(layout.num_microbatches):
        start = consumed_samples + micro * mbs * dp + dp_rank * mbs
        batches.append(list(range(start, start + mbs)))
    return batches


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0] if samples[0][key] is not None}


def microbatches(dataset, indices: list[list[int]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of one step, moved to the device (tokens, labels, loss_mask, position_ids)."""
    for batch in indices:
        tensors = collate([dataset[i] for i in batch])
        yield {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
