"""Training throughput on one GPU: kumihimo (Megatron-Core) vs a plain PyTorch Llama of the same shape.

Default shape: LLM-jp-3 172B's layers (hidden 12288, FFN 38464, 96 heads / 16 query groups, seq 4096,
vocabulary 99,840), as many layers as fit, TP=1, micro-batch 1, BF16, mock data. Both sides are
timed over the same steps after warm-up and converted to TFLOP/s with the same formula
(pretrain/metrics.py: 6N-style model FLOPs, causal attention counted in full). MFU is against
--peak-tflops (H100 SXM dense BF16: 989).

    python benchmarks/bench_train_gpu.py --layers 4                      # on a GPU
    python benchmarks/bench_train_gpu.py --tiny --device cpu --steps 4   # check the script on CPU

The plain side: RMSNorm, fused QKV, RoPE, torch scaled_dot_product_attention (GQA), SwiGLU, untied
embeddings, torch AdamW (fused on GPU), no parallelism. It is the peer a team without Megatron would
write, and the target our no-Transformer-Engine path must match or beat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "172b-layer": dict(hidden=12288, ffn=38464, heads=96, groups=16, seq=4096, vocab=99840),
    "tiny": dict(hidden=64, ffn=192, heads=4, groups=2, seq=128, vocab=1024),
}
WARMUP = 3


class Block(nn.Module):
    def __init__(self, hidden: int, ffn: int, heads: int, groups: int):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, hidden // heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden, eps=1e-5), nn.RMSNorm(hidden, eps=1e-5)
        self.qkv = nn.Linear(hidden, (heads + 2 * groups) * self.head_dim, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1
        )
        q = rope(q.view(b, s, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rope(k.view(b, s, self.groups, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class PlainLlama(nn.Module):
    def __init__(self, layers: int, hidden: int, ffn: int, heads: int, groups: int, seq: int, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, ffn, heads, groups) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden, eps=1e-5)
        self.head = nn.Linear(hidden, vocab, bias=False)
        head_dim = hidden // heads
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("cos", torch.cat([freqs, freqs], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([freqs, freqs], -1).sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def plain_step_times(shape: dict, layers: int, steps: int, device: str) -> list[float]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = PlainLlama(layers, **shape).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens = torch.randint(0, shape["vocab"], (1, shape["seq"] + 1), device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def kumihimo_step_times(shape: dict, layers: int, steps: int, device: str) -> list[float]:
    overrides = [
        f"model.num_layers={layers}",
        f"model.hidden_size={shape['hidden']}",
        f"model.ffn_hidden_size={shape['ffn']}",
        f"model.num_attention_heads={shape['heads']}",
        f"model.num_query_groups={shape['groups']}",
        f"model.seq_length={shape['seq']}",
        f"data.mock_vocab_size={shape['vocab']}",
        "model.make_vocab_size_divisible_by=128",
        f"runtime.device={device}",
        f"precision.params_dtype={'bf16' if device == 'cuda' else 'fp32'}",
        f"schedule.train_iters={steps}",
        "schedule.micro_batch_size=1",
        "schedule.global_batch_size=1",
        "schedule.lr_warmup_iters=1",
        "schedule.eval_interval=0",
        "checkpoint.enabled=false",
        "model.transformer_impl=auto",
        "logging.log_interval=1000",
        "logging.time_every_step=true",  # each step synchronized and timed
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "kumihimo.cli",
            "train",
            "configs/pretrain/tiny-cpu.yaml",
            *overrides,
            f"output_dir={tmp}",
        ]
        subprocess.run(
            cmd,
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, WANDB_MODE="disabled"),
        )
        metrics = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [m["step_time_s"] for m in metrics]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shape, to check the script anywhere")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    shape = SHAPES["tiny" if args.tiny else "172b-layer"]

    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.metrics import training_flops_per_token

    config = configtree.load(
        TrainConfig,
        REPO / "configs/pretrain/tiny-cpu.yaml",
        [
            f"model.num_layers={args.layers}",
            f"model.hidden_size={shape['hidden']}",
            f"model.ffn_hidden_size={shape['ffn']}",
            f"model.num_attention_heads={shape['heads']}",
            f"model.num_query_groups={shape['groups']}",
            f"model.seq_length={shape['seq']}",
        ],
    )
    flops_per_step = training_flops_per_token(config.model, shape["vocab"]) * shape["seq"]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{device_name}; {args.layers} layers of shape {shape}; micro-batch 1; median of steps after {WARMUP}"
    )
    for name, runner in (
        ("kumihimo (Megatron-Core)", kumihimo_step_times),
        ("plain PyTorch", plain_step_times),
    ):
        times = runner(shape, args.layers, args.steps, args.device)[WARMUP:]
        tflops = flops_per_step / statistics.median(times) / 1e12
        print(
            f"{name:<26} {statistics.median(times) * 1e3:9.1f} ms/step  {tflops:8.1f} TFLOP/s  "
            f"MFU {tflops / args.peak_tflops:6.1%}"
        )


if __name__ == "__main__":
    main()
