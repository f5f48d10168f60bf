"""llm-jp-eval's jaster format: its instruction prompt, few-shot layout, answer extraction and scoring.

llm-jp-eval preprocesses each dataset into one JSON file per split,
`<root>/{train,dev,test}/<dataset>.json`, holding `instruction`, `output_length`, `metrics`
(e.g. ["exact_match"], ["char_f1"]) and `samples` ([{"input", "output"}]). A preset of this family
reads such a file from a local root (nothing is downloaded) and evaluates it as llm-jp-eval does:

* prompt (llm-jp-eval's default template, PROMPTS.md):
  "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
  "\\n\\n### 指示:\\n{instruction}", then per few-shot example "\\n\\n### 入力:\\n{input}\\n\\n### 応答:\\n{output}",
  then "\\n\\n### 入力:\\n{input}\\n\\n### 応答:\\n";
* few-shot examples: the first `num_fewshot` samples of the train split's file (the same for every
  question; llm-jp-eval's default is 4);
* greedy generation of at most `output_length` tokens; the answer is the text before the first blank
  line, NFKC-normalised and stripped, the gold output NFKC-normalised;
* exact_match: equal strings; char_f1: fuzzywuzzy's token_sort_ratio / 100 (with python-Levenshtein's
  ratio): both strings lower-cased with every non-word character made a space, split on whitespace,
  the tokens sorted and joined with one space, then round(100 x (1 - Indel distance / total length)),
  100 for equal strings and 0 when one is empty.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from kumihimo.core.errors import UserError
from kumihimo.pretrain.evaluate.tasks import Example, Task, TaskSpec

SYSTEM = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
)
DEFAULT_FEWSHOT = 4
# jaster datasets whose files this family reads (any other file of the same layout works too)
DATASETS = (
    "jamp",
    "janli",
    "jcommonsenseqa",
    "jemhopqa",
    "jnli",
    "jsem",
    "jsick",
    "jsquad",
    "jsts",
    "niilc",
    "chabsa",
    "mawps",
    "jmmlu",
)


def prompt(instruction: str, shots: list[dict], question: str) -> str:
    parts = [SYSTEM, f"\n\n### 指示:\n{instruction}"]
    parts += [f"\n\n### 入力:\n{s['input']}\n\n### 応答:\n{s['output']}" for s in shots]
    parts.append(f"\n\n### 入力:\n{question}\n\n### 応答:\n")
    return "".join(parts)


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def extract_answer(generated: str) -> str:
    return normalize(generated.split("\n\n")[0]).strip()


_NON_WORD = re.compile(r"(?ui)\W")


def _sorted_tokens(text: str) -> str:
    text = "".join(c for c in text if not 128 <= ord(c) < 256)  # fuzzywuzzy's force_ascii
    return " ".join(sorted(_NON_WORD.sub(" ", text).lower().strip().split())).strip()


def _lcs(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def char_f1(predicted: str, gold: str) -> float:
    a, b = _sorted_tokens(predicted), _sorted_tokens(gold)
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return round(100 * 2 * _lcs(a, b) / (len(a) + len(b))) / 100


def grade(metrics: list[str]):
    def score(examples: list[Example], generated: list[str]) -> tuple[dict, list[dict]]:
        rows = []
        for example, text in zip(examples, generated):
            predicted, gold = extract_answer(text), normalize(example.answers[0])
            row = {"answer": predicted}
            if "exact_match" in metrics:
                row["exact_match"] = float(predicted == gold)
            if "char_f1" in metrics:
                row["char_f1"] = char_f1(predicted, gold)
            rows.append(row)
        names = [m for m in ("exact_match", "char_f1") if m in metrics] or ["exact_match"]
        return {m: sum(r.get(m, 0.0) for r in rows) / len(rows) for m in names}, rows

    return score


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"jaster file {path} does not exist; run llm-jp-eval's preprocessing and point at its output"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not JSON ({exc}); pass llm-jp-eval's preprocessed file") from exc
    if not isinstance(data, dict) or not {"instruction", "samples"} <= set(data):
        raise UserError(f"{path} has no instruction/samples; pass llm-jp-eval's preprocessed file")
    return data


def load_dataset(
    root: str | Path,
    name: str,
    split: str = "test",
    num_fewshot: int = DEFAULT_FEWSHOT,
    limit: int | None = None,
) -> Task:
    root = Path(root)
    data = _read(root / split / f"{name}.json")
    shots = _read(root / "train" / f"{name}.json")["samples"][:num_fewshot] if num_fewshot else []
    metrics = [m for m in data.get("metrics", ["exact_match"]) if m in ("exact_match", "char_f1")]
    spec = TaskSpec(
        name=f"jaster_{name}",
        data=str(root / split / f"{name}.json"),
        kind="generation",
        prompt="",
        num_fewshot=num_fewshot,
        limit=limit,
        max_new_tokens=int(data.get("output_length", 32)),
        stop=["\n\n"],
    )
    samples = data["samples"][:limit]
    examples = [
        Example(i, prompt(data["instruction"], shots, s["input"]), [], -1, [s["output"]])
        for i, s in enumerate(samples)
    ]
    return Task(spec, root, examples, grade=grade(metrics or ["exact_match"]))


def load_suite(root: str | Path, names: list[str] | None = None, limit: int | None = None) -> list[Task]:
    """Every jaster file in <root>/test (or `names` of them)."""
    root = Path(root)
    found = sorted(p.stem for p in (root / "test").glob("*.json")) if names is None else names
    if not found:
        raise UserError(f"no jaster files in {root / 'test'}; point at llm-jp-eval's evaluation/ folder")
    return [load_dataset(root, n, limit=limit) for n in found]
