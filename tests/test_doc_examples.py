"""Examples of the docs and --help that failed as printed (issue 30 points 3, 4 and 7; issue 23 point 5).

Cheap checks, in-process: no training. The documented continual-pretraining path itself runs in
tests/test_cli_docs.py (slow).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from kumihimo.cli import main
from kumihimo.core import configtree
from kumihimo.pretrain.config import TrainConfig


@pytest.mark.parametrize("iters", ["0", "-3"])
def test_quickstart_refuses_no_training_steps(iters, tmp_path, capsys):
    """`--train-iters 0` used to train the recipe's 300 steps."""
    workdir = tmp_path / "qs"
    assert main(["quickstart", "--workdir", str(workdir), "--train-iters", iters]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kumihimo: error: --train-iters={iters} must be >= 1 (leave it out for the recipe's 300)"
    assert not workdir.exists()  # refused before any stage


@pytest.mark.parametrize("iters", [1, 5, 20, 21])
def test_quickstart_short_runs_get_a_warm_up_that_fits(iters, tmp_path):
    """`--train-iters N` for N <= 20 failed on the recipe's 20-step warm-up."""
    from kumihimo.quickstart import _train_args

    args = argparse.Namespace(train_iters=iters, tp=1)
    recipe, *overrides = _train_args(
        tmp_path, {"model": str(tmp_path / "t.model")}, {"blend_path": str(tmp_path / "b.yaml")}, args
    )
    config = configtree.load(TrainConfig, recipe, overrides)  # validates the schedule
    assert config.schedule.train_iters == iters
    assert config.schedule.lr_warmup_iters < iters
    assert config.schedule.lr_warmup_iters == (20 if iters > 20 else iters // 10)


def test_slurm_submit_outside_the_checkout_renders_the_recipe_it_loaded(tmp_path, monkeypatch, capsys):
    """From another folder `configs/pretrain/...` names the shipped recipe; the script used to get
    `<cwd>/configs/pretrain/...`, which does not exist there."""
    monkeypatch.chdir(tmp_path)
    argv = ["slurm", "submit", "configs/pretrain/llmjp3-1.8b.yaml", "--nodes", "2", "--dry-run"]
    for recipe in ("configs/pretrain/llmjp3-1.8b.yaml", "llmjp3-1.8b"):
        argv[2] = recipe
        assert main([*argv, f"output_dir={tmp_path / 'run'}"]) == 0, capsys.readouterr().err
        script = capsys.readouterr().out
        rendered = re.search(r"^set -- (\S+)", script, re.M).group(1)
        assert Path(rendered).is_file() and Path(rendered).name == "llmjp3-1.8b.yaml", rendered


def test_harness_without_lm_eval_is_refused_before_any_scoring(tmp_path, monkeypatch, capsys):
    """`--harness` found lm-eval missing only after kumihimo's own scoring."""
    from kumihimo.quickstart import write_reading_task

    task = write_reading_task(tmp_path / "tasks")
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")  # never read: the refusal comes first
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    assert main(["eval", str(model), "--tasks", str(task), "--harness"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("kumihimo: error: --harness needs lm-evaluation-harness")
        and "pip install -e '.[eval]'" in err
    )
    assert not (tmp_path / "hf-eval").exists() and not (model / "eval").exists()


def test_install_hints_name_the_checkout_install():
    """README installs with `pip install -e ".[extra]"`; kumihimo is not on PyPI, so every hint (error
    messages, skip reasons, docs, scripts) must say the same."""
    import re

    repo = Path(__file__).resolve().parents[1]
    pypi_form = re.compile(r"""pip install\s+['"]?kumihimo\[""")
    offenders = [
        str(path.relative_to(repo))
        for folder in (
            "kumihimo",
            "pretrain",
            "data_prep",
            "tokenizer",
            "docs",
            "benchmarks",
            "slurm",
            "tests",
        )
        for path in (repo / folder).rglob("*")
        if path.suffix in (".py", ".md", ".sh") and pypi_form.search(path.read_text(encoding="utf-8"))
    ]
    offenders += [
        name for name in ("README.md",) if pypi_form.search((repo / name).read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders


def test_tokenizer_recipe_reads_what_the_quickstart_writes(tmp_path, monkeypatch):
    """configs/tokenizer/tiny.yaml (the `tokenizer train` help example) read runs/quickstart/data/*.jsonl.gz,
    which the quickstart never writes; its paths must match the quickstart's curated JSONL."""
    import fnmatch

    from kumihimo.data_prep.layout import RunLayout
    from kumihimo.quickstart import CONFIGS, _data_config, register
    from kumihimo.tokenizer.config import TokenizerTrainConfig

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    register(parser)
    workdir = Path(parser.get_default("workdir"))
    config = _data_config(workdir)  # what the quickstart curates with (writes only the sample WARC)
    layout = RunLayout(Path(config.output_dir))
    written = [str(layout.curated(s.name)) for s in config.input.sources]
    recipe = configtree.load(TokenizerTrainConfig, CONFIGS / "tokenizer" / "tiny.yaml")
    for source in recipe.input.sources:
        for pattern in source.paths:
            assert any(fnmatch.fnmatch(w, pattern) for w in written), (pattern, written)


def test_hf_tokenizer_that_loses_japanese_is_refused(tmp_path):
    """A Qwen2 config.json beside an exported SentencePiece tokenizer made AutoTokenizer build a
    Qwen2Tokenizer that dropped every Japanese character: 119 documents became 387 tokens, silently."""
    import json

    from kumihimo.core.errors import UserError
    from kumihimo.tokenizer.export_hf import export_hf
    from kumihimo.tokenizer.hf import HFTokenizer
    from tests.test_convert_to_hf import train_spm

    exported = tmp_path / "hf"
    export_hf(train_spm(tmp_path / "spm", seed=1), exported)
    HFTokenizer(exported)  # its own class gives the probe back
    (exported / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    with pytest.raises(
        UserError, match="AutoTokenizer built a Qwen2Tokenizer .* decoding to 'Themodelreadsdata.'"
    ):
        HFTokenizer(exported)


def test_megatron_notices_about_deliberate_choices_are_not_repeated(caplog):
    """Every process printed "Transformer Engine and Apex are not installed" four times and "GPTModel IS
    DEPRECATED" (issue 30, point 7)."""
    import logging
    import subprocess
    import sys

    code = (
        "from kumihimo.cli import quiet_known_notices; quiet_known_notices()\n"
        "import megatron.core.optimizer, megatron.core.optimizer.clip_grads\n"
        "import megatron.core.models.gpt.gpt_layer_specs\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not installed" not in proc.stderr, proc.stderr
    from kumihimo.cli import quiet_known_notices

    quiet_known_notices()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning(
            "GPTModel IS DEPRECATED. GPTModel is ..."
        )
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def test_exported_generation_task_keeps_every_accepted_answer(tmp_path):
    """The lm-evaluation-harness export kept only the first accepted answer of a generation task, so
    the harness scored a second accepted answer as wrong where kumihimo scored it right."""
    import json

    import yaml

    from kumihimo.pretrain.evaluate import lm_eval_export
    from kumihimo.pretrain.evaluate.tasks import load_tasks

    docs = [
        {"qid": "0", "type": "comparison", "question": "富士山がある国は？", "answer": ["日本", "日本国"]},
        {"qid": "1", "type": "comparison", "question": "一年は何か月？", "answer": ["12", "十二"]},
        {"qid": "2", "type": "comparison", "question": "水の化学式は？", "answer": "H2O"},
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (tmp_path / "qa.yaml").write_text(
        yaml.safe_dump({"name": "qa", "format": "jemhopqa", "data": "qa.jsonl", "num_fewshot": 0})
    )
    tasks = load_tasks([tmp_path / "qa.yaml"])
    [name] = lm_eval_export.export_tasks(tasks, tmp_path / "export")
    rows = [json.loads(line) for line in (tmp_path / "export" / f"{name}.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [e.answers for e in tasks[0].examples]
    assert rows[1]["answer"] == ["12", "十二"]
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask

    harness = ConfigurableTask(config=yaml.safe_load((tmp_path / "export" / f"{name}.yaml").read_text()))
    assert harness.process_results(rows[1], ["十二"])["exact_match"] == 1.0
    assert harness.process_results(rows[1], ["13"])["exact_match"] == 0.0
    assert harness.process_results(rows[2], ["H2O"])["exact_match"] == 1.0


@pytest.mark.parametrize("recipe", ["configs/data_prep/quickstart.yaml", "quickstart"])
def test_shipped_data_prep_recipe_finds_its_sample_inputs_from_any_folder(recipe, tmp_path, monkeypatch):
    """configs/data_prep/quickstart.yaml names kumihimo/sample/...: found only from the checkout root."""
    import glob

    from kumihimo.data_prep.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(recipe)
    patterns = [p for s in config.input.sources for p in s.paths] + config.decontam.eval_paths
    assert len(patterns) == 3
    for pattern in patterns:
        assert glob.glob(pattern), pattern
    own = tmp_path / "mine.yaml"  # a user's recipe keeps its relative paths: they name the user's files
    own.write_text(
        "output_dir: out\ninput:\n  sources:\n    - {name: ja, paths: [kumihimo/sample/ja.jsonl.gz]}\n"
    )
    assert load_config(own).input.sources[0].paths == ["kumihimo/sample/ja.jsonl.gz"]
