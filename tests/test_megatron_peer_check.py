"""benchmarks/check_megatron_args.py in the suite: Megatron-LM's own argument parser and config builders
(megatron/training, shipped in the megatron-core 0.19.2 wheel) against kumihimo's configs for the same
published runs. Every differing field must carry its reason; a new difference fails here.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import check_megatron_args as peer  # noqa: E402

pytestmark = pytest.mark.slow  # Megatron-LM's parser and validate_args per case (~10 s of CPU each)


@pytest.mark.parametrize("case", sorted(peer.CASES))
def test_every_difference_from_megatron_lm_is_explained(case):
    unexplained = [d for d in peer.run_case(case) if d.reason is None]
    assert not unexplained, peer.format_report(case, unexplained, 0)


def test_a_changed_setting_is_caught(monkeypatch):
    """LLM-jp's arguments with the RoPE fusion off and full recompute: both show up unexplained."""
    base = peer.CASES["llmjp3-172b"]
    args = base.megatron_args.replace(
        "--recompute-activations --recompute-granularity selective", "--recompute-granularity full"
    )
    assert args != base.megatron_args
    changed = dataclasses.replace(
        base, megatron_args=args + " --no-rope-fusion --recompute-method uniform --recompute-num-layers 1"
    )
    monkeypatch.setitem(peer.CASES, "llmjp3-172b", changed)
    unexplained = {d.key for d in peer.run_case("llmjp3-172b") if d.reason is None}
    assert {
        "transformer.apply_rope_fusion",
        "transformer.recompute_granularity",
        "transformer.recompute_method",
        "transformer.recompute_num_layers",
    } <= unexplained
