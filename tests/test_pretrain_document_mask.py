"""Per-document attention (data.reset_attention_mask) without a dense mask, and RoPE that follows
reset position ids (data.reset_position_ids).

Fast tier: the document ids cut where Megatron's dense mask cuts, and the local SDPA attention equals
attention under that dense mask, for whole rows and for context-parallel (zigzag) query chunks.
Slow tier: one `kumihimo train` step with both settings saves a checkpoint; loaded at TP=1, TP=2 and
CP=2 (gloo, 2 processes) the logits of a packed row A|B equal those of A and of B run alone (fp32,
1e-6), and the exported Hugging Face model, given position_ids that restart at B, gives the same
per-token log-probabilities.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kumihimo.core.configtree import ConfigError, load
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.data import document_ids
from tests.conftest import REPO, read_metrics, run_cli

TINY = "configs/pretrain/tiny-cpu.yaml"
EOD = 1023  # mock data without a tokenizer: vocabulary 1024, EOD its last id
DOCS = "data.reset_attention_mask=true", "data.reset_position_ids=true"


def megatron_masks(tokens: torch.Tensor):
    """Megatron's own dense mask (True = hidden) and reset position ids for one row."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    mask, _loss_mask, positions = _get_ltor_masks_and_position_ids(
        tokens, EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=False,
        create_attention_mask=True,
    )  # fmt: skip
    return mask[0], positions


def rows() -> torch.Tensor:
    """Rows with documents of several lengths, an EOD first and last, and one with no EOD."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, EOD, (4, 24), generator=gen)
    for row, ends in enumerate([(5, 6, 15), (0, 23), (), (11,)]):
        tokens[row, list(ends)] = EOD
    return tokens


def test_document_ids_cut_where_megatron_masks():
    for tokens in rows():
        ids = document_ids(tokens, EOD)
        mask, positions = megatron_masks(tokens)
        same_document = ids[:, None] == ids[None, :]
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        assert torch.equal(~mask, same_document & causal)
        starts = torch.searchsorted(ids, ids)
        assert torch.equal(positions, torch.arange(len(tokens)) - starts)


@pytest.fixture(scope="module")
def attention():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kumihimo.pretrain.model import SDPAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, attention_dropout=0.0
    )
    return SDPAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.3)


def dense_reference(q, k, v, tokens):
    """[b, h, s, d] attention under Megatron's dense mask, one row at a time."""
    keep = torch.stack([~megatron_masks(row)[0] for row in tokens])[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3, enable_gqa=True)


def qkv(batch: int, seq: int):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, 4, seq, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, 2, seq, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


def test_local_attention_per_document_equals_the_dense_mask(attention):
    tokens = rows()
    q, k, v = qkv(*tokens.shape)
    expected = dense_reference(q, k, v, tokens)
    # the module's own layout: [s, b, h, d] in, [s, b, h * d] out
    as_sbhd = (t.permute(2, 0, 1, 3) for t in (q, k, v))
    out = attention(*as_sbhd, document_ids(tokens, EOD))
    torch.testing.assert_close(out, expected.permute(2, 0, 1, 3).reshape(24, 4, 32), rtol=0, atol=1e-12)
    # and without documents it is still plain causal attention over the whole row
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    plain = attention(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), None)
    torch.testing.assert_close(plain, causal.permute(2, 0, 1, 3).reshape(24, 4, 32), rtol=0, atol=0)


@pytest.mark.parametrize("cp_size", [2, 3])
def test_context_parallel_query_chunks_see_their_documents_only(attention, cp_size):
    """Each CP rank's zigzag chunks, against the gathered keys: the rows of the dense reference."""
    from kumihimo.pretrain.model import context_parallel_positions

    tokens = rows()
    q, k, v = qkv(*tokens.shape)
    expected = dense_reference(q, k, v, tokens)
    for rank in range(cp_size):
        positions = context_parallel_positions(24, cp_size, rank)
        out = attention._per_document(q[:, :, positions], k, v, document_ids(tokens, EOD), positions)
        torch.testing.assert_close(out, expected[:, :, positions], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "overrides",
    [
        ("runtime.device=cuda", "model.transformer_impl=auto"),
        ("runtime.device=cuda", "model.transformer_impl=transformer_engine"),
    ],
)
def test_transformer_engine_with_document_masks_is_refused(overrides):
    with pytest.raises(ConfigError, match=r"\(TE ignores the mask\); set model.transformer_impl=local"):
        load(TrainConfig, TINY, [*DOCS, *overrides])
    load(TrainConfig, TINY, [*DOCS, "runtime.device=cuda", "model.transformer_impl=local"])
    load(TrainConfig, TINY, list(overrides))  # TE without document masks stays allowed


