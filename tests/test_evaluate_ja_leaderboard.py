"""The ja_leaderboard presets are lm-evaluation-harness's japanese_leaderboard tasks.

The harness runs its own installed task YAMLs (only dataset_path pointed at local parquet files in the
hub layout, tests/ja_leaderboard_fixtures.py); kumihimo reads the same files through its presets. On
every task the prompts are byte-identical, and on a tiny random Hugging Face model (fp32, CPU) the
per-choice log-likelihoods agree within 1e-4, the generations are identical and so are the aggregate
scores (acc, exact match, MGSM acc, XL-Sum ROUGE-2). XL-Sum is scored with the real packages its task
needs (fugashi with unidic-lite, neologdn, emoji), per document and in aggregate, through the harness's
own task on crafted generations too, since a random model's summaries score 0.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kumihimo.pretrain.evaluate import ja_leaderboard
from kumihimo.pretrain.evaluate.suites import load_entries
from tests import ja_leaderboard_fixtures as fixtures

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
for _package in ("emoji", "neologdn", "fugashi", "unidic_lite"):  # XL-Sum's scoring, in the same extras
    pytest.importorskip(_package, reason=f"{_package} is not installed (pip install -e '.[eval]')")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hub")
    return root, fixtures.write_hub_files(root)


@pytest.fixture(scope="module")
def harness_tasks(hub, tmp_path_factory):
    """The harness's tasks built from its installed YAMLs on the local files (no download)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = tmp_path_factory.mktemp("harness-tasks")
    names = fixtures.write_harness_tasks(folder, hub[1])
    manager = TaskManager(include_path=str(folder), include_defaults=False)  # the whole index takes a minute
    return manager, names, get_task_dict(names, manager)


def _harness_utils(name: str):
    spec = importlib.util.spec_from_file_location(name, fixtures.harness_folder() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATIONS = [
    "東京",
    " 東京\n",
    "\t東京 です",
    "答えは1,234です。",
    "3+2=5。答えは5.",
    "わからない",
    "",
    "桜が満開。電車が運休",
]
REFERENCES = ["東京", "東京", "東京", "1234", "5", "5", "富士山", "東京で桜が満開に。"]
# XL-Sum: summaries and generated ones where emoji, width, spacing and MeCab's word bounds matter
SUMMARIES = ["東京で桜が満開に。", "大雨で電車が運休。", "新図書館が開館。", "台風が接近。", "富士山"]
SUMMARIZED = [
    "桜が満開。電車が運休",
    " 大雨😀で電車が運休！\n",
    "新図書館がｵｰﾌﾟﾝ、１０時に開館",
    "台風が、接近中。",
    "",
]


def test_metrics_are_the_harness_functions():
    """exact_match (whitespaces filter + regexes_to_ignore), MGSM's process_results and XL-Sum's
    rouge2_agg, called as the harness calls them, against the presets' graders."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import WhitespaceFilter

    from kumihimo.pretrain.evaluate.tasks import Example

    examples = [Example(i, "", [], -1, [r]) for i, r in enumerate(REFERENCES)]
    filtered = [r[0] for r in WhitespaceFilter().apply([[g] for g in GENERATIONS], [])]
    theirs = [
        exact_match_hf_evaluate([p], [r], regexes_to_ignore=[r"^\s+", r"\s+$"])["exact_match"]
        for p, r in zip(filtered, REFERENCES)
    ]
    _, ours = ja_leaderboard.exact_match(examples, GENERATIONS)
    assert [float(t) for t in theirs] == [float(o["exact_match"]) for o in ours] and any(theirs)
    mgsm = _harness_utils("ja_leaderboard_mgsm")
    theirs = [
        mgsm.process_results({"answer_number": int(r)}, [g])["acc"]
        for g, r in zip(GENERATIONS[3:6], REFERENCES[3:6])
    ]
    _, ours = ja_leaderboard.mgsm_acc(examples[3:6], GENERATIONS[3:6])
    assert theirs == [o["acc"] for o in ours] == [True, True, False]
    xlsum = _harness_utils("ja_leaderboard_xlsum")
    assert xlsum.Tagger.__module__.startswith("fugashi")  # the real MeCab, not a stand-in
    summaries = [Example(i, "", [], -1, [r]) for i, r in enumerate(SUMMARIES)]
    filtered = [r[0] for r in WhitespaceFilter().apply([[g] for g in SUMMARIZED], [])]
    scorer = xlsum.rouge_scorer.RougeScorer(rouge_types=["rouge2"], tokenizer=xlsum.MecabTokenizer())
    theirs = [scorer.score(r, p)["rouge2"].fmeasure for r, p in zip(SUMMARIES, filtered)]
    np.random.seed(1234)  # simple_evaluate seeds numpy so before scoring
    aggregate = xlsum.rouge2_agg(list(zip(SUMMARIES, filtered)))
    summary, ours = ja_leaderboard.rouge2(summaries, SUMMARIZED)
    assert [o["rouge2"] for o in ours] == theirs and len(set(theirs)) == len(theirs)
    assert summary["rouge2"] == aggregate > 0


def test_xlsum_words_are_the_harness_words():
    """emoji removed, neologdn's normalisation (half-width kana, full-width marks, repeated long vowels,
    ideographic space), MeCab's words: the real packages on both sides."""
    text = " ｵｰﾌﾟﾝしました😀ーーー！　東京で✂桜が満開 "
    theirs = _harness_utils("ja_leaderboard_xlsum").MecabTokenizer().tokenize(text)
    assert ja_leaderboard.MecabTokenizer().tokenize(text) == theirs
    assert theirs == ["オープン", "し", "まし", "たー", "!", "東京", "で", "桜", "が", "満開"]


