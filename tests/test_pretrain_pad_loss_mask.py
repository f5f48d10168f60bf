"""A tokenizer with a pad id (every SentencePiece model `kumihimo tokenizer train` writes has one) must
not make the loss depend on the data-parallel layout or on resuming (issue 22).

megatron-core 0.19's GPTDataset cached the loss mask of the first sample a process read, with that
sample's pad-label positions zeroed in place, and applied it to every later sample: DP=1 and DP=2 trained
on different loss masks (step-1 loss 6.953803 vs 6.953419) and a resumed DP=2 run, whose ranks read
another first sample, drifted from the straight run (step-3 loss 6.754444 vs 6.752714).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_cli
from tests.test_convert_to_hf import train_spm
from tests.test_pretrain_distopt_resume import copy_checkpoint, curve

PAD_ID = 3  # train_spm's


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("tok") / "tok", seed=1)


def build_train_split(tokenizer: Path, cache: Path):
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.data import build_datasets

    config = TrainConfig()
    config.data.mock = True
    config.data.tokenizer = str(tokenizer)
    config.model.seq_length = 64
    config.schedule.train_iters = 2
    config.schedule.global_batch_size = 16
    config.schedule.eval_interval = 0
    return build_datasets(config, cache).train


def test_loss_mask_does_not_depend_on_which_sample_was_read_first(tmp_path, tokenizer):
    """Each sample's loss mask hides exactly its own pad labels, whatever the process read before: a
    process that starts at a sample with a pad label (as a DP rank or a resumed run may) sees the same
    masks as one that starts at a sample without."""
    indices = range(32)
    probe = build_train_split(tokenizer, tmp_path / "cache")
    masked = [i for i in indices if probe[i]["loss_mask"].sum() < 64]
    clean = [i for i in indices if i not in masked]
    assert masked and clean, "the test needs samples with and without a pad label"
    first_clean, first_masked = (build_train_split(tokenizer, tmp_path / "cache") for _ in range(2))
    reference = {i: first_clean[i]["loss_mask"].tolist() for i in [clean[0], *indices]}
    after_masked = {i: first_masked[i]["loss_mask"].tolist() for i in [masked[0], *indices]}
    assert after_masked == reference
    assert all(sum(reference[i]) == 64 for i in clean)


TOKENIZED = (
    "model.num_layers=2",
    "model.seq_length=64",
    "schedule.micro_batch_size=2",
    "schedule.global_batch_size=8",
    "schedule.lr_warmup_iters=1",
    "schedule.eval_interval=0",
    "logging.log_interval=1",
    "checkpoint.save_interval=2",
    "checkpoint.keep_last=null",
)


def train(run_dir, tokenizer, *overrides, nproc=2):
    args = ["train", "configs/pretrain/tiny-cpu.yaml", *TOKENIZED, f"data.tokenizer={tokenizer}"]
    args += [f"output_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *overrides]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_dp2_with_a_tokenizer_resumes_exactly_and_matches_dp1(tmp_path, tokenizer):
    """DP=2 with 2 micro-batches per rank and a real tokenizer (pad id 3, vocabulary 1000 padded to 1024):
    steps 3-5 after a resume from step 2 equal the straight run bit for bit, and step 1 equals DP=1's
    (4 micro-batches on one rank) within fp32 reduction-order tolerance."""
    straight, resumed, dp1 = tmp_path / "straight", tmp_path / "resumed", tmp_path / "dp1"
    train(straight, tokenizer, "schedule.train_iters=5")
    copy_checkpoint(straight, 2, resumed)
    proc = train(resumed, tokenizer, "schedule.train_iters=5")
    assert "resumed from" in proc.stderr
    after = curve(resumed)
    assert [step for step, _, _ in after] == [3, 4, 5]
    assert after == curve(straight)[2:]
    train(dp1, tokenizer, "schedule.train_iters=5", "schedule.exit_after_iters=1", nproc=1)
    first_dp1, first_dp2 = read_metrics(dp1)[0], read_metrics(straight)[0]
    assert first_dp1["loss"] == pytest.approx(first_dp2["loss"], abs=2e-6)
    assert first_dp1["grad_norm"] == pytest.approx(first_dp2["grad_norm"], rel=1e-5)
