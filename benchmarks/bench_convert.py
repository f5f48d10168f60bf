"""Throughput and peak memory of `convert to-hf` and `convert from-hf` on tensors of LLM-jp-3 172B's shapes.

to-hf: a torch_dist checkpoint with the 172B layer shapes (hidden 12288, FFN 38464, 96 heads in 16
query groups, head_dim 128, vocabulary 99,487 padded to 99,840 for TP=4) but only a few layers is
synthesised chunk by chunk, laid out as Megatron saves it at TP=4 (one chunk per layer and TP rank;
SwiGLU fc1 as 2 x TP gate/up fragments), with run_config.yaml and kumihimo.json beside it. Then
`convert_to_hf` runs in a fresh process, which reports its peak RSS. Two layers are ~12 GB of bf16
on disk each way; peak RSS should stay near two copies of the largest tensor (the 2.45 GB embedding),
whatever the layer count.

from-hf: a Hugging Face LlamaForCausalLM folder of the same shapes (random bf16 weights in ~5 GB
safetensors shards, written a tensor at a time) is converted with `convert_from_hf(..., tp=4)` in a
fresh process. Peak RSS should stay near one copy of the largest tensor (the padded embedding) above
the interpreter's baseline, whatever the layer count.

moe: a Hugging Face Qwen3MoeForCausalLM folder of Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of
width 768, 32 heads in 4 query groups, head_dim 128, vocabulary 151,936; random bf16 weights) with a few
layers is converted by `convert_from_hf` and the result back by `convert_to_hf`, each in a fresh
process. A layer holds 384 expert matrices of 3 MiB (1.13 GiB); peak RSS should stay near the largest
tensor (the 0.58 GiB embedding) above the baseline, not grow with the layer.

    python benchmarks/bench_convert.py --workdir /tmp/bench-convert [--layers 2] [--dtype bf16]
        [--direction both|to-hf|from-hf|moe]

Reads come from the page cache when the machine has the RAM to keep the fresh files there: the
figure is then conversion + write speed, not the read speed of a cold parallel file system.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

HIDDEN, FFN, HEADS, GROUPS, HEAD_DIM = 12288, 38464, 96, 16, 128
VOCAB, PADDED_VOCAB, TP = 99487, 99840, 4
# Qwen3-30B-A3B (config.json): the MoE shapes of the moe direction
MOE_SHAPES = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
)


def tensor_layout(num_layers: int) -> dict[str, tuple[tuple[int, ...], int | None, int]]:
    """Megatron key -> (global shape, TP-split axis or None, fragments along it)."""
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM
    layers = {
        "self_attention.linear_qkv.layer_norm_weight": ((HIDDEN,), None, 1),
        "self_attention.linear_qkv.weight": ((qkv_rows, HIDDEN), 1, TP),
        "self_attention.linear_proj.weight": ((HIDDEN, HEADS * HEAD_DIM), 2, TP),
        "mlp.linear_fc1.layer_norm_weight": ((HIDDEN,), None, 1),
        "mlp.linear_fc1.weight": ((2 * FFN, HIDDEN), 1, 2 * TP),  # gate and up, each split over TP
        "mlp.linear_fc2.weight": ((HIDDEN, FFN), 2, TP),
    }
    layout = {
        f"decoder.layers.{name}": ((num_layers, *shape), axis, parts)
        for name, (shape, axis, parts) in layers.items()
    }
    layout["embedding.word_embeddings.weight"] = ((PADDED_VOCAB, HIDDEN), 0, TP)
    layout["decoder.final_layernorm.weight"] = ((HIDDEN,), None, 1)
    layout["output_layer.weight"] = ((PADDED_VOCAB, HIDDEN), 0, TP)
    return layout


def chunks_of(
    shape: tuple[int, ...], axis: int | None, parts: int, stacked: bool
) -> list[ChunkStorageMetadata]:
    """One chunk per layer (stacked tensors) and per TP fragment, as Megatron's torch_dist writes them."""
    layers = range(shape[0]) if stacked else [None]
    chunks = []
    for layer in layers:
        for part in range(parts):
            offsets, sizes = [0] * len(shape), list(shape)
            if layer is not None:
                offsets[0], sizes[0] = layer, 1
            if axis is not None:
                sizes[axis] = shape[axis] // parts
                offsets[axis] = part * sizes[axis]
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
    return chunks


