"""The GPU configuration, checked on CPU through the TransformerConfig kumihimo builds.

`pretrain.model.detect_kernels` is the one probe of the GPU stack; these tests replace it to say what a
GPU node would report (CUDA, Transformer Engine, apex) and check which fusions the built config turns
on, the fallbacks when kernels are missing, and the one line `train --check` and `doctor` print.
Megatron's TransformerConfig itself asks whether Transformer Engine's fused RoPE imported; where a test
reports TE present, that one query is answered with a stand-in too (`te_rope` fixture).
"""

from __future__ import annotations

import pytest
from megatron.core.models.common.embeddings import rope_utils

from kumihimo.core import configtree
from kumihimo.core.configtree import ConfigError
from kumihimo.core.errors import UserError
from kumihimo.doctor import Report, check_config_needs
from kumihimo.pretrain import model as model_module
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.model import (
    KernelSupport,
    describe_fusions,
    initialize_tp_comm_overlap,
    resolve_fusions,
    transformer_config,
)
from kumihimo.pretrain.parallel import ParallelLayout
from tests.conftest import run_cli

GPU_NODE = KernelSupport(
    cuda=True, transformer_engine=True, te_rope=True, apex_grad_accum=True, fused_softmax=True
)
NO_TE_NO_APEX = KernelSupport(
    cuda=True, transformer_engine=False, te_rope=False, apex_grad_accum=False, fused_softmax=False
)
FUSIONS = (
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "persist_layer_norm",
    "masked_softmax_fusion",
    "cross_entropy_loss_fusion",
)


@pytest.fixture
def te_rope(monkeypatch):
    """Megatron's TransformerConfig refuses apply_rope_fusion unless TE's fused RoPE imported."""
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *args, **kwargs: None)


def on_gpu_node(monkeypatch, support: KernelSupport) -> None:
    monkeypatch.setattr(model_module, "detect_kernels", lambda device: support)


def built(recipe: str, world: int, *overrides: str):
    config = configtree.load(TrainConfig, recipe, list(overrides))
    layout = ParallelLayout.from_config(config, world)
    return config, transformer_config(
        config.model,
        config.precision,
        config.parallelism,
        config.fusions,
        layout,
        device=config.runtime.device,
        deterministic=config.runtime.deterministic,
    )


def test_172b_on_a_gpu_node_runs_megatron_lms_fusions_and_llmjp_settings(monkeypatch, te_rope):
    on_gpu_node(monkeypatch, GPU_NODE)
    _config, tc = built("configs/pretrain/llmjp3-172b.yaml", 512)
    on = {name for name in FUSIONS if getattr(tc, name)}
    assert on == {
        "gradient_accumulation_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "apply_rope_fusion",
        "persist_layer_norm",
    }
    # LLM-jp-3's train.sh: --no-masked-softmax-fusion, --attention-softmax-in-fp32, selective recompute
    assert tc.attention_softmax_in_fp32 is True
    assert (tc.recompute_granularity, tc.recompute_modules) == ("selective", ["core_attn"])
    assert tc.recompute_num_layers is None
    assert (tc.overlap_p2p_comm, tc.batch_p2p_comm, tc.deallocate_pipeline_outputs) == (False, True, True)


def test_without_te_and_apex_the_gpu_keeps_the_jit_fusions_and_says_why_the_rest_are_off(monkeypatch):
    on_gpu_node(monkeypatch, NO_TE_NO_APEX)
    config, tc = built(
        "configs/pretrain/smoke-1gpu.yaml", 1, "model.local_attention=unfused", "model.z_loss_coeff=0"
    )
    assert {name for name in FUSIONS if getattr(tc, name)} == {
        "bias_activation_fusion",
        "bias_dropout_fusion",
    }
    line = describe_fusions(resolve_fusions(config.model, config.fusions, config.runtime.device))
    assert line.startswith("on: bias_activation_fusion, bias_dropout_fusion; off: ")
    assert "persist_layer_norm (unused: local layers use torch RMSNorm)" in line
    assert "gradient_accumulation_fusion (needs apex's fused_weight_gradient_mlp_cuda)" in line
    assert "apply_rope_fusion (needs Transformer Engine's fused RoPE)" in line
    assert "masked_softmax_fusion (needs apex's scaled_upper_triang_masked_softmax_cuda)" in line
    assert "cross_entropy_loss_fusion (fusions.cross_entropy_loss_fusion=false)" in line


