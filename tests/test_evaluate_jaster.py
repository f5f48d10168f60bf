"""The jaster presets read llm-jp-eval's preprocessed files and score as llm-jp-eval does."""

from __future__ import annotations

import json
import random

import pytest

from kumihimo.core.errors import UserError
from kumihimo.pretrain.evaluate import jaster
from kumihimo.pretrain.evaluate.suites import load_entries
from kumihimo.pretrain.evaluate.tasks import Example


def _write(root, name, split, samples, metrics=("exact_match",)):
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "instruction": "前提と仮説の関係を含意、矛盾、中立の中から回答してください。",
        "output_length": 3,
        "metrics": list(metrics),
        "few_shots": [],
        "samples": samples,
    }
    (folder / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


SAMPLES = [
    {"input": "前提：犬が走る。\n仮説：動物が動く。", "output": "含意"},
    {"input": "前提：雨が降る。\n仮説：晴れている。", "output": "矛盾"},
    {"input": "前提：人が歩く。\n仮説：人は学生だ。", "output": "中立"},
]


def test_prompt_fewshots_and_metrics(tmp_path):
    _write(tmp_path, "jnli", "train", SAMPLES[::-1])
    _write(tmp_path, "jnli", "test", SAMPLES, metrics=("exact_match", "char_f1"))
    (task,) = load_entries([f"jaster={tmp_path}"])
    assert task.name == "jaster_jnli" and task.spec.max_new_tokens == 3 and task.spec.stop == ["\n\n"]
    assert task.examples[0].context == (
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
        "\n\n### 指示:\n前提と仮説の関係を含意、矛盾、中立の中から回答してください。"
        "\n\n### 入力:\n前提：人が歩く。\n仮説：人は学生だ。\n\n### 応答:\n中立"  # first train samples
        "\n\n### 入力:\n前提：雨が降る。\n仮説：晴れている。\n\n### 応答:\n矛盾"
        "\n\n### 入力:\n前提：犬が走る。\n仮説：動物が動く。\n\n### 応答:\n含意"
        "\n\n### 入力:\n前提：犬が走る。\n仮説：動物が動く。\n\n### 応答:\n"
    )
    # answer: up to the first blank line, NFKC, stripped; full-width "含意" stays, half-width kana widen
    metrics, rows = task.grade(task.examples, [" 含意\n\n矛盾", "矛盾です", "ﾁｭｳﾘﾂ"])
    assert [r["answer"] for r in rows] == ["含意", "矛盾です", "チュウリツ"]
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert rows[1]["char_f1"] == 0.67  # 2 x LCS 2 / (4 + 2) = 0.666.. -> round(66.7) / 100
    assert metrics == {"exact_match": 1 / 3, "char_f1": pytest.approx((1 + 0.67 + 0) / 3)}


def test_char_f1_is_fuzzywuzzy_token_sort_ratio():
    """With fuzzywuzzy + python-Levenshtein installed (llm-jp-eval's scorer), equal on random strings."""
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz", reason="fuzzywuzzy is not installed")
    rng = random.Random(0)
    alphabet = "東京都大阪府の は、。 ABCabc123-!　ｱｲé"
    for _ in range(2000):
        a, b = ("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(2))
        assert jaster.char_f1(a, b) == fuzz.token_sort_ratio(a, b) / 100, (a, b)


def test_char_f1_by_hand():
    assert jaster.char_f1("東京 都", "都 東京") == 1.0  # tokens sorted before comparing
    assert jaster.char_f1("", "東京") == 0.0 and jaster.char_f1("", "") == 1.0
    assert jaster.char_f1("東京。", "東京") == 1.0  # punctuation becomes a space, then stripped


def test_only_exact_match_when_the_file_says_so(tmp_path):
    _write(tmp_path, "jnli", "train", SAMPLES)
    _write(tmp_path, "jnli", "test", SAMPLES)
    task = jaster.load_dataset(tmp_path, "jnli", num_fewshot=0, limit=2)
    assert len(task.examples) == 2 and "### 応答:\n含意" not in task.examples[0].context
    metrics, _ = task.grade([Example(0, "", [], -1, ["含意"])], ["含意"])
    assert metrics == {"exact_match": 1.0}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="no jaster files"):
        load_entries([f"jaster={tmp_path}"])
    with pytest.raises(UserError, match="jsquad.json does not exist"):
        load_entries([f"jaster_jsquad={tmp_path}"])