class SyntheticSavePlanner(DefaultSavePlanner):
    """Plans the chunks above and creates each one only when the writer asks for it (bounded memory)."""

    def __init__(self, layout, dtype: torch.dtype):
        super().__init__()
        self.layout, self.dtype = layout, dtype

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, (shape, axis, parts) in self.layout.items():
            for chunk in chunks_of(shape, axis, parts, key.startswith("decoder.layers.")):
                items.append(
                    WriteItem(
                        index=MetadataIndex(key, chunk.offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=chunk, properties=TensorProperties(dtype=self.dtype), size=torch.Size(shape)
                        ),
                    )
                )
        self.plan = SavePlan(items, planner_data={})  # no flattened-key mappings: keys are already flat
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        offsets = write_item.tensor_data.chunk.offsets
        # Content does not matter for throughput; a chunk-dependent constant keeps it cheap to make.
        return torch.full(
            tuple(write_item.tensor_data.chunk.sizes), 0.01 * (1 + sum(offsets) % 97), dtype=self.dtype
        )


def synthesise(root: Path, num_layers: int) -> Path:
    """A checkpoint root as `kumihimo train` leaves it, with synthetic weights."""
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig

    folder = root / "iter_0000001"
    folder.mkdir(parents=True)
    dcp.save(
        {},
        storage_writer=FileSystemWriter(str(folder)),
        planner=SyntheticSavePlanner(tensor_layout(num_layers), torch.bfloat16),
        no_dist=True,
    )
    (folder / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    config = configtree.from_dict(
        TrainConfig,
        {
            "name": "bench-172b-shapes",
            "model": {
                "num_layers": num_layers,
                "hidden_size": HIDDEN,
                "ffn_hidden_size": FFN,
                "num_attention_heads": HEADS,
                "num_query_groups": GROUPS,
                "seq_length": 4096,
            },
            "parallelism": {"tensor_model_parallel_size": TP},
            "precision": {"params_dtype": "bf16"},
            "data": {"mock": True, "mock_vocab_size": VOCAB},
        },
    )
    configtree.save(config, folder / "run_config.yaml")
    meta = {
        "format": "kumihimo-torch_dist-v1",
        "vocab_size": VOCAB,
        "padded_vocab_size": PADDED_VOCAB,
        "tokenizer": None,
        "train_state": {"iteration": 1},
        "layout": {"tp": TP, "pp": 1},
    }
    (folder / "kumihimo.json").write_text(json.dumps(meta))
    (root / "latest_checkpointed_iteration.txt").write_text("1\n")
    return root


CHILD = """
import json, resource, sys, time
from kumihimo.pretrain.convert.to_hf import convert_to_hf
start = time.monotonic()
out = convert_to_hf(sys.argv[1], sys.argv[2], dtype=sys.argv[3])
seconds = time.monotonic() - start
index = json.loads((out / "model.safetensors.index.json").read_text())
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "bytes": index["metadata"]["total_size"],
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024}))
"""


def synthesise_hf(folder: Path, num_layers: int) -> tuple[Path, int]:
    """A Hugging Face Llama folder of the 172B shapes with random bf16 weights; returns (folder, bytes)."""
    from kumihimo.pretrain.convert.from_hf import expected_hf_tensors
    from kumihimo.pretrain.convert.mapping import LlamaDims
    from kumihimo.pretrain.convert.to_hf import (
        DEFAULT_MAX_SHARD_BYTES,
        PlannedTensor,
        StreamingSafetensorsWriter,
    )

    dims = LlamaDims(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        head_dim=HEAD_DIM,
        megatron_vocab_size=PADDED_VOCAB,
        hf_vocab_size=VOCAB,
    )
    shapes = expected_hf_tensors(dims)
    folder.mkdir(parents=True)
    planned = [PlannedTensor(name, shape, torch.bfloat16) for name, shape in shapes.items()]
    writer = StreamingSafetensorsWriter(folder, planned, DEFAULT_MAX_SHARD_BYTES)
    generator = torch.Generator().manual_seed(0)
    for tensor in planned:
        data = torch.empty(tensor.shape, dtype=torch.bfloat16)
        data.normal_(1.0 if data.dim() == 1 else 0.0, 0.02, generator=generator)
        writer.write(tensor.name, data)
        del data
    writer.finish()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": GROUPS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder, writer.bytes_written


CHILD_FROM_HF = """
import json, resource, sys, time
import megatron.core, pretrain.config, pretrain.parallel, tokenizer.spm  # imported before the baseline
from kumihimo.pretrain.convert.from_hf import convert_from_hf
baseline = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) * 1024
start = time.monotonic()
out = convert_from_hf(sys.argv[1], sys.argv[2], tp=int(sys.argv[3]))
seconds = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "bytes": sum(p.stat().st_size for p in out.rglob("*.distcp")),
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "baseline_rss_bytes": baseline,
                  "peak_rss_bytes": usage.ru_maxrss * 1024}))
"""


def synthesise_moe_hf(folder: Path, num_layers: int) -> tuple[Path, int, int]:
    """A Qwen3-MoE folder of MOE_SHAPES with random bf16 weights; returns (folder, bytes, largest tensor bytes)."""
    from kumihimo.pretrain.convert.from_hf import expected_hf_tensors
    from kumihimo.pretrain.convert.mapping import LlamaDims
    from kumihimo.pretrain.convert.to_hf import (
        DEFAULT_MAX_SHARD_BYTES,
        PlannedTensor,
        StreamingSafetensorsWriter,
    )

    shapes = MOE_SHAPES
    dims = LlamaDims(
        num_layers=num_layers,
        hidden_size=shapes["hidden_size"],
        ffn_hidden_size=shapes["intermediate_size"],
        num_attention_heads=shapes["num_attention_heads"],
        num_query_groups=shapes["num_key_value_heads"],
        head_dim=shapes["head_dim"],
        megatron_vocab_size=shapes["vocab_size"],
        hf_vocab_size=shapes["vocab_size"],
        qk_norm=True,
        num_experts=shapes["num_experts"],
        expert_ffn_hidden_size=shapes["moe_intermediate_size"],
    )
    folder.mkdir(parents=True)
    planned = [
        PlannedTensor(name, shape, torch.bfloat16) for name, shape in expected_hf_tensors(dims).items()
    ]
    writer = StreamingSafetensorsWriter(folder, planned, DEFAULT_MAX_SHARD_BYTES)
    generator = torch.Generator().manual_seed(0)
    for tensor in planned:
        data = torch.empty(tensor.shape, dtype=torch.bfloat16)
        data.normal_(1.0 if data.dim() == 1 else 0.0, 0.02, generator=generator)
        writer.write(tensor.name, data)
        del data
    writer.finish()
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **shapes,
        "num_hidden_layers": num_layers,
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder, writer.bytes_written, max(t.num_bytes for t in planned)


CHILD_TO_HF_BASELINE = """
import json, resource, sys, time
import megatron.core, pretrain.config, pretrain.parallel, tokenizer.spm  # imported before the baseline
from kumihimo.pretrain.convert.to_hf import convert_to_hf
baseline = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) * 1024
start = time.monotonic()
out = convert_to_hf(sys.argv[1], sys.argv[2], dtype=None)
seconds = time.monotonic() - start
index = json.loads((out / "model.safetensors.index.json").read_text())
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "bytes": index["metadata"]["total_size"],
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "baseline_rss_bytes": baseline,
                  "peak_rss_bytes": usage.ru_maxrss * 1024}))
"""


def _run_child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_moe(workdir: Path, num_layers: int) -> None:
    """from-hf then to-hf of a Qwen3-MoE folder, each in a fresh process, peak RSS above the baseline."""
    start = time.monotonic()
    folder, hf_bytes, largest = synthesise_moe_hf(workdir / "hf-source", num_layers)
    print(
        f"synthesised {hf_bytes / 1e9:.2f} GB Qwen3-MoE folder ({num_layers} layers of Qwen3-30B-A3B shapes, "
        f"bf16) in {time.monotonic() - start:.1f} s"
    )
    layer_bytes = (
        3 * MOE_SHAPES["num_experts"] * MOE_SHAPES["moe_intermediate_size"] * MOE_SHAPES["hidden_size"] * 2
    )
    for direction, code, args in (
        ("from-hf", CHILD_FROM_HF, (str(folder), str(workdir / "megatron"), "1")),
        ("to-hf", CHILD_TO_HF_BASELINE, (str(workdir / "megatron"), str(workdir / "hf-back"))),
    ):
        result = _run_child(code, *args)
        growth = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
        print(
            f"moe {direction}: {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.1f} s = "
            f"{result['bytes'] / 1e9 / result['seconds']:.2f} GB/s; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} "
            f"GiB = baseline {result['baseline_rss_bytes'] / 2**30:.2f} GiB + {growth / 2**30:.2f} GiB (largest "
            f"tensor {largest / 2**30:.2f} GiB, experts of one layer {layer_bytes / 2**30:.2f} GiB, model "
            f"{hf_bytes / 2**30:.2f} GiB); {result['cpu_seconds']:.1f} CPU-s"
        )


def bench_to_hf(workdir: Path, num_layers: int, dtype: str) -> None:
    start = time.monotonic()
    root = synthesise(workdir / "megatron", num_layers)
    ckpt_bytes = sum(p.stat().st_size for p in root.rglob("*.distcp"))
    print(
        f"synthesised {ckpt_bytes / 1e9:.2f} GB torch_dist checkpoint ({num_layers} layers of 172B shapes, "
        f"TP={TP} chunks) in {time.monotonic() - start:.1f} s"
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(workdir / "hf"), dtype], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    largest = PADDED_VOCAB * HIDDEN * 2  # the bf16 embedding, as stored
    print(
        f"to-hf --dtype {dtype}: wrote {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.1f} s = "
        f"{result['bytes'] / 1e9 / result['seconds']:.2f} GB/s; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} "
        f"GiB (largest stored tensor {largest / 2**30:.2f} GiB); {result['cpu_seconds']:.1f} CPU-s (the rest "
        "is waiting for the disk)"
    )


def bench_from_hf(workdir: Path, num_layers: int) -> None:
    start = time.monotonic()
    folder, hf_bytes = synthesise_hf(workdir / "hf-source", num_layers)
    print(
        f"synthesised {hf_bytes / 1e9:.2f} GB Hugging Face folder ({num_layers} layers of 172B shapes, bf16) "
        f"in {time.monotonic() - start:.1f} s"
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_FROM_HF, str(folder), str(workdir / "megatron-out"), str(TP)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    largest = PADDED_VOCAB * HIDDEN * 2  # the padded bf16 embedding (and output layer), one chunk each
    growth = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    print(
        f"from-hf --tp {TP}: wrote {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.1f} s = "
        f"{result['bytes'] / 1e9 / result['seconds']:.2f} GB/s; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} "
        f"GiB = baseline {result['baseline_rss_bytes'] / 2**30:.2f} GiB + {growth / 2**30:.2f} GiB "
        f"(largest tensor {largest / 2**30:.2f} GiB, model {hf_bytes / 2**30:.2f} GiB); "
        f"{result['cpu_seconds']:.1f} CPU-s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-convert"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="to-hf output dtype")
    parser.add_argument("--direction", choices=("both", "to-hf", "from-hf", "moe"), default="both")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic inputs and the outputs")
    args = parser.parse_args()
    if args.workdir.exists():
        sys.exit(
            f"{args.workdir} exists; pass a new --workdir (it gets ~{6 * args.layers + 5} GB per direction)"
        )
    try:
        if args.direction in ("both", "to-hf"):
            bench_to_hf(args.workdir / "to-hf", args.layers, args.dtype)
            if not args.keep:  # one direction's files at a time
                shutil.rmtree(args.workdir / "to-hf", ignore_errors=True)
        if args.direction in ("both", "from-hf"):
            bench_from_hf(args.workdir / "from-hf", args.layers)
        if args.direction == "moe":
            bench_moe(args.workdir / "moe", args.layers)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