def test_cross_entropy_fusion_is_an_option_unused_with_z_loss(monkeypatch, te_rope):
    on_gpu_node(monkeypatch, GPU_NODE)
    _config, tc = built("configs/pretrain/smoke-1gpu.yaml", 1, "fusions.cross_entropy_loss_fusion=true")
    assert tc.cross_entropy_loss_fusion is True and tc.cross_entropy_fusion_impl == "native"
    config, tc = built(
        "configs/pretrain/smoke-1gpu.yaml",
        1,
        "fusions.cross_entropy_loss_fusion=true",
        "model.z_loss_coeff=1e-4",
    )
    assert tc.cross_entropy_loss_fusion is False
    assert "cross_entropy_loss_fusion (unused: the z-loss computes the loss outside the model)" in (
        describe_fusions(resolve_fusions(config.model, config.fusions, config.runtime.device))
    )


def test_cpu_runs_every_fusion_off_and_says_so():
    config, tc = built("configs/pretrain/tiny-cpu.yaml", 1, "fusions.cross_entropy_loss_fusion=true")
    assert not any(getattr(tc, name) for name in FUSIONS)
    assert describe_fusions(resolve_fusions(config.model, config.fusions, config.runtime.device)) == (
        "on: none; off: " + ", ".join(FUSIONS) + " (runtime.device=cpu)"
    )


def test_overlap_options_reach_the_config_and_are_validated(monkeypatch, te_rope):
    on_gpu_node(monkeypatch, GPU_NODE)
    _config, tc = built(
        "configs/pretrain/llmjp3-172b.yaml",
        512,
        "parallelism.virtual_pipeline_model_parallel_size=2",
        "schedule.global_batch_size=2048",  # interleaving needs micro-batches per step % PP == 0
        "parallelism.tp_comm_overlap=true",
    )
    assert (tc.overlap_p2p_comm, tc.batch_p2p_comm, tc.tp_comm_overlap) == (True, False, True)
    refusals = {
        "parallelism.tp_comm_overlap": ["parallelism.tp_comm_overlap=true"],  # tiny: no sequence parallel
        "parallelism.overlap_p2p_comm": ["parallelism.overlap_p2p_comm=true"],  # no interleaving
        "model.recompute_modules": ["model.recompute=selective", "model.recompute_modules=[moe_act]"],
    }
    for key, overrides in refusals.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            configtree.load(TrainConfig, "configs/pretrain/tiny-cpu.yaml", overrides)
    with pytest.raises(ConfigError, match=r"model\.recompute_modules.*only with model\.recompute=selective"):
        configtree.load(TrainConfig, "configs/pretrain/tiny-cpu.yaml", ["model.recompute_modules=[mlp]"])


def test_doctor_and_train_check_print_the_fusion_line(monkeypatch, tmp_path):
    config = configtree.load(TrainConfig, "configs/pretrain/smoke-1gpu.yaml", [])
    on_gpu_node(monkeypatch, NO_TE_NO_APEX)
    report = Report()
    check_config_needs(report, config)
    ((status, detail),) = [(s, d) for s, check, d in report.lines if check == "fusions"]
    assert status == "WARN" and "apply_rope_fusion (needs Transformer Engine's fused RoPE)" in detail
    proc = run_cli("train", "configs/pretrain/tiny-cpu.yaml", f"output_dir={tmp_path}", "--check")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("fusions ")]
    assert lines == [
        "fusions on: none; off: " + ", ".join(FUSIONS[:-1]) + " (runtime.device=cpu); "
        "cross_entropy_loss_fusion (fusions.cross_entropy_loss_fusion=false)"
    ]


def test_tp_comm_overlap_without_transformer_engine_is_refused_before_any_buffer(monkeypatch):
    monkeypatch.setattr(model_module, "transformer_engine_available", lambda: False)
    config = configtree.load(
        TrainConfig,
        "configs/pretrain/smoke-1gpu.yaml",
        [
            "parallelism.tensor_model_parallel_size=2",
            "parallelism.sequence_parallel=true",
            "parallelism.tp_comm_overlap=true",
        ],
    )
    with pytest.raises(UserError, match=r"parallelism\.tp_comm_overlap needs Transformer Engine layers"):
        initialize_tp_comm_overlap(
            config.model,
            config.precision,
            config.parallelism,
            ParallelLayout.from_config(config, 2),
            micro_batch_size=config.schedule.micro_batch_size,
            device=config.runtime.device,
        )
