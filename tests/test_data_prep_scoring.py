"""Quality classifiers: `kumihimo data train-classifier` (fastText) and the curation's score stage."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
from test_data_prep_pipeline import differing_outputs, read_records, write_corpus

from kumihimo.core.errors import UserError
from kumihimo.data_prep.classifier import TrainSettings, char_segment, train_classifier
from kumihimo.data_prep.config import ScorerConfig
from kumihimo.data_prep.pipeline import curate, refilter
from kumihimo.data_prep.scoring import check_scorers, load_scorers, score_texts

pytest.importorskip("fasttext")

# Words both classes use, and words only one class uses: a document is 3 parts shared to 1 part its own.
SHARED = ["今日は", "私たちは", "ここで", "そして", "これから", "みなさん", "とても", "なので", "について"]
GOOD = ["光合成の仕組み", "方程式を解く", "江戸時代の歴史", "細胞の分裂", "地層の観察", "分数の計算"]
OTHER = ["激安セール", "送料無料", "今すぐクリック", "限定特典", "ポイント還元", "人気ランキング"]


def labelled_documents(num_per_label: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for label, own in (("good", GOOD), ("other", OTHER)):
        for _ in range(num_per_label):
            words = [rng.choice(SHARED) for _ in range(18)] + [rng.choice(own) for _ in range(6)]
            rng.shuffle(words)
            docs.append({"label": label, "text": "、".join(words) + "。"})
    rng.shuffle(docs)
    return docs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("classifier")
    data = write_jsonl(root / "labelled.jsonl", labelled_documents(300, seed=0))
    metrics = train_classifier(TrainSettings(inputs=[str(data)], output=str(root / "model"), epochs=5))
    return root / "model", metrics


def test_char_segmentation_makes_every_character_a_token():
    assert char_segment("日本語 の\nテキスト", 100) == "日 本 語 ▁ の ▁ テ キ ス ト"
    assert char_segment("あいうえお", 3) == "あ い う"


def test_classifier_separates_generated_labels(trained):
    model_dir, metrics = trained
    # Each class has six phrases the other never uses, and every document holds six of them: its
    # character n-grams decide the label whatever the shared filler, so a working classifier is
    # (nearly) perfect on the 60 held-out documents; 0.95 leaves room for a few errors of a short
    # training run, and a classifier that ignored the text would sit near 0.5.
    assert metrics["num_heldout"] == 60
    for label in ("good", "other"):
        assert metrics["labels"][label]["f1"] > 0.95, metrics
    saved = json.loads((model_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    meta = json.loads((model_dir / "classifier.json").read_text())
    assert meta["segmentation"] == "char" and sorted(meta["labels"]) == ["good", "other"]


def test_fasttext_scores_are_probabilities_and_deterministic(trained):
    model_dir, _ = trained
    scorer = ScorerConfig(name="edu", path=str(model_dir / "model.bin"), label="good")
    texts = [d["text"] for d in labelled_documents(10, seed=1)]
    first = score_texts(load_scorers_of(scorer), texts)
    assert first == score_texts(load_scorers_of(scorer), texts)
    good = [s["score_edu"] for s, d in zip(first, labelled_documents(10, seed=1)) if d["label"] == "good"]
    other = [s["score_edu"] for s, d in zip(first, labelled_documents(10, seed=1)) if d["label"] == "other"]
    assert min(good) > 0.5 > max(other)


def load_scorers_of(*scorers: ScorerConfig):
    from kumihimo.data_prep.config import ScoreConfig

    return load_scorers(ScoreConfig(scorers=list(scorers)))


def tiny_hf_classifier(root: Path, num_labels: int = 1) -> Path:
    """A random 2-layer BERT regression (or classification) model with a character vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for phrase in SHARED + GOOD + OTHER for c in phrase} | set("、。"))
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), tokenize_chinese_chars=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(chars) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    BertForSequenceClassification(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_curation_stores_fasttext_and_hf_scores(tmp_path, trained):
    model_dir, _ = trained
    config = write_corpus(tmp_path / "corpus")
    config.score.scorers = [
        ScorerConfig(name="edu", path=str(model_dir / "model.bin"), label="good"),
        ScorerConfig(name="bert", kind="hf", path=str(tiny_hf_classifier(tmp_path / "bert")), device="cpu"),
    ]
    curate(config)
    kept = read_records(Path(config.output_dir) / "curated" / "ja.jsonl")
    assert kept
    for record in kept:
        assert 0.0 <= record["attributes"]["score_edu"] <= 1.0
        assert isinstance(record["attributes"]["score_bert"], float)
    report = json.loads((Path(config.output_dir) / "report.json").read_text())
    edu = report["per_source"]["ja"]["scores"]["score_edu"]
    assert edu["count"] == len(kept)
    assert edu["mean"] == pytest.approx(sum(r["attributes"]["score_edu"] for r in kept) / len(kept))
    assert "| ja | score_bert |" in (Path(config.output_dir) / "report.md").read_text()
    # the same run again gives the same scores (eval mode, fixed rounding)
    config.output_dir = str(tmp_path / "again")
    curate(config)
    assert read_records(Path(config.output_dir) / "curated" / "ja.jsonl") == kept


def test_datatrove_tasks_store_the_scores_of_one_process(tmp_path, trained):
    pytest.importorskip("datatrove")
    config = write_corpus(tmp_path / "corpus")
    config.score.scorers = [
        ScorerConfig(name="edu", path=str(trained[0] / "model.bin"), label="good"),
        ScorerConfig(name="bert", kind="hf", path=str(tiny_hf_classifier(tmp_path / "bert")), device="cpu"),
    ]
    curate(config)
    single = {s: read_records(Path(config.output_dir) / "curated" / f"{s}.jsonl") for s in ("ja", "en")}
    config.output_dir = str(tmp_path / "tasks")
    config.executor.kind, config.executor.tasks, config.executor.workers = "datatrove-local", 3, 1
    curate(config)
    tasks = {s: read_records(Path(config.output_dir) / "curated" / f"{s}.jsonl") for s in ("ja", "en")}
    assert [r["attributes"] for r in tasks["ja"] + tasks["en"]] == [
        r["attributes"] for r in single["ja"] + single["en"]
    ]


def test_cli_trains_and_prints_precision_recall_f1(tmp_path, capsys):
    from kumihimo.cli import main

    data = write_jsonl(tmp_path / "labelled.jsonl", labelled_documents(60, seed=3))
    argv = [
        "data",
        "train-classifier",
        "--input",
        str(data),
        "--output",
        str(tmp_path / "m"),
        "--epochs",
        "2",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "precision" in err and "held-out: 12 documents" in err
    assert (tmp_path / "m" / "model.bin").is_file() and (tmp_path / "m" / "metrics.json").is_file()
    one_label = write_jsonl(tmp_path / "one.jsonl", [{"label": "good", "text": "a"}] * 3)
    assert main(["data", "train-classifier", "--input", str(one_label), "--output", str(tmp_path / "x")]) == 2
    assert "need 2+ labels" in capsys.readouterr().err


def test_hf_classifier_with_labels_scores_the_chosen_label(tmp_path):
    folder = tiny_hf_classifier(tmp_path / "clf", num_labels=2)
    scorer = ScorerConfig(name="c", kind="hf", path=str(folder), label="LABEL_1", batch_size=3, device="cpu")
    texts = [d["text"] for d in labelled_documents(4, seed=2)]
    scores = [s["score_c"] for s in score_texts(load_scorers_of(scorer), texts)]
    assert all(0.0 < s < 1.0 for s in scores)
    # batching does not change the scores beyond the stored rounding
    one_batch = ScorerConfig(
        name="c", kind="hf", path=str(folder), label="LABEL_1", batch_size=8, device="cpu"
    )
    assert [s["score_c"] for s in score_texts(load_scorers_of(one_batch), texts)] == pytest.approx(
        scores, abs=1e-5
    )


def test_corrupt_or_missing_models_stop_before_any_work(tmp_path, trained):
    from kumihimo.data_prep.config import ScoreConfig

    config = write_corpus(tmp_path / "corpus")
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not a fasttext model" * 10)
    config.score.scorers = [ScorerConfig(name="edu", path=str(broken))]
    with pytest.raises(UserError, match="'edu'.*not a fastText model"):
        curate(config)
    assert not (Path(config.output_dir) / "work" / "shards").exists()

    folder = tiny_hf_classifier(tmp_path / "bert")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="'bert'.*corrupt"):
        check_scorers(ScoreConfig(scorers=[ScorerConfig(name="bert", kind="hf", path=str(folder))]))
    with pytest.raises(UserError, match="no such model file"):
        check_scorers(ScoreConfig(scorers=[ScorerConfig(name="x", path=str(tmp_path / "missing.bin"))]))
    with pytest.raises(UserError, match="label='nope'"):
        check_scorers(
            ScoreConfig(scorers=[ScorerConfig(name="x", path=str(trained[0] / "model.bin"), label="nope")])
        )


def test_missing_fasttext_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fasttext(name, *args, **kwargs):
        if name == "fasttext":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fasttext)
    from kumihimo.data_prep.classifier import import_fasttext

    with pytest.raises(UserError, match=r"\.\[classify\]"):
        import_fasttext()


