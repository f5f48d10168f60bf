"""Task definitions: a YAML file pointing at a JSONL file the user supplies, rendered into prompts.

One task YAML describes one benchmark split:

    name: jcommonsenseqa
    format: jcommonsenseqa        # a preset (field names and prompt of the common file layout), optional
    data: jcommonsenseqa-v1.1-valid.jsonl    # relative to the YAML file
    fewshot_data: jcommonsenseqa-v1.1-train.jsonl
    num_fewshot: 3

Every preset field can be set or overridden in the YAML (`prompt`, `choices`, `label`, ...), so a file
in another layout needs no code. Nothing is downloaded. Few-shot examples are drawn per document from a
generator seeded by (fewshot_seed, document index), so a document gets the same prompt in every process,
under any data-parallel split, in the training loop and in `kumihimo eval`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kumihimo.core import configtree
from kumihimo.core.configtree import ConfigError, bad_value
from kumihimo.core.errors import UserError

# Field layouts and prompts of the common benchmark files (as their publishers distribute them).
PRESETS: dict[str, dict[str, Any]] = {
    # JGLUE JCommonsenseQA: {"q_id", "question", "choice0".."choice4", "label": int}
    "jcommonsenseqa": {
        "kind": "multiple_choice",
        "prompt": "質問: {question}\n答え:",
        "choices": ["choice0", "choice1", "choice2", "choice3", "choice4"],
        "label": "label",
    },
    # JGLUE JNLI: {"sentence1", "sentence2", "label": "entailment" | "contradiction" | "neutral"}
    "jnli": {
        "kind": "multiple_choice",
        "prompt": "前提: {sentence1}\n仮説: {sentence2}\n関係:",
        "fixed_choices": ["含意", "矛盾", "中立"],
        "label": "label",
        "label_values": ["entailment", "contradiction", "neutral"],
    },
    # JEMHopQA: {"qid", "type", "question", "answer", "derivations"}: short answers, exact match
    "jemhopqa": {"kind": "generation", "prompt": "質問: {question}\n答え:", "answer": "answer"},
    # HellaSwag: {"activity_label", "ctx", "endings": [4 strings], "label": "0".."3"}
    "hellaswag": {
        "kind": "multiple_choice",
        "prompt": "{activity_label}: {ctx}",
        "choices": ["endings"],
        "label": "label",
    },
    # ARC (Easy/Challenge): {"question", "choices": {"text": [...], "label": ["A",..]}, "answerKey"}
    "arc": {
        "kind": "multiple_choice",
        "prompt": "Question: {question}\nAnswer:",
        "choices": ["choices.text"],
        "label": "answerKey",
        "label_values_field": "choices.label",
    },
}


@dataclass(kw_only=True)
class TaskSpec:
    name: str
    """Task name used in logs, metrics keys (tasks/<name>/acc) and exported harness tasks."""
    data: str
    """JSONL file of the documents to score, one JSON object per line (relative to the YAML file)."""
    format: str | None = None
    """Preset of a common file layout: jcommonsenseqa, jnli, jemhopqa, hellaswag, arc; fields set here
    override the preset's."""
    kind: Literal["multiple_choice", "generation"] | None = None
    """multiple_choice: pick the choice with the highest log-likelihood; generation: greedy decoding
    compared to the answer by exact match."""
    prompt: str | None = None
    """Prompt template; {field} is replaced by the document's field (str.format syntax)."""
    choices: list[str] | None = None
    """Field paths of the choices: several fields (choice0, choice1, ...) or one field holding a list
    (endings, choices.text)."""
    fixed_choices: list[str] | None = None
    """The same choice strings for every document (e.g. JNLI's 含意/矛盾/中立)."""
    label: str | None = None
    """Field path of the gold answer of multiple choice: an index (int or digit string) or a value of
    label_values / label_values_field."""
    label_values: list[str] | None = None
    """Label strings in choice order, when the label is a name rather than an index."""
    label_values_field: str | None = None
    """Field path holding each document's label strings in choice order (ARC's choices.label)."""
    answer: str | None = None
    """Generation: field path of the gold answer (a string, or a list of accepted strings)."""
    fewshot_data: str | None = None
    """JSONL file to draw few-shot examples from (default: the other documents of `data`)."""
    num_fewshot: int = 0
    """Solved examples put before each question."""
    fewshot_seed: int = 1234
    """Seed of the few-shot draw (with the document index), fixed so every run sees the same prompts."""
    limit: int | None = None
    """Score only the first N documents (null: all)."""
    target_delimiter: str = " "
    """Text between the prompt and a choice or answer."""
    fewshot_delimiter: str = "\n\n"
    """Text between few-shot examples and before the question."""
    max_new_tokens: int = 32
    """Generation: most tokens generated per question."""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    """Generation: the answer ends before the first of these strings."""

    def validate(self) -> None:
        if self.format is not None and self.format not in PRESETS:
            raise bad_value(
                f"{self.name}.format",
                self.format,
                "is not a known format",
                f"choose one of {', '.join(PRESETS)}",
            )
        if self.kind is None:
            raise bad_value(
                f"{self.name}.kind",
                None,
                "is not set",
                "set kind: multiple_choice or generation, or a format",
            )
        if self.prompt is None:
            raise bad_value(
                f"{self.name}.prompt",
                None,
                "is not set",
                "write a template such as '質問: {question}\\n答え:'",
            )
        if self.kind == "multiple_choice":
            if (self.choices is None) == (self.fixed_choices is None):
                raise bad_value(
                    f"{self.name}.choices",
                    self.choices,
                    "must be given (or fixed_choices, not both)",
                    "list the choice fields, e.g. [choice0, choice1] or [endings]",
                )
            if self.label is None:
                raise bad_value(f"{self.name}.label", None, "is not set", "name the field holding the answer")
        elif self.answer is None:
            raise bad_value(f"{self.name}.answer", None, "is not set", "name the field holding the answer")
        if self.num_fewshot < 0 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError(
                f"{self.name}: num_fewshot={self.num_fewshot}, max_new_tokens={self.max_new_tokens}, "
                f"limit={self.limit} must be >= 0, >= 1 and >= 1 (or null); fix the task file"
            )


