"""Score-bucket blends and rehydration: one prefix per (source, bucket, weight class), weights as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_data_prep_pipeline import JA, read_records, train_tiny_spm, write_corpus

from kumihimo.core.configtree import ConfigError, load
from kumihimo.core.errors import UserError
from kumihimo.data_prep.blend import read_blend
from kumihimo.data_prep.config import (
    DataPrepConfig,
    RehydrationRow,
    ScoreBucketsConfig,
    SourceConfig,
    load_config,
)
from kumihimo.data_prep.indexed import read_index
from kumihimo.data_prep.pipeline import build_datasets, curate
from kumihimo.data_prep.report import KeptStats, build_report, render_markdown
from kumihimo.data_prep.report_html import render_html, score_bars
from kumihimo.tokenizer.base import Tokenizer, load_tokenizer

# scores on and around the edges 0.3, 0.5, 0.8 (a score equal to an edge belongs to the bucket above)
SCORES = [0.0, 0.1, 0.29999, 0.3, 0.31, 0.45, 0.5, 0.5, 0.6, 0.79, 0.8, 0.95, 1.0, 0.2, 0.55, 0.85]
EDGES = [0.3, 0.5, 0.8]
BUCKET_OF = {"edu_lt0.3": (-1, 0.3), "edu_ge0.3": (0.3, 0.5), "edu_ge0.5": (0.5, 0.8), "edu_ge0.8": (0.8, 9)}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tiny_spm(tmp_path_factory.mktemp("spm"))


def scored_run(root: Path, num_workers: int = 1) -> DataPrepConfig:
    """An output_dir holding curated JSONL (what tokenize reads) with known scores, for sources ja and en."""
    config = DataPrepConfig(output_dir=str(root), num_workers=num_workers)
    config.input.sources = [
        SourceConfig(name="ja", paths=["unused"]),
        SourceConfig(name="en", paths=["unused"], weight_multiplier=2.0),
    ]
    (root / "curated").mkdir(parents=True, exist_ok=True)
    ja = [
        {"id": f"ja{i}", "text": JA[i % len(JA)][: 50 + 37 * i], "attributes": {"score_edu": score}}
        for i, score in enumerate(SCORES)
    ]
    en = [{"id": "en0", "text": "A short English line about the harbour.", "attributes": {}}]
    for name, records in (("ja", ja), ("en", en)):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (root / "curated" / f"{name}.jsonl").write_text(lines, encoding="utf-8")
    return config


def document_lengths(prefix: str | Path) -> list[int]:
    return read_index(prefix)[1].tolist()


def expected_length(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text)) + 2  # <s> ... </s>


def test_bucket_prefixes_partition_the_source_and_weights_add_up(tmp_path, tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    plain = build_datasets(scored_run(tmp_path / "plain"), tokenizer_path)
    config = scored_run(tmp_path / "bucketed")
    config.tokenize.buckets = [
        ScoreBucketsConfig(source="ja", score="edu", edges=EDGES, multipliers=[1.0, 1.0, 1.0, 1.0])
    ]
    bucketed = build_datasets(config, tokenizer_path)
    names = [k for k in bucketed.num_tokens if k.startswith("ja_")]
    assert names == ["ja_edu_lt0.3", "ja_edu_ge0.3", "ja_edu_ge0.5", "ja_edu_ge0.8"]
    # every document in exactly one bucket, in input order, with its own tokens
    records = read_records(tmp_path / "bucketed/curated/ja.jsonl")
    for name in names:
        low, high = BUCKET_OF[name.removeprefix("ja_")]
        members = [r for r in records if low <= r["attributes"]["score_edu"] < high]
        assert document_lengths(bucketed.prefixes[name]) == [
            expected_length(tokenizer, r["text"]) for r in members
        ]
    assert sum(bucketed.num_tokens[n] for n in names) == plain.num_tokens["ja"]
    assert sum(bucketed.num_documents[n] for n in names) == plain.num_documents["ja"] == len(SCORES)
    # multipliers of 1: the buckets share out exactly the weight the unbucketed source had
    plain_weights = dict(zip(plain.prefixes, [w for _, w in read_blend(plain.blend_path)[0]]))
    weights = {Path(p).name.removesuffix("_text_document"): w for p, w in read_blend(bucketed.blend_path)[0]}
    assert sum(weights[n] for n in names) == pytest.approx(plain_weights["ja"], abs=1e-9)
    assert weights["en"] == pytest.approx(plain_weights["en"], abs=1e-9)
    rows = yaml.safe_load(bucketed.blend_path.read_text())["datasets"]
    assert {r["bucket"] for r in rows if r["source"] == "ja"} == {
        "edu < 0.3",
        "0.3 <= edu < 0.5",
        "0.5 <= edu < 0.8",
        "edu >= 0.8",
    }
    assert "bucket" not in next(r for r in rows if r["source"] == "en")  # a plain source's row is as before


def test_bucket_multipliers_scale_weights_and_zero_leaves_a_bucket_out(tmp_path, tokenizer_path):
    config = scored_run(tmp_path / "run", num_workers=2)
    multipliers = [0.0, 1.0, 2.0, 4.0]
    config.tokenize.buckets = [
        ScoreBucketsConfig(source="ja", score="edu", edges=EDGES, multipliers=multipliers)
    ]
    result = build_datasets(config, tokenizer_path)
    assert "ja_edu_lt0.3" not in result.prefixes
    assert not (tmp_path / "run/datasets/ja_edu_lt0.3_text_document.bin").exists()
    marker = json.loads((tmp_path / "run/work/tokenize/ja.json").read_text())
    assert marker["num_left_out"] == sum(s < 0.3 for s in SCORES)
    # weight = tokens x source multiplier x bucket multiplier, normalised over every prefix
    raw = {
        "ja_edu_ge0.3": result.num_tokens["ja_edu_ge0.3"] * 1.0,
        "ja_edu_ge0.5": result.num_tokens["ja_edu_ge0.5"] * 2.0,
        "ja_edu_ge0.8": result.num_tokens["ja_edu_ge0.8"] * 4.0,
        "en": result.num_tokens["en"] * 2.0,
    }
    blend = {Path(p).name.removesuffix("_text_document"): w for p, w in read_blend(result.blend_path)[0]}
    assert blend == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()}, abs=1e-9)
    # two workers write what one does (deterministic), and an unchanged re-run is skipped
    one = scored_run(tmp_path / "one", num_workers=1)
    one.tokenize.buckets = config.tokenize.buckets
    single = build_datasets(one, tokenizer_path)
    for name, prefix in result.prefixes.items():
        for suffix in (".bin", ".idx"):
            assert (
                Path(f"{prefix}{suffix}").read_bytes()
                == Path(f"{single.prefixes[name]}{suffix}").read_bytes()
            )
    mtime = Path(f"{result.prefixes['ja_edu_ge0.8']}.bin").stat().st_mtime_ns
    assert build_datasets(config, tokenizer_path).num_tokens == result.num_tokens
    assert Path(f"{result.prefixes['ja_edu_ge0.8']}.bin").stat().st_mtime_ns == mtime


def test_removing_the_buckets_tokenizes_the_source_as_one_prefix_again(tmp_path, tokenizer_path):
    config = scored_run(tmp_path / "run")
    config.tokenize.buckets = [
        ScoreBucketsConfig(source="ja", score="edu", edges=EDGES, multipliers=[1.0, 1.0, 1.0, 1.0])
    ]
    build_datasets(config, tokenizer_path)
    config.tokenize.buckets = []
    result = build_datasets(config, tokenizer_path)
    assert sorted(result.prefixes) == ["en", "ja"]
    assert result.num_documents["ja"] == len(SCORES)
    sources = [Path(p).name for p, _ in read_blend(result.blend_path)[0]]
    assert sources == ["ja_text_document", "en_text_document"]


def test_trainer_reads_a_bucketed_blend(tmp_path, tokenizer_path):
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.data_inspection import check_datasets_and_tokenizer

    config = scored_run(tmp_path / "run")
    config.tokenize.buckets = [
        ScoreBucketsConfig(source="ja", score="edu", edges=EDGES, multipliers=[0, 1, 1, 3])
    ]
    result = build_datasets(config, tokenizer_path)
    train = load(
        TrainConfig,
        "tiny-cpu",
        # a few documents per bucket: no validation split (an empty one is refused, issue 30)
        [
            "data.mock=false",
            f"data.blend_file={result.blend_path}",
            f"data.tokenizer={tokenizer_path}",
            "data.split=100,0,0",
            "schedule.eval_interval=0",
        ],
    )
    prefixes, weights, infos = check_datasets_and_tokenizer(train.data)
    assert sorted(prefixes) == sorted(str(p) for p in result.prefixes.values())
    assert sum(weights) == pytest.approx(1.0) and len(infos) == len(prefixes)


def test_missing_score_names_the_fix(tmp_path, tokenizer_path):
    config = scored_run(tmp_path / "run")
    config.tokenize.buckets = [ScoreBucketsConfig(source="en", score="edu", edges=[0.5], multipliers=[1, 1])]
    with pytest.raises(UserError, match="'en0' of source 'en' has no score_edu.*score.scorers"):
        build_datasets(config, tokenizer_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "tokenize.buckets=[{source: ja, score: edu, edges: [0.5, 0.3], multipliers: [1, 1, 1]}]",
            "not increasing",
        ),
        (
            "tokenize.buckets=[{source: ja, score: edu, edges: [0.5], multipliers: [1]}]",
            "has 1 entries for 2",
        ),
        (
            "tokenize.buckets=[{source: xx, score: edu, edges: [0.5], multipliers: [1, 1]}]",
            "not one of input",
        ),
        ("tokenize.buckets=[{source: ja, score: edu, edges: [0.5], multipliers: [0, 0]}]", "only zeros"),
        ("tokenize.rehydration.table=[{min_size: 2, weight: 1}]", "does not start at min_size 1"),
        (  # both would be written as the prefix ja_edu_ge0.123457
            "tokenize.buckets=[{source: ja, score: edu, edges: [0.1234567, 0.1234568], multipliers: [1, 1, 1]}]",
            "same prefix name",
        ),
        (
            "tokenize.rehydration={enabled: true, table: [{min_size: 1, weight: 1}, {min_size: 2, weight: 1.0000001}]}",
            "same prefix name",
        ),
        (
            "tokenize.rehydration={enabled: true, table: [{min_size: 1, weight: 0}, {min_size: 5, weight: 0}]}",
            "is 0 in every row",
        ),
    ],
)
def test_bad_bucket_and_rehydration_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", [override])


def test_a_score_that_is_not_a_number_names_the_fix(tmp_path, tokenizer_path):
    config = scored_run(tmp_path / "run")
    path = tmp_path / "run/curated/ja.jsonl"
    path.write_text(path.read_text().replace('"score_edu": 0.95', '"score_edu": NaN'))
    config.tokenize.buckets = [
        ScoreBucketsConfig(source="ja", score="edu", edges=EDGES, multipliers=[1, 1, 1, 1])
    ]
    with pytest.raises(UserError, match="'ja11' of source 'ja' has no score_edu"):
        build_datasets(config, tokenizer_path)


def write_clustered_corpus(root: Path) -> DataPrepConfig:
    """write_corpus (ja0 + ja-exact: a cluster of 2; ja1 + ja-near + en-copy-of-ja1: 3) plus a third
    source holding 5 whitespace variants of ja2 (exact copies once normalised): ja2's cluster is 6."""
    config = write_corpus(root)
    copies = [{"id": f"copy{i}", "text": JA[2].replace("。", "。" + " " * (i + 1), 1)} for i in range(5)]
    (root / "copies.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in copies))
    config.input.sources.append(SourceConfig(name="copies", paths=[str(root / "copies.jsonl")]))
    config.dedup.record_cluster_size = True
    return config


CLUSTER_SIZES = {"ja0": 2, "ja1": 3, "ja2": 6, "ja-pii": 1, "ja-moji": 1, "en0": 1, "en-pii": 1}


def test_rehydration_counts_are_exact_on_known_clusters(tmp_path, tokenizer_path):
    config = write_clustered_corpus(tmp_path / "corpus")
    result = curate(config)
    kept = [
        r
        for s in ("ja", "en", "copies")
        for r in read_records(Path(config.output_dir) / f"curated/{s}.jsonl")
    ]
    assert {r["id"]: r["attributes"]["cluster_size"] for r in kept} == CLUSTER_SIZES
    assert result.num_kept == len(CLUSTER_SIZES)
    config.tokenize.rehydration.enabled = True
    config.tokenize.rehydration.table = [
        RehydrationRow(min_size=1, weight=1.0),
        RehydrationRow(min_size=2, weight=2.0),
        RehydrationRow(min_size=3, weight=1.0),  # same weight as size 1: the same prefix
        RehydrationRow(min_size=5, weight=3.0),  # the cap: every cluster of 5 or more
    ]
    built = build_datasets(config, tokenizer_path)
    assert built.num_documents == {"ja_rh1": 3, "ja_rh2": 1, "ja_rh3": 1, "en_rh1": 2}  # copies: all removed
    tokenizer = load_tokenizer(tokenizer_path)
    texts = {r["id"]: r["text"] for r in kept}
    assert document_lengths(built.prefixes["ja_rh3"]) == [expected_length(tokenizer, texts["ja2"])]
    assert document_lengths(built.prefixes["ja_rh2"]) == [expected_length(tokenizer, texts["ja0"])]
    blend = {Path(p).name.removesuffix("_text_document"): w for p, w in read_blend(built.blend_path)[0]}
    raw = {
        "ja_rh1": built.num_tokens["ja_rh1"] * 1.0,
        "ja_rh2": built.num_tokens["ja_rh2"] * 2.0,
        "ja_rh3": built.num_tokens["ja_rh3"] * 3.0,
        "en_rh1": built.num_tokens["en_rh1"] * 2.0,  # the en source's weight_multiplier
    }
    assert blend == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()}, abs=1e-9)
    markdown = (Path(config.output_dir) / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| ja_rh3 |"))
    assert row.endswith(f"| {built.num_tokens['ja_rh3']} | {blend['ja_rh3']:.4f} | 3 |")
    assert "<th>multiplier</th>" in (Path(config.output_dir) / "report.html").read_text()


def test_rehydration_without_recorded_cluster_sizes_names_the_fix(tmp_path, tokenizer_path):
    config = scored_run(tmp_path / "run")
    config.tokenize.rehydration.enabled = True
    with pytest.raises(UserError, match="dedup.record_cluster_size=true"):
        build_datasets(config, tokenizer_path)


def test_report_shows_a_score_histogram_per_source():
    stats = KeptStats()
    for i, score in enumerate(SCORES):
        stats.add({"text": "x" * 10, "lang": "ja", "attributes": {"score_edu": score}, "id": str(i)})
    summary = stats.to_json()
    histogram = summary["scores"]["score_edu"]["histogram"]
    assert sum(histogram.values()) == len(SCORES)
    assert histogram["6"] == 2  # 0.3 and 0.31 are in [0.30, 0.35); 0.29999 is not
    bars = score_bars(histogram)
    assert len(bars) == 21 and sum(n for _, n in bars) == len(SCORES)
    assert bars[0][0] == "0 - 0.05" and bars[-1][0] == "1 - 1.05"
    config = DataPrepConfig()
    config.input.sources = [SourceConfig(name="ja", paths=["unused"])]
    merged = {"ja": {"kept": summary, "dedup_dropped": {}, "examples": {}}}
    shard = {
        "num_input": len(SCORES),
        "quarantined": {},
        "dropped": {},
        "dropped_languages": {},
        "num_repaired": 0,
        "num_boilerplate_lines_removed": 0,
        "examples": {},
    }
    report = build_report(config, [shard], ["ja"], merged)
    markdown = render_markdown(report)
    assert "ja score_edu (documents per score range):" in markdown
    assert "0.3 - 0.35        2 " in markdown
    html = render_html(report, ())
    assert "ja: score_edu (kept documents per score range)</h2><svg" in html.replace("\n", "")
    assert ">0.3 - 0.35</text>" in html