def test_xlsum_scores_are_the_harness_task_scores(hub, harness_tasks):
    """Crafted generations for the XL-Sum documents through the harness's own task (its whitespaces filter,
    process_results and rouge2_agg from the YAML) and through the preset's grader: per-document
    ROUGE-2 and the aggregate equal, and not zero."""
    task = harness_tasks[2]["local_ja_leaderboard_xlsum"]
    _harness_requests(task)
    instances = sorted(task.instances, key=lambda i: i.doc_id)
    generated = SUMMARIZED[1:3]  # for the fixture's two test documents
    for instance, text in zip(instances, generated, strict=True):
        instance.resps = [text]
    task.apply_filters()
    items = [task.process_results(i.doc, [i.filtered_resps["whitespaces"]])["rouge2"] for i in instances]
    np.random.seed(1234)  # as simple_evaluate seeds numpy before the aggregation
    theirs = task.aggregation()["rouge2"](items)
    utils = _harness_utils("ja_leaderboard_xlsum")
    scorer = utils.rouge_scorer.RougeScorer(rouge_types=["rouge2"], tokenizer=utils.MecabTokenizer())
    (mine,) = load_entries([f"ja_leaderboard_xlsum={hub[0]}"])
    summary, per_document = mine.grade(mine.examples, generated)
    assert [e.answers[0] for e in mine.examples] == [r for r, _ in items]
    assert [d["rouge2"] for d in per_document] == [scorer.score(*i)["rouge2"].fmeasure for i in items]
    print(f"XL-Sum ROUGE-2 per document {[d['rouge2'] for d in per_document]}, aggregate {theirs}")
    assert summary["rouge2"] == theirs > 0


def test_the_presets_are_the_installed_group():
    group = yaml.safe_load((fixtures.harness_folder() / "_ja_leaderboard.yaml").read_text())
    assert group["group"] == "japanese_leaderboard"
    assert sorted(group["task"]) == sorted(ja_leaderboard.PRESETS)


def _harness_requests(task) -> dict[int, list[tuple]]:
    task.set_fewshot_seed(1234)  # lm-eval's default fewshot_random_seed, as simple_evaluate sets it
    task.build_all_requests()
    requests: dict[int, list[tuple]] = {}
    for instance in task.instances:
        requests.setdefault(instance.doc_id, []).append(instance.args)
    return requests


def test_prompts_are_byte_identical(hub, harness_tasks):
    ours = {t.name: t for t in load_entries([f"ja_leaderboard={hub[0]}"])}
    assert sorted(ours) == sorted(ja_leaderboard.PRESETS)
    for name, task in harness_tasks[2].items():
        mine = ours[name.removeprefix("local_")]
        requests = _harness_requests(task)
        assert sorted(requests) == [e.index for e in mine.examples]
        for example in mine.examples:
            args = requests[example.index]
            assert {a[0] for a in args} == {example.context}, (name, example.index)
            if mine.spec.kind == "multiple_choice":
                assert [a[1] for a in args] == [mine.spec.target_delimiter + c for c in example.choices]
    # the few-shot draw matters: another seed gives other prompts
    other = ja_leaderboard.load_suite(
        hub[0], ["ja_leaderboard_jcommonsenseqa"], ja_leaderboard.Options(fewshot_seed=1)
    )
    assert [e.context for e in other[0].examples] != [
        e.context for e in ours["ja_leaderboard_jcommonsenseqa"].examples
    ]


def test_a_suite_file_and_limit(hub, tmp_path):
    (tmp_path / "ja.yaml").write_text(
        yaml.safe_dump(
            {"suite": "ja_leaderboard", "data": str(hub[0]), "tasks": ["ja_leaderboard_jnli"], "limit": 2}
        )
    )
    (task,) = load_entries([str(tmp_path / "ja.yaml")])
    full = load_entries([f"ja_leaderboard_jnli={hub[0]}"])[0]
    assert [e.context for e in task.examples] == [e.context for e in full.examples[:2]]