def test_unfused_attention_with_document_masks_is_refused():
    with pytest.raises(ConfigError, match="model.local_attention='unfused' has no per-document attention"):
        load(TrainConfig, TINY, [*DOCS, "model.local_attention=unfused"])


def test_check_names_the_transformer_engine_refusal():
    proc = run_cli("train", TINY, *DOCS, "runtime.device=cuda", "model.transformer_impl=auto", "--check")
    assert proc.returncode != 0
    assert "TE ignores the mask" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------- packed rows, slow

A_LENGTH, B_LENGTH = 12, 20  # multiples of 2 x CP, so each also runs alone at CP=2


def packed_rows() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, EOD, (1, A_LENGTH), generator=gen)
    a[0, -1] = EOD
    b = torch.randint(0, EOD, (1, B_LENGTH), generator=gen)
    return {"packed": torch.cat([a, b], dim=1), "a": a, "b": b}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One training step with document masks and reset positions, saved."""
    run_dir = tmp_path_factory.mktemp("docs")
    proc = run_cli(
        "train", TINY, *DOCS, "model.num_layers=2", "schedule.train_iters=1", "schedule.lr_warmup_iters=0",
        "schedule.eval_interval=0", "logging.log_interval=1", f"output_dir={run_dir}",
        f"checkpoint.dir={run_dir}/ckpt", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "ckpt"


@pytest.mark.slow
def test_pipeline_parallel_with_full_recompute_trains_like_one_process(checkpoint, tmp_path):
    """Document ids reach every pipeline stage and pass through activation recomputation."""
    proc = run_cli(
        "train", TINY, *DOCS, "model.num_layers=2", "schedule.train_iters=1", "schedule.lr_warmup_iters=0",
        "schedule.eval_interval=0", "logging.log_interval=1", f"output_dir={tmp_path}",
        f"checkpoint.dir={tmp_path}/ckpt", "parallelism.pipeline_model_parallel_size=2",
        "model.recompute=full", "checkpoint.save_interval=0", "--nproc-per-node", "2", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (single,) = read_metrics(checkpoint.parent)
    (pp2,) = read_metrics(tmp_path)
    assert pp2["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert pp2["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)


@pytest.fixture(scope="module")
def logits(checkpoint, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Full-vocabulary logits of the packed row, A and B at each layout (all three run at once)."""
    out = tmp_path_factory.mktemp("logits")
    layouts = {"tp1": (1, 1, 1), "tp2": (2, 2, 1), "cp2": (2, 1, 2)}
    procs = {}
    for name, (nproc, tp, cp) in layouts.items():
        launcher = [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--standalone",
        ]
        procs[name] = subprocess.Popen(
            [sys.executable, *launcher, "-m", "tests.test_pretrain_document_mask", str(checkpoint),
             str(out / f"{name}.pt"), str(tp), str(cp)],
            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name} failed:\n{text[-3000:]}"
    return {name: torch.load(out / f"{name}.pt") for name in layouts}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "cp2"])