def test_changed_model_refuses_to_resume(tmp_path, trained):
    import shutil

    config = write_corpus(tmp_path / "corpus")
    model = tmp_path / "model"
    shutil.copytree(trained[0], model)
    config.score.scorers = [ScorerConfig(name="edu", path=str(model / "model.bin"))]
    curate(config)
    (model / "classifier.json").write_text(
        (model / "classifier.json").read_text().replace('"max_chars": 4000', '"max_chars": 3000')
    )
    with pytest.raises(UserError, match="with a different curation config"):
        curate(config)


def test_min_score_drops_and_refilter_applies_it_from_the_stored_scores(tmp_path, trained):
    base = write_corpus(tmp_path / "corpus")
    base.filters.refilterable = True
    base.score.scorers = [ScorerConfig(name="edu", path=str(trained[0] / "model.bin"), label="good")]

    def config_for(out: str, min_score: float | None, refilterable: bool = True):
        config = copy.deepcopy(base)  # (writing the corpus again would change its files' mtimes)
        config.output_dir = str(tmp_path / out)
        config.score.scorers[0].min_score = min_score
        config.filters.refilterable = refilterable
        return config

    loose = curate(config_for("run", None))
    scores = sorted(r["attributes"]["score_edu"] for r in read_records(tmp_path / "run/curated/ja.jsonl"))
    cut = scores[len(scores) // 2]  # the median: about half the Japanese documents fall below it
    result = refilter(config_for("run", cut))
    fresh = curate(config_for("fresh", cut))
    assert result.num_kept == fresh.num_kept < loose.num_kept
    assert result.dropped["quality"]["low_score_edu"] >= 1
    assert differing_outputs(tmp_path / "run", tmp_path / "fresh") == []
    plain = curate(config_for("plain", cut, refilterable=False))
    ids = {r["id"] for r in read_records(tmp_path / "plain/curated/ja.jsonl")}
    assert ids == {r["id"] for r in read_records(tmp_path / "run/curated/ja.jsonl")}
    assert plain.num_kept == result.num_kept
    low = [r for r in read_records(tmp_path / "plain/dropped/ja.jsonl") if r["reason"] == "low_score_edu"]
    assert low and all(r["attributes"]["score_edu"] < cut for r in low)
    changed = config_for("run", cut)
    changed.score.scorers[0].label = "other"
    with pytest.raises(UserError, match="score.scorers.edu.label"):
        refilter(changed)


def test_refilter_keyed_min_score_takes_the_scorers_the_curation_got_as_an_override(
    tmp_path, trained, capsys
):
    """Issue 30 point 4: docs/data_prep.md's `refilter RECIPE output_dir=SAME score.scorers.edu.min_score=X`
    failed with "is not a list" when the curation's scorers came as an override (the recipe lists none).
    It now takes the curation's saved scorers; with none to take, one line says what to write."""
    from kumihimo.cli import main
    from kumihimo.core import configtree
    from kumihimo.data_prep.config import DataPrepConfig

    base = write_corpus(tmp_path / "corpus")
    base.filters.refilterable = True
    recipe = tmp_path / "recipe.yaml"
    configtree.save(base, recipe)  # no scorers in the recipe
    out = tmp_path / "run"
    scorer = f"score.scorers=[{{name: edu, path: {trained[0] / 'model.bin'}, label: good}}]"
    assert main(["data", "curate", str(recipe), f"output_dir={out}", scorer]) == 0
    scores = sorted(r["attributes"]["score_edu"] for r in read_records(out / "curated/ja.jsonl"))
    cut = scores[len(scores) // 2]
    keyed = f"score.scorers.edu.min_score={cut}"
    assert main(["data", "refilter", str(recipe), f"output_dir={out}", keyed]) == 0
    low = [r for r in read_records(out / "dropped/ja.jsonl") if r["reason"] == "low_score_edu"]
    assert low and all(r["attributes"]["score_edu"] < cut for r in low)
    assert configtree.load(DataPrepConfig, out / "data_prep_config.yaml").score.scorers[0].min_score == cut

    capsys.readouterr()
    nothing = [
        "data",
        "refilter",
        str(recipe),
        f"output_dir={tmp_path / 'none'}",
        "score.scorers.edu.min_score=0.9",
    ]
    assert main(nothing) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "give the whole list: score.scorers='[{name: edu, min_score: 0.9, ...}]'" in err, err
