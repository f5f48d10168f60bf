"""Dense kumihimo checkpoint -> mixture-of-experts checkpoint: plain upcycling and Drop-Upcycling.

Upcycling (Komatsuzaki et al., 2023) builds an MoE model from a trained dense one: every layer's MLP
becomes `num_experts` experts, each a copy of the dense SwiGLU, behind a new router; everything else
(embedding, attention, norms, head) is copied (the dense pre-MLP norm `mlp.linear_fc1.layer_norm_weight`
becomes the MoE layer's `pre_mlp_layernorm.weight`). The first `dense_first_layers` layers may keep their
dense MLP as it is (`--dense-first-layers`, model.moe.dense_first_layers: DeepSeek's
first_k_dense_replace). With Megatron's default routing (top-k of the router logits, then a softmax
over those k: `model.moe.router_pre_softmax=false`, as Mixtral and Qwen3-MoE route) the k weights of a
token sum to 1, so identical experts mix back to exactly the dense MLP, whatever the router says: the
upcycled model computes the dense model's function at step 0 (tests/test_convert_moe.py: logits
equal). The router is drawn from N(0, model.init_method_std). Softmax-then-top-k routing
(router_pre_softmax=true) would scale each token's MLP output by the sum of its k probabilities, so it
is refused.

Drop-Upcycling (Nakamura et al., "Drop-Upcycling: Training Sparse Mixture of Experts with Partial
Re-initialization", ICLR 2025; LLM-jp-3 8x1.8B and 8x13B were built with it) breaks the symmetry of
the copies: for each expert, a random subset of round(r x F) of the F intermediate channels is drawn,
and the weights of those channels, i.e. their rows of the gate and up projections (Megatron's
linear_fc1 rows c and F + c) and their columns of the down projection (linear_fc2), are re-initialised
from a normal distribution with the mean and standard deviation of the original weights they replace,
per matrix. Each expert (of each layer) draws its own subset, so the experts start diverse while
keeping (1 - r) of the dense knowledge; r = 0 is plain upcycling, r = 1 re-initialises every expert
(the paper's best long-run setting is r = 0.5). LLM-jp's released conversion script additionally
permutes the channels of each expert (which changes nothing a model computes) and draws the replaced
channels of each matrix separately; here one subset per expert is shared by the three matrices, as
the paper describes, so a replaced channel is replaced whole.

Randomness is reproducible and independent of order and layout: the router of layer l and the subset
and values of expert e of layer l come from generators seeded by (seed, l) and (seed, l, e).

The output is laid out as `convert from-hf` writes it (weights only, iter_0000000, run_config.yaml
with the model.moe section and parallelism.expert_model_parallel_size, kumihimo.json recording the
source, the ratio and the seed, the tokenizer copied beside it), streamed one tensor at a time: memory
stays near a few copies of the largest tensor (one dense MLP matrix and one expert's copy of it).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.core.progress import Progress
from kumihimo.pretrain import checkpoint_format
from kumihimo.pretrain.config import BranchConfig, TrainConfig, check_model_fits_layout
from kumihimo.pretrain.convert.average import copy_tokenizer
from kumihimo.pretrain.convert.dcp_files import (
    pickled_object,
    save_streamed,
    staged_output,
    weights_only_meta,
)
from kumihimo.pretrain.convert.from_hf import Chunk, plan_chunks, write_item_for
from kumihimo.pretrain.convert.mapping import LlamaDims, global_rules, layer_rules, stored_index, stored_key
from kumihimo.pretrain.convert.to_hf import Source, check_architecture, open_checkpoint

ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
DENSE_FC1 = "decoder.layers.mlp.linear_fc1.weight"
DENSE_FC2 = "decoder.layers.mlp.linear_fc2.weight"
# the pre-MLP norm: fused into a dense layer's fc1, a module of its own in an MoE layer
DENSE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
MOE_NORM = "decoder.layers.pre_mlp_layernorm.weight"

log = stage_logger("upcycle")


def generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from the tuple `seeds` (numpy's SeedSequence mixes them, so (1, 2) and
    (2, 1) differ and no two tuples collide in practice)."""
    state = np.random.SeedSequence([int(s) for s in seeds]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def dropped_channels(num_channels: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """The sorted indices of the round(ratio x num_channels) channels one expert re-initialises."""
    count = round(ratio * num_channels)
    return torch.randperm(num_channels, generator=gen)[:count].sort().values


def _normal_like(original: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values from N(mean, std) of `original` (float32 statistics; std 0 for a single value)."""
    values = original.to(torch.float32)
    std = values.std().item() if values.numel() > 1 else 0.0
    return torch.randn(shape, generator=gen) * std + values.mean().item()


def expert_weights(
    fc1: torch.Tensor, fc2: torch.Tensor, ratio: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (linear_fc1 [2F, H], linear_fc2 [H, F]) from the dense MLP's: a copy with the
    channels `dropped_channels` draws re-initialised (gate rows, up rows, down columns, in that order of
    draws); the dtype of the inputs."""
    channels = fc2.shape[1]
    dropped = dropped_channels(channels, ratio, gen)
    fc1, fc2 = fc1.clone(), fc2.clone()
    if len(dropped) == 0:
        return fc1, fc2
    for rows in (dropped, dropped + channels):  # gate half, then up half
        fc1[rows] = _normal_like(fc1[rows], (len(dropped), fc1.shape[1]), gen).to(fc1.dtype)
    fc2[:, dropped] = _normal_like(fc2[:, dropped], (fc2.shape[0], len(dropped)), gen).to(fc2.dtype)
    return fc1, fc2


def moe_config(source: Source, num_experts: int, router_topk: int, ep: int, dense_first_layers: int = 0):
    """The source's TrainConfig with every MLP but the first `dense_first_layers` made `num_experts`
    experts of the dense width."""
    if source.config.model.moe.num_experts:
        raise UserError(
            f"{source.folder} is already a mixture of experts (model.moe.num_experts="
            f"{source.config.model.moe.num_experts}); upcycle a dense checkpoint"
        )
    if num_experts < 2 or not 1 <= router_topk <= num_experts:
        raise UserError(
            f"--num-experts={num_experts} --router-topk={router_topk}: upcycling needs at least 2 experts "
            "and a top-k between 1 and the number of experts"
        )
    num_layers = source.config.model.num_layers
    if not 0 <= dense_first_layers < num_layers:
        raise UserError(
            f"--dense-first-layers={dense_first_layers} is not within 0..{num_layers - 1}: the model has "
            f"{num_layers} layers and at least one must become a mixture of experts"
        )
    data = configtree.to_dict(source.config)
    data["model"]["moe"] = {
        **data["model"].get("moe", {}),
        "num_experts": num_experts,
        "router_topk": router_topk,
        "ffn_hidden_size": source.config.model.ffn_hidden_size,
        "dense_first_layers": dense_first_layers,
        # top-k then softmax: the k weights sum to 1, so identical experts give the dense output.
        "router_pre_softmax": False,
    }
    data["parallelism"]["expert_model_parallel_size"] = ep
    if source.config.parallelism.tensor_model_parallel_size > 1:  # Megatron-Core's MoE under TP needs SP
        data["parallelism"]["sequence_parallel"] = True
    config = configtree.from_dict(TrainConfig, data)
    config.model.validate()
    check_model_fits_layout(config.model, config.parallelism)
    # A new root, not a run (as from-hf and average write it).
    config.output_dir, config.branch = TrainConfig().output_dir, BranchConfig()
    config.checkpoint.dir = config.checkpoint.load = config.checkpoint.pretrained = None
    return config


class _UpcyclingSavePlanner(DefaultSavePlanner):
    """Plans the MoE model's chunks and makes each one's data from the dense checkpoint when asked."""

    def __init__(self, source: Source, dense: LlamaDims, moe: LlamaDims, ratio: float, seed: int, std: float):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        chunks = plan_chunks(moe)
        self.dtype = source.reader.dtype("embedding.word_embeddings.weight")
        self.items = [write_item_for(chunk, moe, self.dtype) for chunk in chunks]
        self.chunks = {item.index: chunk for item, chunk in zip(self.items, chunks)}
        self.reader, self.dense, self.moe = source.reader, dense, moe
        self.ratio, self.seed, self.std = ratio, seed, std
        self.progress: Progress | None = None
        self._dense_mlp: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._expert: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def _read_dense(self, megatron_key: str, layer: int | None) -> torch.Tensor:
        rule = next(  # the dense model's layers are alike: layer 0's rules are every layer's
            r for r in (*global_rules(self.dense), *layer_rules(self.dense, 0)) if r.megatron == megatron_key
        )
        key = stored_key(rule, self.dense, layer)
        return self.reader.read({key: (key, stored_index(rule, self.dense, layer))})[key]

    def _expert_pair(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fc1, fc2) of one expert, kept until another is asked for (fc1 is written as two chunks)."""
        if self._expert is not None and self._expert[0] == (layer, expert):
            return self._expert[1]
        self._expert = None
        if self._dense_mlp is None or self._dense_mlp[0] != layer:
            self._dense_mlp = None  # free the previous layer's before reading this one's
            self._dense_mlp = (
                layer,
                (self._read_dense(DENSE_FC1, layer), self._read_dense(DENSE_FC2, layer)),
            )
        fc1, fc2 = self._dense_mlp[1]
        pair = expert_weights(fc1, fc2, self.ratio, generator(self.seed, layer, expert))
        self._expert = ((layer, expert), pair)
        return pair

    def _data(self, chunk: Chunk) -> torch.Tensor:
        rule = chunk.rule
        if rule.megatron == ROUTER:
            shape = (self.moe.num_experts, self.moe.hidden_size)
            return (torch.randn(shape, generator=generator(self.seed, chunk.layer)) * self.std).to(self.dtype)
        if rule.megatron in (EXPERT_FC1, EXPERT_FC2):
            return self._expert_pair(chunk.layer, chunk.expert)[rule.megatron == EXPERT_FC2]
        return self._read_dense(DENSE_NORM if rule.megatron == MOE_NORM else rule.megatron, chunk.layer)

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        chunk: Chunk = self.chunks[write_item.index]
        if chunk.ends_layer and self.progress is not None:
            self.progress.update()
        if chunk.rule is None:
            return pickled_object(chunk.payload)
        data = self._data(chunk)
        start, stop = chunk.rows
        if (start, stop) != (0, data.shape[0]):
            data = data[start:stop]
        data = data.clone() if data.untyped_storage().nbytes() != data.nbytes else data
        return data.view(*[1] * len(chunk.index), *data.shape)


def output_meta(source: Source, ratio: float, seed: int, tokenizer: dict[str, Any] | None) -> dict[str, Any]:

    info: dict[str, Any] = {
        "upcycled_from": {
            "checkpoint": str(source.folder.resolve()),
            "iteration": source.iteration,
            "consumed_tokens": (source.meta.get("train_state") or {}).get("consumed_tokens"),
        },
        "method": "drop-upcycling" if ratio > 0 else "upcycling",
        "drop_ratio": ratio,
        "seed": seed,
    }
    rows = checkpoint_format.imported_vocab_rows(source.meta, source.config)
    if isinstance(rows, int):  # rows of an imported model beyond its tokenizer go back on export
        info["hf_vocab_size"] = rows
    return weights_only_meta(source.meta["vocab_size"], source.meta["padded_vocab_size"], tokenizer, info)


def upcycle_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    num_experts: int,
    router_topk: int,
    drop_ratio: float = 0.0,
    seed: int = 0,
    ep: int = 1,
    iteration: int | None = None,
    dense_first_layers: int = 0,
) -> Path:
    """Write the weights-only MoE checkpoint root upcycled from the dense `checkpoint`; returns it.

    `drop_ratio` r in [0, 1]: the share of each expert's intermediate channels Drop-Upcycling
    re-initialises (0: plain upcycling). `ep` is the expert-parallel size recorded in run_config.yaml
    (the weights load at any layout). The first `dense_first_layers` layers keep their dense MLP as it is
    (model.moe.dense_first_layers)."""
    if not 0.0 <= drop_ratio <= 1.0:
        raise UserError(
            f"--drop-ratio={drop_ratio} is not within [0, 1]; 0 is plain upcycling, 0.5 the paper's"
        )
    source = open_checkpoint(Path(checkpoint), iteration)
    config = moe_config(source, num_experts, router_topk, ep, dense_first_layers)
    padded = source.meta["padded_vocab_size"]
    dense = LlamaDims.from_model(source.config.model, megatron_vocab_size=padded, hf_vocab_size=padded)
    check_architecture(source.reader, dense)
    moe = LlamaDims.from_model(config.model, megatron_vocab_size=padded, hf_vocab_size=padded)
    output_dir = Path(output_dir)
    started = time.monotonic()
    with staged_output(output_dir, "convert upcycle") as staging:
        tokenizer = copy_tokenizer(source, output_dir, staging)
        config.data.tokenizer = tokenizer["path"] if tokenizer else config.data.tokenizer
        folder = checkpoint_format.iteration_dir(staging, 0)
        folder.mkdir()
        planner = _UpcyclingSavePlanner(source, dense, moe, drop_ratio, seed, config.model.init_method_std)
        with Progress("upcycle", total=moe.num_layers, unit="layers") as progress:
            planner.progress = progress
            num_bytes = save_streamed(folder, planner)
        configtree.save(config, folder / checkpoint_format.CONFIG_FILE)
        meta = output_meta(source, drop_ratio, seed, tokenizer)
        (folder / checkpoint_format.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / checkpoint_format.LATEST_FILE).write_text("0\n")
    elapsed = time.monotonic() - started
    method = f"Drop-Upcycling r={drop_ratio}" if drop_ratio else "upcycling"
    log.info(
        f"wrote weights-only MoE checkpoint {output_dir} ({method}, {num_experts} experts, top-"
        f"{router_topk}, seed {seed}; {num_bytes / 1e9:.2f} GB in {elapsed:.1f} s); train it with "
        "checkpoint.pretrained or export it with `kumihimo convert to-hf`"
    )
    return output_dir
