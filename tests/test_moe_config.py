"""Mixture-of-experts config: the model.moe section and expert parallelism are checked before any
process group exists, each refusal in one line, and map onto Megatron-Core's TransformerConfig."""

from __future__ import annotations

import pytest

from kumihimo.core import configtree
from kumihimo.core.configtree import ConfigError
from kumihimo.pretrain import moe
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.parallel import ParallelLayout
from tests.conftest import run_cli

TINY = "configs/pretrain/tiny-cpu.yaml"
MOE = ("model.moe.num_experts=4", "model.moe.ffn_hidden_size=64")


def load(*overrides):
    return configtree.load(TrainConfig, TINY, list(overrides))


def test_absent_section_is_a_dense_model():
    config = load()
    assert not config.model.moe.enabled
    assert moe.transformer_fields(config.model, config.parallelism) == {}
    assert config.model.moe_layer_flags == [False] * 4


def test_fields_map_onto_megatron_names():
    config = load(
        *MOE,
        "model.moe.router_topk=2",
        "model.moe.dense_first_layers=1",
        "model.moe.shared_expert_ffn_hidden_size=32",
        "model.moe.shared_expert_gate=true",
        "model.moe.z_loss_coeff=1e-3",
        "model.moe.capacity_factor=1.5",
        "model.moe.token_dispatcher=allgather",
    )
    fields = moe.transformer_fields(config.model, config.parallelism)
    assert moe.transformer_fields(load(*MOE).model, config.parallelism)["moe_layer_freq"] == 1
    assert fields["num_moe_experts"] == 4
    assert fields["moe_layer_freq"] == [0, 1, 1, 1]
    assert fields["moe_ffn_hidden_size"] == 64
    assert fields["moe_shared_expert_intermediate_size"] == 32
    assert fields["moe_shared_expert_gate"] is True
    assert fields["moe_z_loss_coeff"] == 1e-3
    assert fields["moe_expert_capacity_factor"] == 1.5
    assert fields["moe_token_dispatcher_type"] == "allgather"
    assert fields["moe_router_dtype"] == "fp32"
    assert (fields["expert_model_parallel_size"], fields["expert_tensor_parallel_size"]) == (1, 1)


def test_expert_width_defaults_to_the_dense_width():
    config = load("model.moe.num_experts=4")
    assert moe.transformer_fields(config.model, config.parallelism)["moe_ffn_hidden_size"] == 192


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.moe.router_topk=5",), "model.moe.router_topk=5 is not within 1..num_experts=4"),
        (("model.moe.router_topk=1",), "needs router_pre_softmax=true"),
        (("model.moe.shared_expert_gate=true",), "model.moe.shared_expert_gate=True needs a shared expert"),
        (("model.moe.dense_first_layers=4",), "leaves no MoE layer of model.num_layers=4"),
        (
            ("model.moe.load_balancing=none",),
            "model.moe.aux_loss_coeff=0.01 is ignored with load_balancing=none",
        ),
        (("model.moe.pad_to_capacity=true",), "needs capacity_factor"),
        (("model.moe.capacity_factor=0",), "model.moe.capacity_factor=0.0 must be > 0"),
        (("model.moe.grouped_gemm=true",), "model.moe.grouped_gemm=True needs Transformer Engine on a GPU"),
        (("model.moe.token_dispatcher=flex",), "model.moe.token_dispatcher='flex' is not one of"),
    ],
)
def test_moe_section_refusals_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        load(*MOE, *overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ("parallelism.expert_model_parallel_size=3",),
            3,
            "parallelism.expert_model_parallel_size=3 does not divide model.moe.num_experts=4",
        ),
        (
            ("parallelism.expert_model_parallel_size=4", "schedule.global_batch_size=8"),
            2,
            "expert_model_parallel_size=4 x expert_tensor_parallel_size=1 does not divide TP x CP x DP = "
            "1 x 1 x 2 = 2",
        ),
        (
            ("parallelism.tensor_model_parallel_size=2",),
            2,
            "tensor_model_parallel_size=2 needs parallelism.sequence_parallel=true",
        ),
        (
            ("parallelism.expert_tensor_parallel_size=3",),
            3,
            "model.moe.ffn_hidden_size=64 is not divisible by the expert tensor-parallel size 3",
        ),
    ],
)
def test_expert_layout_refusals(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelLayout.from_config(load(*MOE, *overrides), world_size=world)


def test_expert_parallelism_needs_experts():
    with pytest.raises(ConfigError, match="need experts, but model.moe.num_experts=0"):
        load("parallelism.expert_model_parallel_size=2")


def test_layout_carries_expert_sizes():
    layout = ParallelLayout.from_config(
        load(
            *MOE,
            "parallelism.tensor_model_parallel_size=2",
            "parallelism.sequence_parallel=true",
            "parallelism.expert_model_parallel_size=2",
            "parallelism.expert_tensor_parallel_size=1",
        ),
        world_size=4,
    )
    assert (layout.tp, layout.dp, layout.ep, layout.etp, layout.expert_dp) == (2, 2, 2, 1, 2)
    assert "EP=2 ETP=1" in layout.describe()


def test_train_check_refuses_ep_that_does_not_divide_the_experts_in_one_line():
    proc = run_cli("train", "--check", TINY, *MOE, "parallelism.expert_model_parallel_size=3", timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [
        "kumihimo: error: parallelism.expert_model_parallel_size=3 does not divide model.moe.num_experts=4; "
        "choose an EP that divides the number of experts"
    ]


def test_train_check_picks_a_world_that_holds_the_expert_grid():
    proc = run_cli("train", "--check", TINY, *MOE, "parallelism.expert_model_parallel_size=2", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "world=2: TP=1 PP=1 CP=1 DP=2 EP=2 ETP=1" in proc.stdout


def test_flops_count_the_active_experts():
    from kumihimo.pretrain.metrics import training_flops_per_token

    dense = load("model.moe.num_experts=0", "model.ffn_hidden_size=128")
    # 4 experts of width 64, top-2: the same SwiGLU work per token as one of width 128, plus the router
    sparse = load(*MOE, "model.ffn_hidden_size=128")
    router = 3 * 4 * (2 * 64 * 4)  # 4 layers, training = 3 x forward
    assert (
        training_flops_per_token(sparse.model, 1024) - training_flops_per_token(dense.model, 1024) == router
    )