def test_packed_row_logits_equal_each_document_alone(logits, layout):
    result = logits[layout]
    packed = result["packed"][0]
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed[:A_LENGTH], result["a"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(packed[A_LENGTH:], result["b"][0], rtol=0, atol=1e-6)
    # not trivially so: without its own document and positions B's logits differ
    assert (packed[A_LENGTH:] - logits[layout]["b_after_a_causal"][0][A_LENGTH:]).abs().max() > 1e-3


@pytest.mark.slow
def test_layouts_agree(logits):
    for layout in ("tp2", "cp2"):
        torch.testing.assert_close(logits[layout]["packed"], logits["tp1"]["packed"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_hugging_face_log_probs_with_restarting_position_ids_equal_the_packed_row(
    checkpoint, logits, tmp_path
):
    from transformers import LlamaForCausalLM

    from kumihimo.pretrain.convert.to_hf import convert_to_hf

    folder = convert_to_hf(checkpoint, tmp_path / "hf", dtype="fp32")
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = packed_rows()["packed"]
    positions = torch.cat([torch.arange(A_LENGTH), torch.arange(B_LENGTH)])[None]
    with torch.no_grad():
        # HF attention is causal over the row: documents are separated by running them apart, with
        # the position ids restarting at B as the packed row's reset position ids do
        pieces = [
            model(tokens[:, :A_LENGTH], position_ids=positions[:, :A_LENGTH]).logits,
            model(tokens[:, A_LENGTH:], position_ids=positions[:, A_LENGTH:]).logits,
        ]
    hf = torch.log_softmax(torch.cat(pieces, dim=1), dim=-1)
    ours = torch.log_softmax(logits["tp1"]["packed"][..., : hf.shape[-1]], dim=-1)
    torch.testing.assert_close(hf, ours, rtol=0, atol=1e-5)


def _logits_worker(checkpoint: str, out_path: str, tp: int, cp: int) -> None:
    """Load the checkpoint at TP x CP (this world), record full-vocabulary logits on rank 0."""
    import torch.distributed as dist

    from kumihimo.pretrain import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo")
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kumihimo.core import configtree
    from kumihimo.pretrain.checkpoint_format import SHARDING_METADATA, iteration_dir, read_latest, read_meta
    from kumihimo.pretrain.data import document_ids
    from kumihimo.pretrain.model import context_parallel_positions, slice_for_context_parallel
    from kumihimo.pretrain.parallel import ParallelLayout
    from tests.conftest import build_run_model

    parallel_state.initialize_model_parallel(tp, 1, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    folder = iteration_dir(Path(checkpoint), read_latest(Path(checkpoint)))
    data = configtree.read_yaml(folder / "run_config.yaml")
    data["parallelism"] = {"tensor_model_parallel_size": tp, "context_parallel_size": cp}
    config = configtree.from_dict(TrainConfig, data)
    meta = read_meta(folder)
    (model,) = build_run_model(config, ParallelLayout.from_config(config, tp * cp), meta["padded_vocab_size"])
    sharded = model.sharded_state_dict(metadata=SHARDING_METADATA)
    loaded = dist_checkpointing.load(sharded, str(folder))
    model.load_state_dict({key: value for key, value in loaded.items() if key in sharded})
    model.eval()

    def forward(tokens, reset=True):
        ids = document_ids(tokens, EOD) if reset else torch.zeros_like(tokens)
        positions = torch.arange(tokens.shape[1])[None] - torch.searchsorted(ids[0], ids[0])[None]
        if not reset:
            positions = torch.arange(tokens.shape[1])[None]
        batch = slice_for_context_parallel({"tokens": tokens, "position_ids": positions, "document_ids": ids})
        with torch.no_grad():
            local = model(batch["tokens"], batch["position_ids"], batch["document_ids"])
        pieces = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(pieces, local, group=parallel_state.get_tensor_model_parallel_group())
        local = torch.cat(pieces, dim=-1)  # the vocabulary is split over TP
        if cp > 1:
            pieces = [torch.empty_like(local) for _ in range(cp)]
            dist.all_gather(pieces, local, group=parallel_state.get_context_parallel_group())
            held = torch.cat([context_parallel_positions(tokens.shape[1], cp, r) for r in range(cp)])
            local = torch.cat(pieces, dim=1)[:, torch.argsort(held)]
        return local

    rows = packed_rows()
    results = {name: forward(tokens) for name, tokens in rows.items()}
    results["b_after_a_causal"] = forward(rows["packed"], reset=False)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    _logits_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
