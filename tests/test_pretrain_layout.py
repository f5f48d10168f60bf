"""Parallel layout and config checks that run before any process group exists."""

import pytest

from kumihimo.core import configtree
from kumihimo.core.configtree import ConfigError
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.metrics import training_flops_per_token
from kumihimo.pretrain.parallel import ParallelLayout

TINY = "configs/pretrain/tiny-cpu.yaml"


def load(*overrides):
    return configtree.load(TrainConfig, TINY, list(overrides))


def test_layout_derives_data_parallel_and_microbatches():
    layout = ParallelLayout.from_config(
        load("parallelism.tensor_model_parallel_size=2", "schedule.global_batch_size=16"), world_size=4
    )
    assert (layout.tp, layout.pp, layout.dp) == (2, 1, 2)
    assert layout.num_microbatches == 16 // (4 * 2)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallelism.tensor_model_parallel_size=3"], 3, "does not divide model.num_attention_heads=4"),
        (["parallelism.pipeline_model_parallel_size=3"], 3, "model.num_layers=4 is not divisible"),
        (["parallelism.tensor_model_parallel_size=2"], 3, "world size 3 is not divisible"),
        (
            ["schedule.global_batch_size=12"],
            2,
            "global_batch_size=12 is not divisible by micro_batch_size x DP",
        ),
        (["model.num_query_groups=3"], 1, "does not divide model.num_attention_heads"),
    ],
)
def test_layout_errors_name_the_keys(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelLayout.from_config(load(*overrides), world_size=world)


def test_vocab_padding_follows_tp():
    layout1 = ParallelLayout.from_config(load(), 1)
    layout4 = ParallelLayout.from_config(load("parallelism.tensor_model_parallel_size=4"), 4)
    # LLM-jp-3: 99,574 pieces -> 99,584 at TP<=2 and 99,840 at TP=4 (multiple of 128 x TP).
    assert layout1.padded_vocab_size(99574, 128) == 99584
    assert layout4.padded_vocab_size(99574, 128) == 99840


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hiden_size=8"], "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
        (["optimizer.lr=fast"], "optimizer.lr='fast' is not a number"),
        (["schedule.lr_decay_style=exp"], "schedule.lr_decay_style='exp' is not one of the allowed values"),
        (["optimizer.min_lr=1.0"], "optimizer.min_lr=1.0 is not within"),
        (
            ["parallelism.context_parallel_size=2", "model.local_attention=unfused"],
            "model.local_attention='unfused' cannot run context_parallel_size=2",
        ),
        (["schedule.lr_warmup_iters=500"], "schedule.lr_warmup_iters=500 is not within"),
        (  # 20 warm-up steps + 190 decay steps > 200: the LR would jump down when the warm-up ends
            ["schedule.lr_decay_style=WSD", "schedule.lr_wsd_decay_iters=190"],
            "schedule.lr_wsd_decay_iters=190 overlaps the warm-up",
        ),
        (
            ["precision.fp8=hybrid", "precision.params_dtype=bf16"],
            "precision.fp8='hybrid' needs a Hopper GPU",
        ),
        (
            [
                "precision.fp8=hybrid",
                "precision.params_dtype=bf16",
                "runtime.device=cuda",
                "model.transformer_impl=local",
            ],
            "precision.fp8 needs model.transformer_impl=transformer_engine",
        ),
        (
            ["precision.fp8=e4m3", "runtime.device=cuda"],
            "precision.params_dtype='fp32' must be bf16 with precision.fp8",
        ),
        (
            [
                "precision.fp8=hybrid",
                "precision.params_dtype=bf16",
                "runtime.device=cuda",
                "precision.first_last_layers_bf16=true",
            ],
            "is not supported with fp8_recipe=delayed",
        ),
        (["model.z_loss_coeff=-1"], "model.z_loss_coeff=-1.0 is negative"),
    ],
)
def test_invalid_values_raise_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load(*overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_flops_formula_matches_hand_count():
    config = load()
    m = config.model  # h=64, f=192, s=128, L=4, heads 4 x 16, groups 2
    per_layer = 2 * 64 * (64 + 2 * 32) + 2 * 64 * 64 + 6 * 64 * 192 + 4 * 128 * 64
    assert training_flops_per_token(config.model, 1024) == 3 * (m.num_layers * per_layer + 2 * 64 * 1024)
