"""Task files, prompts, tokenisation convention and scoring of `kumihimo eval` (no Megatron here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kumihimo.core.errors import UserError
from kumihimo.pretrain.evaluate import lm_eval_export, scoring
from kumihimo.pretrain.evaluate.megatron_backend import SPMCodec
from kumihimo.pretrain.evaluate.runner import flat_metrics, run_tasks
from kumihimo.pretrain.evaluate.tasks import load_task, load_tasks
from tests.eval_tasks import write_tasks


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder)
    return folder


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    from tests.test_convert_to_hf import train_spm

    return train_spm(tmp_path_factory.mktemp("tok") / "tok", seed=3)


def test_presets_render_the_common_layouts(tasks_dir):
    jcqa = load_task(tasks_dir / "jcqa.yaml")
    first = jcqa.examples[0]
    assert first.context.endswith("質問: 日本の首都はどこ？\n答え:")
    assert first.context.count("質問:") == 3  # two solved examples, then the question
    assert first.choices == ["大阪", "東京", "京都", "札幌", "福岡"] and first.gold == 1
    assert "日本の首都" not in first.context.split("\n\n")[0]  # a document is never its own example
    jnli = load_task(tasks_dir / "jnli.yaml")
    assert [e.gold for e in jnli.examples] == [0, 1, 2, 0]
    assert jnli.examples[0].choices == ["含意", "矛盾", "中立"]
    arc = load_task(tasks_dir / "arc.yaml")
    assert [e.gold for e in arc.examples] == [0, 1, 2] and arc.examples[1].choices[1] == "light"
    hellaswag = load_task(tasks_dir / "hellaswag.yaml")
    assert hellaswag.examples[1].gold == 1 and hellaswag.examples[0].context.startswith("Cooking: She")
    qa = load_task(tasks_dir / "jemhopqa.yaml")
    assert qa.examples[2].answers == ["H2O"] and qa.examples[2].context.count("答え:") == 2


def test_fewshot_prompts_are_fixed_by_the_seed(tasks_dir, tmp_path):
    again = load_task(tasks_dir / "jcqa.yaml")
    assert [e.context for e in again.examples] == [
        e.context for e in load_task(tasks_dir / "jcqa.yaml").examples
    ]
    spec = yaml.safe_load((tasks_dir / "jcqa.yaml").read_text())
    (tmp_path / "jcqa.jsonl").write_text((tasks_dir / "jcqa.jsonl").read_text())
    contexts = set()
    for seed in range(6):
        (tmp_path / "t.yaml").write_text(yaml.safe_dump({**spec, "fewshot_seed": seed}))
        contexts.add(load_task(tmp_path / "t.yaml").examples[0].context)
    assert len(contexts) > 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"choises": ["a"]}, "unknown key 'choises'"),
        ({"format": "mmlu"}, "is not a known format"),
        ({"prompt": "{missing}"}, "no field 'missing'"),
        ({"num_fewshot": 9}, "num_fewshot=9 but only 4 documents"),
        ({"data": "nowhere.jsonl"}, "does not exist"),
        ({"format": None, "kind": "multiple_choice", "prompt": "{question}"}, "choices"),
    ],
)
def test_bad_task_files_say_what_to_fix(tasks_dir, tmp_path, change, message):
    spec = {"name": "x", "data": str(tasks_dir / "jcqa.jsonl"), "format": "jcommonsenseqa", **change}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    with pytest.raises(UserError, match=message):
        load_task(tmp_path / "x.yaml")


def test_duplicate_task_names_are_refused(tasks_dir):
    with pytest.raises(UserError, match="appear twice"):
        load_tasks([tasks_dir / "jcqa.yaml", tasks_dir / "jcqa.yaml"])


def test_encoding_follows_the_harness_and_the_exported_hf_tokenizer(spm_model, tmp_path):
    """Trailing whitespace moves to the continuation; the continuation is the whole text's tokens
    after the context's; our SentencePiece codec equals the exported HF tokenizer's encode."""
    from transformers import AutoTokenizer

    from kumihimo.pretrain.evaluate.hf_backend import HFCodec
    from kumihimo.tokenizer.base import load_tokenizer
    from kumihimo.tokenizer.export_hf import export_hf

    spm = SPMCodec(load_tokenizer(spm_model))
    hf = HFCodec(AutoTokenizer.from_pretrained(export_hf(spm_model, tmp_path / "hf")))
    for context, continuation in [
        ("質問: 空の色は？\n答え:", " 青"),
        ("Question: why?\nAnswer: ", "because"),
        ("", "東京"),
    ]:
        assert scoring.encode_pair(spm, context, continuation) == scoring.encode_pair(
            hf, context, continuation
        )
    ctx, cont = scoring.encode_pair(spm, "Answer: ", "yes")
    assert ctx == spm.encode("Answer:") and ctx[0] == spm.bos_id
    assert ctx + cont == spm.encode("Answer: yes")
    assert scoring.encode_pair(spm, "", "東京")[0] == [spm.bos_id]


class CountingBackend:
    """Logits that favour token (previous + 1) % V: deterministic, and some choices are clearly better."""

    max_length = 64
    vocab = 50

    def __init__(self):
        self.calls = 0

    def score_rows(self, rows):
        self.calls += 1
        width = max(len(r.tokens) for r in rows)
        tokens = torch.tensor([r.tokens + [0] * (width - len(r.tokens)) for r in rows])
        logits = torch.nn.functional.one_hot((tokens + 1) % self.vocab, self.vocab).float() * 5.0
        return scoring.select_scores(logits, rows, self.vocab)


class DigitCodec:
    """Characters '0'..'9' are ids 10..19; BOS is 1, EOS 2."""

    prefix_id, eos_id = 1, 2

    def encode(self, text):
        return [1, *self.encode_plain(text)]

    def encode_plain(self, text):
        return [10 + int(c) for c in text if c.isdigit()]

    def decode(self, ids):
        return "".join(str(i - 10) if 10 <= i < 20 else "\n" for i in ids)


def _digit_task(tmp_path: Path, kind: str, docs: list[dict]) -> Path:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"name": "digits", "data": "d.jsonl", "kind": kind, "prompt": "{q}", "target_delimiter": ""}
    spec |= (
        {"choices": ["c"], "label": "y"}
        if kind == "multiple_choice"
        else {"answer": "a", "max_new_tokens": 3}
    )
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "d.yaml"


def test_multiple_choice_picks_the_likeliest_choice_and_normalises_by_length(tmp_path):
    docs = [
        {"q": "12", "c": ["3", "5"], "y": 0},  # 3 follows 2
        {"q": "45", "c": ["9", "67"], "y": 1},  # 67 is likelier in total? no: 2 tokens; acc_norm helps
        {"q": "7", "c": ["1", "8"], "y": 1},
    ]
    task = load_task(_digit_task(tmp_path, "multiple_choice", docs))
    result = scoring.score_task(task, CountingBackend(), DigitCodec(), batch_size=2)
    lls = [s["loglikelihoods"] for s in result.samples]
    assert lls[0][0] > lls[0][1] and lls[2][1] > lls[2][0]
    assert [s["is_greedy"] for s in result.samples][0] == [True, False]
    assert result.samples[1]["pred"] == 1  # "67": both tokens predicted, beats "9"
    assert result.metrics["acc"] == 1.0 and result.metrics["num_examples"] == 3
    norm = [max(range(2), key=lambda i: (ll[i] / len(d["c"][i]), -i)) for ll, d in zip(lls, docs)]
    assert [s["pred_norm"] for s in result.samples] == norm


def test_greedy_generation_and_exact_match(tmp_path):
    docs = [{"q": "12", "a": "345"}, {"q": "8", "a": "90"}]  # after 9 comes id 20, decoded "\n": stop
    task = load_task(_digit_task(tmp_path, "generation", docs))
    result = scoring.score_task(task, CountingBackend(), DigitCodec(), batch_size=8)
    assert [s["generated"] for s in result.samples] == ["345", "9"]
    assert result.metrics["exact_match"] == 0.5


def test_a_stop_request_ends_scoring_between_batches(tmp_path):
    docs = [{"q": str(i), "c": ["1", "2"], "y": 0} for i in range(10)]
    task = load_task(_digit_task(tmp_path, "multiple_choice", docs))
    backend = CountingBackend()
    asked = iter([False, False, True])
    results = run_tasks([task, task], backend, DigitCodec(), batch_size=4, should_stop=lambda: next(asked))
    assert backend.calls == 2 and not results[0].complete and not results[1].complete
    assert flat_metrics(results) == {}
    results = run_tasks([task], CountingBackend(), DigitCodec(), batch_size=4, max_seconds=1e9)
    assert set(flat_metrics(results)) == {"tasks/digits/acc", "tasks/digits/acc_norm"}


def test_export_writes_rendered_prompts_for_the_harness(tasks_dir, tmp_path):
    tasks = load_tasks(sorted(tasks_dir.glob("*.yaml")))
    names = lm_eval_export.export_tasks(tasks, tmp_path)
    assert sorted(names) == sorted(f"kumihimo_{t.name}" for t in tasks)
    config = yaml.safe_load((tmp_path / "kumihimo_jcqa.yaml").read_text())
    assert config["output_type"] == "multiple_choice" and config["num_fewshot"] == 0
    rows = [json.loads(line) for line in (tmp_path / "kumihimo_jcqa.jsonl").read_text().splitlines()]
    jcqa = next(t for t in tasks if t.name == "jcqa")
    assert [r["context"] for r in rows] == [e.context for e in jcqa.examples]
    assert [r["gold"] for r in rows] == [e.gold for e in jcqa.examples]
    qa = yaml.safe_load((tmp_path / "kumihimo_jemhopqa.yaml").read_text())
    assert qa["output_type"] == "generate_until" and qa["generation_kwargs"]["until"] == ["\n"]


def test_plot_draws_loss_sources_and_tasks(tmp_path):
    from kumihimo.pretrain.evaluate.plot import read_series, write_plot

    rows = [{"step": s, "loss": 7.0 - s * 0.1, "lr": 1e-3} for s in range(1, 11)]
    rows += [
        {
            "step": 5,
            "loss": 6.5,
            "val_loss": 6.6,
            "valid/ja_cc/loss": 6.4,
            "valid/code/loss": 6.9,
            "tasks/jcqa/acc": 0.2,
        },
        {
            "step": 10,
            "loss": 6.0,
            "val_loss": 6.1,
            "valid/ja_cc/loss": 5.9,
            "valid/code/loss": 6.5,
            "tasks/jcqa/acc": 0.4,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    series = read_series(tmp_path / "metrics.jsonl")
    assert series["loss"][4] == (5, 6.5) and series["tasks/jcqa/acc"] == [(5, 0.2), (10, 0.4)]
    page = write_plot(tmp_path, "tiny").read_text()
    assert page.count("<svg") == 3 and "<script" not in page
    for name in ("val_loss", "ja_cc (last 5.9)", "code (last 6.5)", "jcqa/acc (last 0.4)"):
        assert name in page


def test_watch_needs_the_checkpoint_folder_not_one_iteration(tasks_dir, tmp_path):
    import argparse

    from kumihimo.pretrain.evaluate import cli

    iteration = tmp_path / "checkpoints" / "iter_0000010"
    iteration.mkdir(parents=True)
    (iteration / "kumihimo.json").write_text("{}")
    parser = argparse.ArgumentParser()
    cli.register(parser)
    args = parser.parse_args([str(iteration), "--tasks", str(tasks_dir), "--watch"])
    # it would wait forever: an iteration folder has no latest marker to follow
    with pytest.raises(UserError, match=r"--watch follows a checkpoint folder.*checkpoints"):
        cli.run(args)


def test_megatron_options_on_a_hugging_face_folder_are_refused(tasks_dir, tmp_path):
    """A Hugging Face folder is scored in one process with its own tokenizer: layout, --watch, --iteration
    and --tokenizer would be ignored, so they are refused (before the model is loaded)."""
    import argparse

    from kumihimo.pretrain.evaluate import cli

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    parser = argparse.ArgumentParser()
    cli.register(parser)
    args = parser.parse_args([str(folder), "--tasks", str(tasks_dir), "--tp", "2", "--watch"])
    with pytest.raises(UserError, match=r"--tp, --watch apply to a Megatron checkpoint.*Hugging Face folder"):
        cli.run(args)
