"""data_prep end to end: accounting, quarantine, resume after a crash, parallel runs, Megatron output."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kumihimo.core.configtree import check_documented
from kumihimo.core.errors import UserError
from kumihimo.data_prep import shard_stage
from kumihimo.data_prep.blend import read_blend
from kumihimo.data_prep.cli import register
from kumihimo.data_prep.config import DataPrepConfig, SourceConfig, load_config
from kumihimo.data_prep.decontam import build_eval_index, save_eval_index
from kumihimo.data_prep.documents import Document
from kumihimo.data_prep.indexed import read_index
from kumihimo.data_prep.pipeline import build_datasets, curate
from kumihimo.data_prep.shards import plan_shards, read_shard

FIXTURES = Path(__file__).parent / "fixtures" / "data_prep"
JA = (FIXTURES / "ja_docs.txt").read_text(encoding="utf-8").split("\n\n")
EN = (FIXTURES / "en_docs.txt").read_text(encoding="utf-8").split("\n\n")
CONFIGS = Path(__file__).parent.parent / "configs" / "data_prep"

# id -> where it must end: "kept" or (stage, reason)
EXPECTED = {
    "ja0": "kept",
    "ja1": "kept",
    "ja2": "kept",
    "ja-pii": "kept",
    "en0": "kept",
    "en-pii": "kept",
    "ja-moji": "kept",  # repaired, and no clean copy exists
    "ja-exact": ("dedup", "exact_duplicate"),
    "ja-near": ("dedup", "near_duplicate"),
    "en-copy-of-ja1": ("dedup", "exact_duplicate"),  # same text in a later source: the ja source keeps it
    "ja-short": ("quality", "ja_too_short"),
    "ja-spam": ("quality", "ng_words"),
    "de": ("langid", "language_not_kept"),
    "en-lorem": ("quality", "boilerplate_document"),
    "en-eval": ("decontam", "eval_overlap"),
    "ja-blocked": ("quality", "blocked_host"),
}
NUM_BAD_LINES = 5


def write_corpus(root: Path) -> DataPrepConfig:
    root.mkdir(parents=True, exist_ok=True)
    ja_a = [
        {"id": "ja0", "text": JA[0], "url": "https://blog.example.jp/a"},
        {"id": "ja1", "text": JA[1]},
        {"id": "ja-exact", "text": "  " + JA[0].replace("\n", "\n\n") + "\n"},
        {"id": "ja-short", "text": "今日はいい天気ですね。"},
        {"id": "ja-spam", "text": JA[3] + "\n出会い系で無料登録！出会い系なら今すぐ無料登録。"},
    ]
    ja_b = [
        {"id": "ja2", "text": JA[2]},
        {"id": "ja-near", "text": JA[1].replace("三年目", "四年目").replace("バジル", "パセリ")},
        {"id": "ja-moji", "text": JA[3].encode("utf-8").decode("latin-1")},
        {
            "id": "ja-pii",
            "text": JA[4] + "\nお問い合わせは bousai@example.org または 090-1234-5678 までお寄せください。",
        },
        {"id": "ja-blocked", "text": JA[0][::-1], "url": "http://www.spam.example.com/x"},
    ]
    en = [
        {"id": "en0", "text": EN[0]},
        {"id": "en-copy-of-ja1", "text": JA[1]},
        {
            "id": "en-pii",
            "text": EN[1] + "\nQuestions? Write to baker@example.com or call +1 (555) 123-4567.",
        },
        {
            "id": "de",
            "text": "Der alte Hafen hat sich in den letzten Jahren langsam verändert, und viele "
            "Lagerhäuser sind heute kleine Werkstätten und Cafés am Wasser. " * 4,
        },
        {"id": "en-lorem", "text": EN[0] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."},
        {"id": "en-eval", "text": EN[2]},
    ]
    bad = [
        b"{not json\n",
        b'{"id": "x", "text": "\xff\xfe broken"}\n',
        b'{"id": "no-text"}\n',
        b'{"id": "empty", "text": "   "}\n',
        b'["a", "list"]\n',
    ]
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in ja_a]
    (root / "ja_a.jsonl").write_bytes(b"".join(lines[:2] + bad[:3] + lines[2:] + [b"\n"]))
    with gzip.open(root / "ja_b.jsonl.gz", "wb") as handle:
        handle.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in ja_b))
    en_lines = [json.dumps(r).encode() + b"\n" for r in en]
    (root / "en.jsonl").write_bytes(b"".join(en_lines[:3] + bad[3:] + en_lines[3:]))
    (root / "eval.jsonl").write_text(json.dumps({"question": EN[2][:260], "answer": "yes"}) + "\n")
    config = DataPrepConfig(output_dir=str(root / "out"), num_workers=1)
    config.input.sources = [
        SourceConfig(name="ja", paths=[str(root / "ja_*.jsonl*")]),
        SourceConfig(name="en", paths=[str(root / "en.jsonl")], weight_multiplier=2.0),
    ]
    config.input.shard_bytes = 2048
    config.filters.ng_words.words = ["出会い系", "無料登録"]
    config.filters.urls.blocked_hosts = ["spam.example.com"]
    config.decontam.eval_paths = [str(root / "eval.jsonl")]
    return config


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def output_files(out: Path) -> dict[str, bytes]:
    names = [
        "report.json",
        *(f"{d}/{s}.jsonl" for d in ("curated", "dropped", "quarantine") for s in ("ja", "en")),
    ]
    return {name: (out / name).read_bytes() for name in names}


def differing_outputs(out: Path, reference: Path, roots: tuple[Path, Path] | None = None) -> list[str]:
    """The output files (curated/, dropped/, quarantine/, report.json) that differ from the reference
    run's, once each run's folder (`roots`: default the two output folders; the records and the report
    name paths under them) is written as ROOT."""
    mine_root, reference_root = roots or (out, reference)
    mine, theirs = output_files(out), output_files(reference)
    return [
        name
        for name in theirs
        if mine[name].replace(str(mine_root).encode(), b"ROOT")
        != theirs[name].replace(str(reference_root).encode(), b"ROOT")
    ]


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory):
    config = write_corpus(tmp_path_factory.mktemp("corpus"))
    return config, curate(config)


def test_every_input_line_ends_in_exactly_one_place(curated_run):
    config, result = curated_run
    out = Path(config.output_dir)
    kept = read_records(out / "curated/ja.jsonl") + read_records(out / "curated/en.jsonl")
    dropped = read_records(out / "dropped/ja.jsonl") + read_records(out / "dropped/en.jsonl")
    quarantined = read_records(out / "quarantine/ja.jsonl") + read_records(out / "quarantine/en.jsonl")
    ids = [r["id"] for r in kept] + [r["id"] for r in dropped]
    assert sorted(ids) == sorted(EXPECTED)
    assert {r["id"] for r in kept} == {k for k, v in EXPECTED.items() if v == "kept"}
    for record in dropped:
        assert (record["stage"], record["reason"]) == EXPECTED[record["id"]], record["id"]
        assert record["file"] and record["line"] >= 1 and "excerpt" in record
    assert len(quarantined) == NUM_BAD_LINES
    assert result.num_input_lines == len(EXPECTED) + NUM_BAD_LINES
    assert result.num_kept + result.num_dropped + result.num_quarantined == result.num_input_lines
    assert result.num_kept == len(kept) and result.num_quarantined == NUM_BAD_LINES
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["totals"]["num_kept"] == len(kept)
    assert report["dropped"]["dedup"] == {"exact_duplicate": 2, "near_duplicate": 1}
    assert report["totals"]["num_repaired_mojibake"] == 1
    assert "## Funnel" in (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")  # self-contained: inline SVG, nothing fetched
    assert page.count("<svg") == 5 and "dedup/near_duplicate" in page
    assert "<script" not in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_quarantine_records_file_line_and_reason(curated_run):
    config, _ = curated_run
    out = Path(config.output_dir)
    records = read_records(out / "quarantine/ja.jsonl") + read_records(out / "quarantine/en.jsonl")
    by_reason = {r["reason"]: r for r in records}
    assert set(by_reason) == {
        "malformed_json",
        "invalid_utf8",
        "missing_text_field",
        "empty_text",
        "not_an_object",
    }
    assert (
        by_reason["malformed_json"]["file"].endswith("ja_a.jsonl")
        and by_reason["malformed_json"]["line"] == 3
    )
    assert by_reason["missing_text_field"]["line"] == 5
    assert by_reason["empty_text"]["file"].endswith("en.jsonl") and by_reason["empty_text"]["line"] == 4


def test_kept_documents_are_labelled_repaired_and_redacted(curated_run):
    config, result = curated_run
    kept = {r["id"]: r for r in read_records(Path(config.output_dir) / "curated/ja.jsonl")}
    kept.update({r["id"]: r for r in read_records(Path(config.output_dir) / "curated/en.jsonl")})
    # attributes: the quality measurements, so thresholds can be changed later (`kumihimo data refilter`)
    assert all(set(r) == {"id", "text", "lang", "source", "meta", "attributes"} for r in kept.values())
    assert kept["ja0"]["lang"] == "ja" and kept["en0"]["lang"] == "en" and kept["en0"]["source"] == "en"
    assert kept["ja0"]["meta"]["url"] == "https://blog.example.jp/a" and kept["ja0"]["meta"]["line"] == 1
    assert kept["ja-moji"]["text"] == JA[3]
    assert "<EMAIL>" in kept["ja-pii"]["text"] and "<PHONE>" in kept["ja-pii"]["text"]
    assert "bousai@example.org" not in kept["ja-pii"]["text"]
    assert kept["en-pii"]["meta"]["pii"] == {"email": 1, "phone": 1}
    assert result.pii == {"email": 2, "phone": 2}


def test_shards_split_large_plain_files_at_line_starts(tmp_path):
    config = write_corpus(tmp_path)
    shards = plan_shards(config)
    ja_a = [s for s in shards if s.path.endswith("ja_a.jsonl")]
    assert len(ja_a) > 1, "shard_bytes=2048 should split ja_a.jsonl"
    lines = [(item.line, getattr(item, "doc_id", None)) for s in ja_a for item in read_shard(s, config.input)]
    assert [n for n, _ in lines] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [i for _, i in lines if i] == ["ja0", "ja1", "ja-exact", "ja-short", "ja-spam"]
    assert [s.index for s in shards] == list(range(len(shards)))


def crash_then_resume(config, monkeypatch) -> None:
    """Curate, crash after two shards, curate again: every shard is processed exactly once overall and
    nothing looks finished after the crash."""
    real = shard_stage.process_shard
    calls = []

    def crash_after_two(shard, tools, shards_dir):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(shard.index)
        real(shard, tools, shards_dir)

    monkeypatch.setattr(shard_stage, "process_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        curate(config)
    assert not (Path(config.output_dir) / "curated").exists()

    def counting(shard, tools, shards_dir):
        calls.append(shard.index)
        real(shard, tools, shards_dir)

    monkeypatch.setattr(shard_stage, "process_shard", counting)
    curate(config)
    num_shards = len(plan_shards(config))
    assert len(calls) == num_shards and len(set(calls)) == num_shards, "finished shards were redone"


def test_resume_after_crash_redoes_only_unfinished_shards(tmp_path, monkeypatch, curated_run):
    config = write_corpus(tmp_path)
    crash_then_resume(config, monkeypatch)
    reference = Path(curated_run[0].output_dir)
    assert differing_outputs(Path(config.output_dir), reference, roots=(tmp_path, reference.parent)) == []


def test_decontamination_checks_each_batch_once(tmp_path, monkeypatch):
    """The shard stage hashes a batch's texts against the evaluation index once (it once ran the check
    twice and threw the first answer away)."""
    config = write_corpus(tmp_path)
    counts = {"batches": 0, "checks": 0}
    real_batch, real_check = shard_stage._curate_batch, shard_stage.Decontaminator.check_batch

    def counting_batch(docs, tools):
        counts["batches"] += 1
        return real_batch(docs, tools)

    def counting_check(self, texts):
        counts["checks"] += 1
        return real_check(self, texts)

    monkeypatch.setattr(shard_stage, "_curate_batch", counting_batch)
    monkeypatch.setattr(shard_stage.Decontaminator, "check_batch", counting_check)
    curate(config)
    assert counts["batches"] > 0 and counts["checks"] == counts["batches"]


def test_per_document_outcomes_are_frozen_dataclasses(tmp_path):
    """A drop and a clean-up change are named, frozen records (not positional tuples)."""
    config = write_corpus(tmp_path)
    index = tmp_path / "eval.npy"
    save_eval_index(build_eval_index(config.decontam), index)
    tools = shard_stage.build_tools(config, index)
    german = (
        "Der alte Hafen hat sich in den letzten Jahren langsam verändert, und viele Häuser sind neu. " * 4
    )
    doc = Document("en", "en.jsonl", 7, "de", german, None, {})
    (outcome,) = shard_stage._curate_batch([doc], tools)
    drop = outcome.drop
    assert isinstance(drop, shard_stage.Drop) and outcome.candidate is None
    assert (drop.stage, drop.reason, drop.lang, drop.text) == (
        "langid",
        "language_not_kept",
        "de",
        german.strip(),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        drop.reason = "changed"
    config.cleanup.enabled = True
    text = "今日は晴れ．明日も晴れ．週末は雨，その後は曇り．"
    outcome = shard_stage._Outcome()
    cleaned = shard_stage._clean_up(outcome, text, "ja", config)
    assert outcome.cleanup == shard_stage.Cleanup(True, 0, text, cleaned) and cleaned != text


def test_changed_config_refuses_to_resume(tmp_path):
    config = write_corpus(tmp_path)
    curate(config)
    config.filters.ja.min_chars = 100
    with pytest.raises(UserError, match="with a different curation config"):
        curate(config)


def test_parallel_workers_give_the_serial_result(tmp_path, curated_run):
    config = write_corpus(tmp_path)
    config.num_workers = 2
    curate(config)
    reference = Path(curated_run[0].output_dir)
    assert differing_outputs(Path(config.output_dir), reference, roots=(tmp_path, reference.parent)) == []


def test_corrupt_gzip_is_quarantined_and_the_run_goes_on(tmp_path):
    config = write_corpus(tmp_path)
    whole = (tmp_path / "ja_b.jsonl.gz").read_bytes()
    (tmp_path / "ja_b.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    result = curate(config)
    assert result.quarantined.get("corrupt_file") == 1
    assert result.num_kept > 0


def test_unpaired_surrogate_is_quarantined_and_the_run_goes_on(tmp_path):
    config = write_corpus(tmp_path)
    with (tmp_path / "ja_a.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"id": "bad-surrogate", "text": "壊れた文字\\ud800です"}\n')
    result = curate(config)
    assert result.quarantined.get("invalid_unicode") == 1
    assert result.num_kept > 0


def test_missing_inputs_and_zstd_give_user_errors(tmp_path, monkeypatch):
    config = write_corpus(tmp_path)
    config.input.sources[0].paths = [str(tmp_path / "nothing-*.jsonl")]
    with pytest.raises(UserError, match="matches no file"):
        curate(config)
    (tmp_path / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    config.input.sources[0].paths = [str(tmp_path / "x.jsonl.zst")]
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(UserError, match="pip install zstandard"):
        curate(config)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return train_tiny_spm(tmp_path_factory.mktemp("spm"))


def train_tiny_spm(root: Path) -> Path:
    """A ~1000-piece SentencePiece model of the sample sentences, as `root/tiny.model`."""
    import sentencepiece as spm

    (root / "train.txt").write_text("\n".join(JA + EN), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "train.txt"),
        model_prefix=str(root / "tiny"),
        vocab_size=1000,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.98,
        minloglevel=2,
    )
    return root / "tiny.model"


def test_megatron_datasets_read_back_with_megatron_core(curated_run, tiny_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from kumihimo.tokenizer.base import load_tokenizer

    config, _ = curated_run
    config = dataclasses.replace(config, num_workers=2)  # the multi-process encoder keeps input order
    result = build_datasets(config, tiny_tokenizer)
    tokenizer = load_tokenizer(tiny_tokenizer)
    out = Path(config.output_dir)
    for source in ("ja", "en"):
        texts = [r["text"] for r in read_records(out / "curated" / f"{source}.jsonl")]
        expected = [[tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eod_id] for t in texts]
        prefix = result.prefixes[source]
        assert prefix == (out / "datasets" / f"{source}_text_document").resolve()
        dataset = IndexedDataset(str(prefix))
        assert len(dataset) == len(expected)
        assert dataset.sequence_lengths.tolist() == [len(e) for e in expected]
        assert dataset.document_indices.tolist() == list(range(len(expected) + 1))
        for i, ids in enumerate(expected):
            assert dataset[i].tolist() == ids
        dtype, _, pointers, _ = read_index(prefix)
        assert dtype == np.uint16 and pointers[1] == 2 * len(expected[0])
        assert result.num_tokens[source] == sum(map(len, expected))
    pairs, identity = read_blend(result.blend_path)
    weights = dict(pairs)
    assert sum(weights.values()) == pytest.approx(1.0)
    ja_tokens, en_tokens = result.num_tokens["ja"], result.num_tokens["en"]
    # en has weight_multiplier 2.0
    assert weights[str(result.prefixes["en"])] == pytest.approx(2 * en_tokens / (ja_tokens + 2 * en_tokens))
    assert identity["sha256"] == tokenizer.sha256
    raw = yaml.safe_load(result.blend_path.read_text(encoding="utf-8"))
    assert raw["datasets"][0]["prefix"] == "datasets/ja_text_document"
    assert "relative to the directory of this file" in result.blend_path.read_text(encoding="utf-8")
    # a second call finds the finished datasets and leaves them alone
    before = (out / "datasets/ja_text_document.bin").stat().st_mtime_ns
    assert build_datasets(config, tiny_tokenizer).num_tokens == result.num_tokens
    assert (out / "datasets/ja_text_document.bin").stat().st_mtime_ns == before
    assert "## Tokens" in (out / "report.md").read_text(encoding="utf-8")
    assert "<h2>Tokens</h2>" in (out / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("append_eod", [True, False])
def test_encoded_batches_match_plain_encode_with_and_without_numpy_output(
    tiny_tokenizer, monkeypatch, add_bos, append_eod
):
    from kumihimo.data_prep import tokenize_stage
    from kumihimo.tokenizer.base import load_tokenizer

    tokenize_stage._init_tokenizer(str(tiny_tokenizer))
    tokenizer = load_tokenizer(tiny_tokenizer)
    texts = [JA[0], "", EN[1], "a"]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    expected = [
        [tokenizer.bos_id] * add_bos + tokenizer.encode(t) + [tokenizer.eod_id] * append_eod for t in texts
    ]
    for numpy_output in (True, False):  # sentencepiece's out_type="numpy", and the list path of older 0.2.x
        monkeypatch.setattr(tokenize_stage, "_NUMPY_OUTPUT", numpy_output)
        tokens, lengths = tokenize_stage._encode_lines((lines, add_bos, append_eod, "curated.jsonl"))
        assert lengths.tolist() == [len(e) for e in expected]
        assert tokens.tolist() == [i for e in expected for i in e]
    assert tokenize_stage._encode_lines(([], add_bos, append_eod, "curated.jsonl"))[0].size == 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kumihimo data")
    register(parser)
    return parser


def test_cli_run_and_help(tmp_path, tiny_tokenizer, capsys):
    config = write_corpus(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"input": {"sources": [{"name": s.name, "paths": s.paths} for s in config.input.sources]}}
        )
    )
    args = make_parser().parse_args(
        [
            "run",
            str(recipe),
            "--tokenizer",
            str(tiny_tokenizer),
            f"output_dir={tmp_path / 'cli_out'}",
            "num_workers=1",
        ]
    )
    assert args.handler(args) == 0
    assert (tmp_path / "cli_out/blend.yaml").is_file() and (tmp_path / "cli_out/report.md").is_file()
    for command in ("curate", "tokenize", "run"):
        with pytest.raises(SystemExit):
            make_parser().parse_args([command, "--help"])
        assert "examples:" in capsys.readouterr().out
    bad = make_parser().parse_args(["curate", str(recipe), "filters.ja.min_hiragana_ratio=2"])
    with pytest.raises(UserError, match="filters.ja.min_hiragana_ratio"):
        bad.handler(bad)


@pytest.mark.parametrize("name", ["quickstart.yaml", "llmjp-web.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.input.sources


def test_config_fields_are_documented():
    assert check_documented(DataPrepConfig) == []
    assert check_documented(SourceConfig) == []


def test_html_report_bars_scale_and_escape():
    from kumihimo.data_prep.report_html import bar_chart

    svg = bar_chart([("<b>&", 10), ("half", 5), ("zero", 0)])
    assert "&lt;b&gt;&amp;" in svg and "<b>" not in svg
    assert 'width="520"' in svg and 'width="260"' in svg and 'width="0"' in svg
    assert bar_chart([]) == "<p>(none)</p>"