@dataclass
class Example:
    """One rendered document: the context (few-shot block + prompt) and what is scored after it."""

    index: int
    context: str
    choices: list[str]  # multiple choice: the continuations; generation: empty
    gold: int  # multiple choice: index into choices; generation: -1
    answers: list[str]  # generation: accepted answers; multiple choice: empty


@dataclass
class Task:
    spec: TaskSpec
    source: Path  # the YAML file (a data root for a suite's task)
    examples: list[Example]
    grade: Callable[[list[Example], list[str]], tuple[dict, list[dict]]] | None = None
    """Generation metric other than exact match (a suite's): (examples, generations) -> (metrics,
    per-document fields)."""

    @property
    def name(self) -> str:
        return self.spec.name


def _get(doc: dict, path: str, where: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(
                f"{where} has no field {path!r} (fields: {', '.join(doc)}); fix the task's field names"
            )
        value = value[part]
    return value


class _Fields(dict):
    def __init__(self, doc: dict, where: str):
        super().__init__(doc)
        self.where = where

    def __missing__(self, key: str):
        raise UserError(f"{self.where} has no field {key!r} used by the prompt (fields: {', '.join(self)})")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"task data {str(path)!r} does not exist; point data: at your JSONL file")
    docs = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
                raise UserError(
                    f"{path}:{number} is not JSON ({exc or type(exc).__name__}); the file must hold one "
                    "object per line"
                ) from exc
            if not isinstance(doc, dict):
                raise UserError(
                    f"{path}:{number} is not a JSON object; the file must hold one object per line"
                )
            docs.append(doc)
    if not docs:
        raise UserError(f"task data {path} holds no documents")
    return docs


def load_spec(path: str | Path) -> TaskSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {str(path)!r} does not exist; pass a task YAML (see docs/evaluation.md)")
    data = configtree.read_yaml(path)
    preset = PRESETS.get(data.get("format"), {}) if isinstance(data.get("format"), str) else {}
    spec = configtree.from_dict(TaskSpec, {**preset, **data})
    spec.validate()
    return spec


