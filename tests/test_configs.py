"""Every recipe in configs/ loads and validates; every config field is documented."""

import re
from pathlib import Path

import pytest

from kumihimo.core import configtree
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.pretrain.config import TrainConfig, from_saved
from kumihimo.tokenizer.config import TokenizerTrainConfig
from tests.conftest import REPO

KINDS = {"pretrain": TrainConfig, "tokenizer": TokenizerTrainConfig, "data_prep": DataPrepConfig}
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def test_every_recipe_folder_is_known():
    assert RECIPES, "no recipes found"
    folders = {p.relative_to(REPO / "configs").parts[0] for p in RECIPES}
    assert folders <= set(KINDS), f"recipes in unknown folders: {folders - set(KINDS)}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_recipe_loads_and_validates(path: Path):
    kind = path.relative_to(REPO / "configs").parts[0]
    config = configtree.load(KINDS[kind], path)
    # The resolved config round-trips through YAML unchanged (it is saved with every run).
    assert configtree.from_dict(KINDS[kind], configtree.to_dict(config)) == config


@pytest.mark.parametrize("cls", list(KINDS.values()), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    assert configtree.check_documented(cls) == []


def test_extends_merges_and_detects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {num_layers: 8, hidden_size: 128}\nname: base\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {num_layers: 2}\n")
    config = configtree.load(TrainConfig, tmp_path / "child.yaml", ["data.mock=true"])
    assert (config.model.num_layers, config.model.hidden_size, config.name) == (2, 128, "base")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(configtree.ConfigError, match="forms a cycle"):
        configtree.load(TrainConfig, tmp_path / "a.yaml")


def test_overrides_parse_yaml_values():
    config = configtree.load(
        TrainConfig,
        REPO / "configs/pretrain/tiny-cpu.yaml",
        [
            "optimizer.lr=1e-3",
            "data.blend=[{prefix: /x, weight: 2}]",
            "data.mock=false",
            "data.tokenizer=t.model",
            "checkpoint.keep_last=null",
        ],
    )
    assert config.optimizer.lr == 1e-3
    assert config.data.blend[0].prefix == "/x" and config.data.blend[0].weight == 2.0
    assert config.checkpoint.keep_last is None


def test_output_folders_default_and_override():
    config = configtree.load(TrainConfig, REPO / "configs/pretrain/tiny-cpu.yaml", ["output_dir=/runs/a"])
    assert config.checkpoint_dir == "/runs/a/checkpoints"
    config = configtree.load(
        TrainConfig, None, ["data.mock=true", "output_dir=/runs/a", "checkpoint.dir=/ckpt/a"]
    )
    assert config.checkpoint_dir == "/ckpt/a"
    config = configtree.load(
        TrainConfig, None, ["data.mock=true", "checkpoint.dir=/ckpt/a", "checkpoint.enabled=false"]
    )
    assert config.checkpoint_dir is None


@pytest.mark.parametrize(
    ("spelling", "fix"),
    [
        ("runtime: {run_dir: /runs/a}", "'runtime.run_dir' is an old spelling; write output_dir: <folder>"),
        ("checkpoint: {save: /ckpt}", "'checkpoint.save' is an old spelling; write checkpoint.dir=<folder>"),
        ("checkpoint: {save: null}", "or checkpoint.enabled=false instead of checkpoint.save=null"),
    ],
)
def test_old_output_spellings_are_refused_in_sections_and_overrides(tmp_path, spelling, fix):
    """RENAMED works on nested sections, for recipes and for dotted overrides alike."""
    (tmp_path / "old.yaml").write_text(spelling + "\n")
    with pytest.raises(configtree.ConfigError, match=re.escape(fix)):
        configtree.load(TrainConfig, tmp_path / "old.yaml")
    section, _, rest = spelling.partition(": {")
    key, _, value = rest.rstrip("}").partition(": ")
    with pytest.raises(configtree.ConfigError, match=re.escape(fix)):
        configtree.load(TrainConfig, None, [f"{section}.{key}={value}"])


def test_run_configs_saved_by_earlier_releases_still_read():
    """Checkpoints written before output_dir existed stay convertible (their run_config.yaml is
    machine-written, so it is translated rather than refused)."""
    old = configtree.to_dict(TrainConfig())
    del old["output_dir"]
    old["runtime"]["run_dir"] = "/runs/old"
    del old["checkpoint"]["enabled"], old["checkpoint"]["dir"]
    old["checkpoint"]["save"] = "/ckpt/old"
    config = from_saved(old)
    assert (config.output_dir, config.checkpoint_dir) == ("/runs/old", "/ckpt/old")
    old["checkpoint"]["save"] = None
    assert from_saved(old).checkpoint.enabled is False
    assert old["runtime"]["run_dir"] == "/runs/old"  # the caller's mapping is left alone


@pytest.mark.parametrize("overrides", [[], ["score.scorers=[]"]])
def test_keyed_override_of_an_absent_named_list_says_to_give_the_list(overrides):
    """Issue 30 point 4: `score.scorers.edu.min_score=0.9` with no scorers listed said "is not a list" (or
    "is a value, not a section"); one line now says what to write."""
    with pytest.raises(configtree.ConfigError) as caught:
        configtree.load(DataPrepConfig, None, [*overrides, "score.scorers.edu.min_score=0.9"])
    assert str(caught.value) == (
        "score.scorers.edu.min_score addresses the item 'edu' of the list score.scorers, which lists none (a "
        "dotted key only changes an item the recipe already lists); give the whole list: "
        "score.scorers='[{name: edu, min_score: 0.9, ...}]'"
    )
