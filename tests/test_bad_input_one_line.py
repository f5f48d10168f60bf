"""Issue 23: a bad record never stops a stage, and what a user can get wrong is a one-line error, not
a traceback (deeply nested JSON, a damaged curated line, ...)."""

from __future__ import annotations

import os

import pytest

from kumihimo.core.errors import UserError
from kumihimo.core.records import read_records

DEEP = '{"text": "x", "meta": ' + "[" * 200_000 + "]" * 200_000 + "}\n"


def test_json_nested_200000_deep_is_quarantined_and_curate_goes_on(tmp_path):
    from kumihimo.data_prep.pipeline import curate
    from tests.test_data_prep_pipeline import write_corpus

    config = write_corpus(tmp_path)
    with (tmp_path / "ja_a.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(DEEP)
    result = curate(config)
    assert result.quarantined.get("malformed_json") == 2  # the corpus's own broken line, and this one
    assert result.num_kept > 0
    quarantined = (tmp_path / "out" / "quarantine" / "ja.jsonl").read_text(encoding="utf-8")
    assert "nested too deep to read" in quarantined


def test_json_nested_too_deep_is_one_line_for_strict_readers(tmp_path):
    """`tokenizer train`/`tokenizer eval` read records strictly: a one-line error naming file:line."""
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "ok"}\n' + DEEP, encoding="utf-8")
    with pytest.raises(UserError, match=r"eval\.jsonl:2 is not valid JSON \(nested too deep to read\)"):
        list(read_records(str(path)))


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"text": "ok"\n', "JSONDecodeError"),
        ('["a list"]\n', "no text"),
        ('{"id": 3}\n', "no text"),
        (DEEP, "RecursionError"),
    ],
)
def test_a_malformed_curated_line_is_one_line_at_tokenize(line, problem):
    from kumihimo.data_prep.tokenize_stage import _curated_records

    with pytest.raises(
        UserError, match=rf"curated/ja.jsonl: a curated line is not .*\({problem}.*curate again"
    ):
        _curated_records(['{"text": "fine"}\n', line], "curated/ja.jsonl")


# ---- messages that named the wrong thing -----------------------------------------------------------


def test_eval_iters_zero_is_named_as_such():
    from kumihimo.core.configtree import ConfigError
    from kumihimo.pretrain.config import ScheduleConfig

    with pytest.raises(ConfigError, match=r"^schedule.eval_iters=0 must be >= 1 .*schedule.eval_interval=0$"):
        ScheduleConfig(eval_iters=0).validate()
    with pytest.raises(ConfigError, match=r"^schedule.eval_interval=-1 must be >= 0"):
        ScheduleConfig(eval_interval=-1).validate()


def test_an_integral_float_label_is_an_index_and_others_name_the_choices(tmp_path):
    from kumihimo.pretrain.evaluate.tasks import load_task
    from tests.test_evaluate import _digit_task

    docs = [{"q": "1", "c": ["2", "3"], "y": 1.0}, {"q": "1", "c": ["2", "3"], "y": 0.5}]
    task = load_task(_digit_task(tmp_path, "multiple_choice", docs[:1]))
    assert task.examples[0].gold == 1
    with pytest.raises(UserError, match=r"label 0.5 is not a choice index \(0 to 1\); set label_values"):
        load_task(_digit_task(tmp_path, "multiple_choice", docs[1:]))


# ---- blend.yaml against what it describes ----------------------------------------------------------


def _dataset(root, name: str, docs: list[list[int]], vocab_size: int = 1000):
    import numpy as np

    from kumihimo.data_prep.blend import BlendEntry
    from kumihimo.data_prep.indexed import IndexedDatasetWriter

    writer = IndexedDatasetWriter(root / "datasets" / f"{name}_text_document", vocab_size)
    writer.add_documents(
        np.array([t for d in docs for t in d], dtype=np.int64), np.array([len(d) for d in docs])
    )
    writer.finish()
    tokens = sum(map(len, docs))
    return BlendEntry(name, (root / "datasets" / f"{name}_text_document").resolve(), tokens, len(docs), 1.0)


@pytest.fixture
def blend(tmp_path):
    from kumihimo.data_prep.blend import write_blend

    entries = [_dataset(tmp_path, "ja", [[5, 6, 7], [8, 9]]), _dataset(tmp_path, "en", [[1, 2], [3]])]
    write_blend(tmp_path / "blend.yaml", entries, {"sha256": "x"})
    return tmp_path / "blend.yaml"


@pytest.mark.parametrize("weight", ["0", "-0.5", ".nan", "'heavy'"])
def test_blend_weights_that_are_not_positive_numbers_are_one_line(blend, weight):
    """Megatron failed an assertion (traceback) on these; an inline data.blend refused them already."""
    from kumihimo.data_prep.blend import read_blend

    text = blend.read_text(encoding="utf-8")
    first = text.index("weight: ")
    end = text.index("\n", first)
    blend.write_text(text[:first] + f"weight: {weight}" + text[end:], encoding="utf-8")
    with pytest.raises(
        UserError, match=r"datasets\[0\] \(datasets/ja_text_document\) has weight .* positive number"
    ):
        read_blend(blend)