class Renderer:
    """Turns documents into prompts, choices and answers as the spec says."""

    def __init__(self, spec: TaskSpec, where: str):
        self.spec = spec
        self.where = where

    def prompt(self, doc: dict, number: int) -> str:
        try:
            return self.spec.prompt.format_map(_Fields(doc, f"{self.where} document {number}"))
        except (IndexError, ValueError, AttributeError) as exc:
            raise UserError(
                f"{self.spec.name}.prompt cannot be filled from document {number} ({exc}); fix the template"
            ) from exc

    def choices(self, doc: dict, number: int) -> list[str]:
        if self.spec.fixed_choices is not None:
            return list(self.spec.fixed_choices)
        where = f"{self.where} document {number}"
        values = [_get(doc, path, where) for path in self.spec.choices]
        if len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        if len(values) < 2 or not all(isinstance(v, str) for v in values):
            raise UserError(f"{where}: choices {self.spec.choices} give {values!r}; need two or more strings")
        return values

    def gold(self, doc: dict, number: int, num_choices: int) -> int:
        where = f"{self.where} document {number}"
        value = _get(doc, self.spec.label, where)
        names = self.spec.label_values
        if self.spec.label_values_field is not None:
            names = _get(doc, self.spec.label_values_field, where)
        if names is not None and str(value) in [str(n) for n in names]:
            index = [str(n) for n in names].index(str(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            index = value
        elif isinstance(value, float) and value.is_integer():  # 1.0 from a float column
            index = int(value)
        elif isinstance(value, str) and value.strip().isdigit():
            index = int(value)
        else:
            raise UserError(
                f"{where}: label {value!r} is not a choice index (0 to {num_choices - 1})"
                + (f" nor one of label_values {names}" if names is not None else "")
                + "; set label_values to the labels in choice order"
            )
        if not 0 <= index < num_choices:
            raise UserError(f"{where}: label {value!r} -> index {index} but there are {num_choices} choices")
        return index

    def answers(self, doc: dict, number: int) -> list[str]:
        value = _get(doc, self.spec.answer, f"{self.where} document {number}")
        values = value if isinstance(value, list) else [value]
        return [str(v) for v in values]

    def target(self, doc: dict, number: int) -> str:
        """The solved answer of a few-shot example."""
        if self.spec.kind == "generation":
            return self.answers(doc, number)[0]
        choices = self.choices(doc, number)
        return choices[self.gold(doc, number, len(choices))]


def render(spec: TaskSpec, docs: list[dict], shots: list[dict] | None, where: str) -> list[Example]:
    """Examples of `docs` with `num_fewshot` solved examples from `shots` (None: the other docs)."""
    renderer = Renderer(spec, where)
    pool = docs if shots is None else shots
    available = len(pool) - (1 if shots is None else 0)
    if spec.num_fewshot > available:
        raise UserError(
            f"task {spec.name}: num_fewshot={spec.num_fewshot} but only {available} documents can serve as "
            "examples; lower num_fewshot or give fewshot_data"
        )
    count = len(docs) if spec.limit is None else min(spec.limit, len(docs))
    examples = []
    for index in range(count):
        doc = docs[index]
        rng = random.Random(f"{spec.fewshot_seed}:{index}")
        candidates = [i for i in range(len(pool)) if shots is not None or i != index]
        chosen = rng.sample(candidates, spec.num_fewshot)
        blocks = [
            renderer.prompt(pool[i], i) + spec.target_delimiter + renderer.target(pool[i], i) for i in chosen
        ]
        context = spec.fewshot_delimiter.join([*blocks, renderer.prompt(doc, index)])
        if spec.kind == "generation":
            examples.append(Example(index, context, [], -1, renderer.answers(doc, index)))
        else:
            choices = renderer.choices(doc, index)
            examples.append(Example(index, context, choices, renderer.gold(doc, index, len(choices)), []))
    return examples


def load_task(path: str | Path) -> Task:
    path = Path(path)
    spec = load_spec(path)
    data = path.parent / spec.data
    shots = read_jsonl(path.parent / spec.fewshot_data) if spec.fewshot_data else None
    return Task(spec, path, render(spec, read_jsonl(data), shots, str(data)))


def task_paths(entries: list[str]) -> list[Path]:
    """Task YAML files, with folders standing for the YAML files in them (sorted)."""
    files = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not found:
                raise UserError(f"task folder {entry} holds no task YAML files; add some or pass files")
            files += found
        else:
            files.append(path)
    return files


def load_tasks(paths: list[str | Path]) -> list[Task]:
    tasks = [load_task(p) for p in paths]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"task name(s) {', '.join(duplicates)} appear twice; give every task its own name")
    return tasks
