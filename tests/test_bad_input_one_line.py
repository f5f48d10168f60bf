"""Issue 23: a bad record never stops a stage, and what a user can get wrong is a one-line error, not
a traceback (deeply nested JSON, a damaged curated line, ...)."""

from __future__ import annotations

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