def _check(blend, vocab_size=1000):
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.data_inspection import check_counts_and_ids, check_datasets, read_blend

    config = TrainConfig()
    config.data.blend_file = str(blend)
    prefixes, _, _ = read_blend(config.data)
    check_counts_and_ids(config.data, check_datasets(prefixes, str(blend)), vocab_size)


def test_blend_counts_are_compared_with_the_files_and_ids_with_the_vocabulary(blend, tmp_path):
    _check(blend)
    _dataset(tmp_path, "en", [[1, 2, 3, 4], [5], [6]])  # a consistent pair of other data, same path
    with pytest.raises(UserError, match=r"says .*en_text_document has 3 tokens but its files hold 6") as err:
        _check(blend)
    assert "has 2 documents but its files hold 3" in str(err.value)
    _dataset(tmp_path, "en", [[1, 2], [3]])
    with pytest.raises(
        UserError, match=r"ja_text_document.bin holds token id 9, but the tokenizer has 9 ids"
    ):
        _check(blend, vocab_size=9)


# ---- output checks before the work -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_eval_output_is_checked_before_any_scoring(tmp_path, capsys, monkeypatch, kind):
    """`eval --output` that is a file or cannot be written was found only after all scoring."""
    from kumihimo.cli import main
    from kumihimo.pretrain.evaluate import cli as eval_cli
    from tests.eval_tasks import write_tasks

    write_tasks(tmp_path / "tasks")
    output = tmp_path / "results.json"
    output.write_text("{}")
    if kind == "unwritable":
        output = "/proc/kumihimo-eval"
    monkeypatch.setattr(eval_cli, "_run_megatron", lambda *a: pytest.fail("scored before checking --output"))
    code = main(["eval", str(tmp_path), "--tasks", str(tmp_path / "tasks"), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and "--output=" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args", [["--nproc", "0"], ["--tp", "0"]])
def test_quickstart_refuses_a_zero_process_count_at_once(tmp_path, capsys, args):
    from kumihimo.cli import main

    assert main(["quickstart", "--workdir", str(tmp_path / "qs"), *args]) == 2
    err = capsys.readouterr().err
    assert "must both be >= 1" in err and err.count("\n") == 1 and not (tmp_path / "qs").exists()


# ---- a truncated checkpoint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truncated_run(tmp_path_factory):
    """A trained run (tests/test_pretrain_integrity.py's 2 steps) whose newest checkpoint has a
    .distcp file cut short."""
    import shutil

    from kumihimo.pretrain import checkpoint_format
    from tests.test_convert_to_hf import train_spm
    from tests.test_pretrain_integrity import train, write_dataset

    work = tmp_path_factory.mktemp("truncated")
    tokenizer = train_spm(work / "tok", seed=1)
    write_dataset(work / "data" / "web", seed=0)
    overrides = (
        f"data.blend=[{{prefix: {work / 'data' / 'web'}, weight: 1.0}}]",
        "data.mock=false",
        "data.split=90,10,0",
        f"data.tokenizer={tokenizer}",
    )
    proc = train(work / "run", *overrides, "schedule.train_iters=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = work / "run" / "ckpt"
    assert checkpoint_format.read_latest(root) == 2
    shutil.copytree(root, work / "intact")
    for shard in checkpoint_format.iteration_dir(root, 2).glob("*.distcp"):
        os.truncate(shard, 4096)  # every file: to-hf reads the weights only, resume reads all
    return work, overrides


@pytest.mark.slow
def test_a_truncated_distcp_is_one_line_at_resume_and_at_to_hf(truncated_run):
    """An EOFError traceback at resume; `convert to-hf` said "damaged ()" with an empty reason."""
    from kumihimo.pretrain.convert.to_hf import convert_to_hf
    from tests.test_pretrain_integrity import last_line, train

    work, overrides = truncated_run
    proc = train(work / "run", *overrides, "schedule.train_iters=3")
    line = last_line(proc.stderr)
    assert proc.returncode == 2 and "cannot be read (a .distcp file ends early: truncated" in line, (
        proc.stderr[-3000:]
    )
    assert "Traceback" not in proc.stderr
    with pytest.raises(UserError, match=r"is incomplete or damaged \([^)]"):  # was "damaged ()"
        convert_to_hf(work / "run" / "ckpt", work / "hf")


def test_deep_records_in_eval_and_decontamination_files(tmp_path):
    """The siblings: `kumihimo eval` task data and decontam.eval_paths read JSON lines too."""
    import json

    from kumihimo.data_prep.decontam import _strings
    from kumihimo.pretrain.evaluate.tasks import load_task
    from tests.test_evaluate import _digit_task

    task = _digit_task(tmp_path, "multiple_choice", [{"q": "1", "c": ["2", "3"], "y": 1}])
    (tmp_path / "d.jsonl").write_text(DEEP)
    with pytest.raises(UserError, match=r"d.jsonl:1 is not JSON \(.*recursion"):
        load_task(task)
    nested = json.loads("[" * 1200 + '"deep"' + "]" * 1200)  # parses, but recursing over it overflows
    assert list(_strings([{"a": ["x", nested], "b": "y"}])) == ["x", "deep", "y"]
