"""The continual-pretraining recipes validate (`kumihimo train --check`) and fit (`kumihimo plan`):
Swallow-style continual pretraining of a Llama-3.1-8B-shaped model and an LLM-jp-4-style decay branch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kumihimo.cli import main
from kumihimo.core import configtree
from kumihimo.pretrain.config import TrainConfig

SWALLOW = "configs/pretrain/swallow-llama3.1-8b.yaml"
TRUNK = "configs/pretrain/llmjp3-7.2b-wsd.yaml"
DECAY = "configs/pretrain/llmjp3-7.2b-decay-branch.yaml"
MOCK = ("data.mock=true", "data.blend=[]", "data.blend_file=null", "data.tokenizer=null")


def fake_source(root: Path, iteration: int, weights_only: bool = False) -> Path:
    """A checkpoint folder as the trunk leaves it (markers and metadata only: --check reads no tensors)."""
    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    config = configtree.to_dict(configtree.load(TrainConfig, TRUNK, list(MOCK)))
    (folder / "run_config.yaml").write_text(yaml.safe_dump(config))
    meta = {"train_state": {"iteration": iteration, "consumed_samples": iteration * 1024}}
    (folder / "kumihimo.json").write_text(json.dumps({**meta, "weights_only": weights_only}))
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return root


def test_swallow_recipe_is_llama_3_1_8b_and_fits_on_4_nodes(capsys):
    config = configtree.load(TrainConfig, SWALLOW)
    assert config.model.rope_scaling.type == "llama3" and config.model.rotary_base == 500000
    assert abs(sum(entry.weight for entry in config.data.blend) - 1.0) < 1e-9
    assert main(["plan", SWALLOW, "--nodes", "4", "--vocab-size", "128256"]) == 0
    out = capsys.readouterr().out
    assert "8.03B parameters (vocabulary padded to 128,256)" in out and "-> fits" in out
    assert main(["train", SWALLOW, "--check", "--nproc-per-node", "2", *MOCK]) == 0
    assert "config OK: world=2: TP=2" in capsys.readouterr().out


def test_decay_branch_recipe_checks_its_source_and_fits(tmp_path, capsys):
    config = configtree.load(TrainConfig, DECAY)
    sched = config.schedule
    assert (sched.lr_decay_style, sched.lr_warmup_iters, sched.lr_wsd_decay_iters) == (
        "WSD",
        0,
        sched.train_iters,
    )
    trunk = configtree.load(TrainConfig, TRUNK)
    assert config.optimizer.lr == trunk.optimizer.lr  # the branch starts at the trunk's stable LR
    assert config.model == trunk.model
    assert main(["plan", DECAY, "--nodes", "4", "--vocab-size", "99574"]) == 0
    assert "-> fits" in capsys.readouterr().out
    source = fake_source(tmp_path / "trunk", 100000)
    args = ["train", DECAY, "--check", "--nproc-per-node", "4", *MOCK, f"output_dir={tmp_path}/branch"]
    assert main([*args, f"branch.source={source}"]) == 0
    assert "config OK" in capsys.readouterr().out
    assert main([*args, f"branch.source={source}", "branch.iteration=5"]) == 2
    assert "iteration 5 is not in" in capsys.readouterr().err
    weights_only = fake_source(tmp_path / "imported", 0, weights_only=True)
    assert main([*args, f"branch.source={weights_only}"]) == 2
    assert "holds weights only" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", [TRUNK, DECAY])
def test_trunk_and_branch_plan_alike(recipe, capsys):
    assert main(["plan", recipe, "--nodes", "4", "--vocab-size", "99574"]) == 0
    assert "TP=2 PP=2 CP=1 DP=8" in capsys.readouterr().out


def test_a_requeued_branch_checks_without_its_source(tmp_path, capsys):
    """Once the branch has checkpoints it resumes from them; the source folder may be gone by then."""
    import shutil

    from kumihimo.pretrain.branch import source_sha256

    source = fake_source(tmp_path / "trunk", 100000)
    lineage = {
        "source_root": str(source.resolve()),
        "iteration": 100000,
        "source_sha256": source_sha256(source / "iter_0100000"),
    }
    own = tmp_path / "branch" / "checkpoints"
    (own / "iter_0000010").mkdir(parents=True)
    (own / "iter_0000010" / "kumihimo.json").write_text(json.dumps({"lineage": lineage}))
    (own / "latest_checkpointed_iteration.txt").write_text("10\n")
    shutil.rmtree(source)
    args = ["train", DECAY, "--check", "--nproc-per-node", "4", *MOCK, f"output_dir={tmp_path}/branch"]
    assert main([*args, f"checkpoint.dir={own}", f"branch.source={source}"]) == 0
    assert "config OK" in capsys.readouterr().out
    # before its first save, the source is needed
    assert main([*args, f"checkpoint.dir={tmp_path}/other", f"branch.source={source}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