def test_missing_files_are_named(tmp_path):
    from kumihimo.core.errors import UserError

    with pytest.raises(UserError, match="no validation split under .*JNLI"):
        load_entries([f"ja_leaderboard_jnli={tmp_path}"])


def test_mgsm_answer_extraction():
    assert ja_leaderboard.mgsm_number("3+2=5。答えは1,000です。") == 1000
    assert ja_leaderboard.mgsm_number("答えは2.5") is None
    assert ja_leaderboard.mgsm_number("わからない") is None


def write_tiny_model(folder: Path) -> Path:
    """A 2-layer random Qwen2 (seed 0) with a byte-level BPE tokenizer; 2048 positions, so the harness's
    256 generated tokens fit after every prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from kumihimo.sample.tiny_hf_model import sample_documents, write_tokenizer

    write_tokenizer(folder, [d["text"] for d in sample_documents()[:200]])
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.slow  # the harness and kumihimo each score the eight tasks
def test_scores_agree_with_the_harness(hub, harness_tasks, tmp_path):
    from kumihimo.pretrain.evaluate.hf_backend import HFBackend
    from kumihimo.pretrain.evaluate.runner import run_tasks

    model = write_tiny_model(tmp_path / "model")
    manager, names, _ = harness_tasks
    # 16 generated tokens, not the harness's 256: the same code paths at a 2-core test's cost
    output = lm_eval.simple_evaluate(
        gen_kwargs={"max_gen_toks": 16},
        model="hf",
        model_args={"pretrained": str(model), "dtype": "float32"},
        tasks=names,
        task_manager=manager,
        device="cpu",
        batch_size=1,
        log_samples=True,
        bootstrap_iters=0,
    )
    backend = HFBackend(model, "cpu")
    tasks = ja_leaderboard.load_suite(hub[0], options=ja_leaderboard.Options(max_new_tokens=16))
    results = {r.name: r for r in run_tasks(tasks, backend, backend.codec, batch_size=4)}
    for task in tasks:
        harness = sorted(output["samples"][f"local_{task.name}"], key=lambda s: s["doc_id"])
        mine = results[task.name]
        metrics = output["results"][f"local_{task.name}"]
        if task.spec.kind == "multiple_choice":
            worst = max(
                abs(float(r[0]) - b)
                for theirs, ours in zip(harness, mine.samples, strict=True)
                for r, b in zip(theirs["filtered_resps"], ours["loglikelihoods"], strict=True)
            )
            print(f"{task.name}: max |log-likelihood difference| {worst:.1e}, acc {mine.metrics['acc']}")
            assert worst < TOLERANCE
            assert metrics["acc,none"] == mine.metrics["acc"]
            continue
        assert [s["resps"][0][0] for s in harness] == [s["generated"] for s in mine.samples], task.name
        key = {
            "exact_match": "exact_match,whitespaces",
            "mgsm_acc": "acc,none",
            "rouge2": "rouge2,whitespaces",
        }
        metric = ja_leaderboard.PRESETS[task.name].metric
        if metric == "rouge2":  # per document: the harness's (summary, filtered generation) pairs, its scorer
            utils = _harness_utils("ja_leaderboard_xlsum")
            scorer = utils.rouge_scorer.RougeScorer(rouge_types=["rouge2"], tokenizer=utils.MecabTokenizer())
            pairs = [s["rouge2"] for s in harness]
            assert [r for r, _ in pairs] == [s["answers"][0] for s in mine.samples]
            assert [scorer.score(*p)["rouge2"].fmeasure for p in pairs] == [s["rouge2"] for s in mine.samples]
        ours_value = mine.metrics["acc" if metric == "mgsm_acc" else metric]
        assert metrics[key[metric]] == pytest.approx(ours_value, abs=1e-12), (
            task.name,
            metrics,
            mine.metrics,
        )


def test_xlsum_without_its_packages_is_refused_at_setup(hub, monkeypatch):
    from kumihimo.core.errors import UserError

    monkeypatch.setitem(sys.modules, "fugashi", None)  # as if not installed
    with pytest.raises(UserError, match="needs fugashi .*pip install"):
        load_entries([f"ja_leaderboard={hub[0]}"])
    assert load_entries([f"ja_leaderboard_jnli={hub[0]}"])  # the other tasks still load


def test_a_suite_file_with_an_unknown_key_is_refused(hub, tmp_path):
    from kumihimo.core.errors import UserError

    (tmp_path / "ja.yaml").write_text(
        yaml.safe_dump({"suite": "ja_leaderboard", "data": str(hub[0]), "shots": 5})
    )
    with pytest.raises(UserError, match="suite files take .*found data, shots, suite"):
        load_entries([str(tmp_path / "ja.yaml")])
