"""Peak memory and time of one document-masked attention call: Megatron's dense mask vs document ids.

    python benchmarks/bench_document_mask.py --seq-length 8192 16384

For each length and each path, a fresh process times one attention call (batch 1, 8 heads in 4
query groups, head_dim 64, fp32, CPU, no grad) over a row of ~1000-token documents and prints the
peak resident memory above its inputs (Linux VmHWM, reset just before the call):
- dense: what kumihimo did before 2026-12-06, Megatron's per-sample mask (`create_attention_mask`,
  a float tril [1, s, s] cut after every EOD, then bool) and SDPA under it;
- documents: `pretrain.data.document_ids` and `SDPAttention`'s per-document calls;
- causal: plain causal SDPA with no document mask, for reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

EOD = 7
DOCUMENT_LENGTH = 1000


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, seq_length: int) -> None:
    import torch
    import torch.nn.functional as F
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kumihimo.pretrain.data import document_ids
    from kumihimo.pretrain.model import SDPAttention

    torch.manual_seed(0)
    tokens = torch.randint(EOD + 1, 1000, (seq_length,))
    tokens[torch.arange(DOCUMENT_LENGTH - 1, seq_length, DOCUMENT_LENGTH)] = EOD
    q = torch.randn(1, 8, seq_length, 64)
    k, v = torch.randn(1, 4, seq_length, 64), torch.randn(1, 4, seq_length, 64)
    config = TransformerConfig(
        num_layers=1, hidden_size=512, num_attention_heads=8, num_query_groups=4, attention_dropout=0.0
    )
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    with torch.no_grad():
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        base = rss_mib("VmRSS")
        start = time.perf_counter()
        if path == "dense":
            mask, _, _ = _get_ltor_masks_and_position_ids(tokens, EOD, True, True, False, True)
            F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[None], enable_gqa=True)
        elif path == "documents":
            attention._per_document(q, k, v, document_ids(tokens[None], EOD), torch.arange(seq_length))
        else:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        seconds = time.perf_counter() - start
    print(f"| {seq_length} | {path} | {rss_mib('VmHWM') - base:.0f} | {seconds:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-length", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--path", choices=["dense", "documents", "causal"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        measure(args.path, args.seq_length[0])
        return
    print("| sequence | path | peak above inputs (MiB) | seconds |\n|---:|---|---:|---:|", flush=True)
    for seq_length in args.seq_length:
        for path in ("dense", "documents", "causal"):
            cmd = [sys.executable, __file__, "--path", path, "--seq-length", str(seq_length)]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
