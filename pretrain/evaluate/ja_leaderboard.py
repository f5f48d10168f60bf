"""lm-evaluation-harness's `japanese_leaderboard` group (lm-eval 0.4), rendered and scored as it does.

Each preset is one task of the group: the same description, prompt, choice rendering, target delimiter,
process_docs, few-shot split, few-shot draw and metric as the task YAML shipped in lm-eval
(lm_eval/tasks/japanese_leaderboard/). The data is read from local files laid out as the Hugging Face
hub serves each dataset, under one root folder:

    <root>/<dataset>/<config>/<split>-00000-of-00001.parquet    (or <split>/*.parquet, <split>.jsonl)

e.g. <root>/Rakuten/JGLUE/JCommonsenseQA/validation-00000-of-00001.parquet. Nothing is downloaded.

Few-shot examples are drawn as lm-eval's ContextSampler draws them: one `random.Random(seed)` per task
(seed 1234, the harness's default `fewshot_random_seed`), sampling `num_fewshot` documents of the
few-shot split for each evaluated document in order, so document i gets the same examples as in a
single-process harness run (also with a limit, which keeps the first documents).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kumihimo.core.errors import UserError
from kumihimo.pretrain.evaluate.tasks import Example, Task, TaskSpec

LM_EVAL_VERSION = "0.4"
DESCRIPTION = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
)
MAX_GEN_TOKS = 256  # lm-eval's HFLM default max_gen_toks (the YAMLs do not set one)
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def _jcqa_text(doc: dict) -> str:
    listed = "".join(f"- {choice}\n" for choice in doc["choices"])
    return (
        f"### 指示：\n出力は以下から選択してください：\n{listed}\n### 入力：\n{doc['question']}\n\n### 応答："
    )


def _jnli_text(doc: dict) -> str:
    return (
        "### 指示：\n与えられた前提と仮説の関係を回答してください。\n\n出力は以下から選択してください：\n"
        f"含意\n矛盾\n中立\n\n### 入力：\n前提：{doc['sentence1']}\n仮説：{doc['sentence2']}\n\n### 応答："
    )


def _marc_text(doc: dict) -> str:
    return (
        "### 指示：\n以下の製品レビューを、ポジティブまたはネガティブの感情クラスのいずれかに分類してください。"
        f"\n\n### 入力：\n{doc['sentence']}\n\n### 応答："
    )


def _extract_text(context: str, question: str) -> str:
    return (
        "### 指示：\n与えられた文脈から、質問に対する答えを抜き出してください。\n\n"
        f"### 入力：\n文脈：{context}\n質問：{question}\n\n### 応答："
    )


def _jsquad_text(doc: dict) -> str:
    return _extract_text(doc["context"].split("[SEP]")[-1].strip(), doc["question"])


def _jaqket_text(doc: dict) -> str:
    return _extract_text("\n".join(doc["ctxs"]["text"]), doc["question"])


def _mgsm_text(doc: dict) -> str:
    question = str(doc["question"]).replace("問題：", "")
    return f"### 指示：\n与えられた問題に対して、ステップごとに答えを導き出してください。\n\n### 入力：\n{question}\n\n### 応答："


def _xlsum_text(doc: dict) -> str:
    return f"### 指示：\n与えられたニュース記事を要約してください。\n\n### 入力：\nニュース記事：{doc['text']}\n\n### 応答："


def _with_choices(doc: dict) -> dict:  # ja_leaderboard_jcommonsenseqa.process_docs
    return {**doc, "choices": [doc[f"choice{i}"] for i in range(5)]}


def _xwinograd_docs(doc: dict) -> dict:  # ja_leaderboard_xwinograd.process_docs
    return {
        **doc,
        "label": int(doc["answer"]) - 1,
        "choices": [doc["sentence1"].strip(), doc["sentence2"].strip()],
    }


def _label_index(names: list[str]) -> Callable[[dict], dict]:
    """JGLUE's hub files hold ClassLabel indices; its GitHub files hold the names: accept both."""

    def convert(doc: dict) -> dict:
        label = doc["label"]
        return {**doc, "label": names.index(label) if isinstance(label, str) else int(label)}

    return convert


@dataclass(frozen=True)
class Preset:
    """One task of the group as its lm-eval YAML defines it."""

    name: str
    dataset: str  # dataset_path: the folder under the data root
    config: str | None  # dataset_name: a sub-folder, when set
    eval_split: str  # test_split if set, else validation_split (lm-eval's eval_docs)
    fewshot_split: str | None
    num_fewshot: int
    kind: Literal["multiple_choice", "generation"]
    text: Callable[[dict], str]
    metric: Literal["acc", "exact_match", "mgsm_acc", "rouge2"] = "acc"
    target: Callable[[dict], str] | None = None  # generation: the solved answer of a few-shot example
    choices: Callable[[dict], list[str]] | None = None
    process: Callable[[dict], dict] = lambda doc: doc
    description: str = DESCRIPTION
    target_delimiter: str = "\n"
    fewshot_delimiter: str = "\n\n"
    stop: tuple[str, ...] = ("\n\n",)


_JGLUE = "Rakuten/JGLUE"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="ja_leaderboard_jaqket_v2",
            dataset="kumapo/JAQKET",
            config="v2.0",
            eval_split="validation",
            fewshot_split="train",
            num_fewshot=1,
            kind="generation",
            text=_jaqket_text,
            target=lambda doc: doc["answers"]["text"][0],
            metric="exact_match",
        ),
        Preset(
            name="ja_leaderboard_jcommonsenseqa",
            dataset=_JGLUE,
            config="JCommonsenseQA",
            eval_split="validation",
            fewshot_split="train",
            num_fewshot=3,
            kind="multiple_choice",
            text=_jcqa_text,
            choices=lambda doc: doc["choices"],
            process=_with_choices,
        ),
        Preset(
            name="ja_leaderboard_jnli",
            dataset=_JGLUE,
            config="JNLI",
            eval_split="validation",
            fewshot_split="train",
            num_fewshot=3,
            kind="multiple_choice",
            text=_jnli_text,
            choices=lambda doc: ["含意", "矛盾", "中立"],
            process=_label_index(["entailment", "contradiction", "neutral"]),
        ),
        Preset(
            name="ja_leaderboard_jsquad",
            dataset=_JGLUE,
            config="JSQuAD",
            eval_split="validation",
            fewshot_split="train",
            num_fewshot=2,
            kind="generation",
            text=_jsquad_text,
            target=lambda doc: doc["answers"]["text"][0],
            metric="exact_match",
        ),
        Preset(
            name="ja_leaderboard_marc_ja",
            dataset=_JGLUE,
            config="MARC-ja",
            eval_split="validation",
            fewshot_split="train",
            num_fewshot=3,
            kind="multiple_choice",
            text=_marc_text,
            choices=lambda doc: ["ポジティブ", "ネガティブ"],
            process=_label_index(["positive", "negative"]),
        ),
        Preset(
            name="ja_leaderboard_mgsm",
            dataset="juletxara/mgsm",
            config="ja",
            eval_split="test",
            fewshot_split="train",
            num_fewshot=5,
            kind="generation",
            text=_mgsm_text,
            target=lambda doc: str(doc["answer"]).replace("ステップごとの答え：", ""),
            metric="mgsm_acc",
        ),
        Preset(
            name="ja_leaderboard_xlsum",
            dataset="mkshing/xlsum_ja",
            config=None,
            eval_split="test",
            fewshot_split="train",
            num_fewshot=1,
            kind="generation",
            text=_xlsum_text,
            target=lambda doc: doc["summary"],
            metric="rouge2",
        ),
        Preset(
            name="ja_leaderboard_xwinograd",
            dataset="polm-stability/xwinograd-ja",
            config=None,
            eval_split="test",
            fewshot_split=None,
            num_fewshot=0,
            kind="multiple_choice",
            text=lambda doc: "",
            choices=lambda doc: doc["choices"],
            process=_xwinograd_docs,
            description="",
            target_delimiter="",
        ),
    )
}
GROUP = "ja_leaderboard"  # lm-eval's group is `japanese_leaderboard`; both names are accepted


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def split_files(root: Path, preset: Preset, split: str) -> list[Path]:
    folder = root / preset.dataset / (preset.config or "")
    found = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"{split}/*.parquet"))
    for single in (f"{split}.parquet", f"{split}.jsonl", f"{split}.json"):
        if not found and (folder / single).is_file():
            found = [folder / single]
    if not found:
        raise UserError(
            f"{preset.name}: no {split} split under {folder} (looked for {split}-*.parquet, {split}/*.parquet, "
            f"{split}.jsonl); put the hub files of {preset.dataset} there (docs/evaluation.md)"
        )
    return found


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with path.open(encoding="utf-8") as handle:
        try:
            return [json.loads(line) for line in handle if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not JSON lines ({exc}); give one JSON object per line") from exc


def read_split(root: Path, preset: Preset, split: str) -> list[dict]:
    docs = [preset.process(doc) for path in split_files(root, preset, split) for doc in read_records(path)]
    if not docs:
        raise UserError(f"{preset.name}: the {split} split under {root / preset.dataset} holds no documents")
    return docs


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def fewshot_target(preset: Preset, doc: dict) -> str:
    if preset.kind == "multiple_choice":
        return preset.choices(doc)[doc["label"]]
    return preset.target(doc)


def contexts(
    preset: Preset, docs: list[dict], shots: list[dict], limit: int | None, seed: int = FEWSHOT_SEED
) -> list[str]:
    """The prompt of each of the first `limit` documents, as lm-eval's fewshot_context builds it."""
    rng = random.Random(seed)
    out = []
    for doc in docs[:limit]:
        parts = [preset.description]
        if preset.num_fewshot:
            for shot in rng.sample(shots, preset.num_fewshot):
                parts += [preset.text(shot), preset.target_delimiter, fewshot_target(preset, shot)]
                parts.append(preset.fewshot_delimiter)
        parts.append(preset.text(doc))
        out.append("".join(parts))
    return out


@dataclass
class Options:
    """What a suite entry may change; the defaults are the harness's."""

    limit: int | None = None
    max_new_tokens: int = MAX_GEN_TOKS
    fewshot_seed: int = FEWSHOT_SEED
    only: list[str] = field(default_factory=list)


def load_preset(root: Path, preset: Preset, options: Options) -> Task:
    docs = read_split(root, preset, preset.eval_split)
    shots = read_split(root, preset, preset.fewshot_split) if preset.num_fewshot else []
    prompts = contexts(preset, docs, shots, options.limit, options.fewshot_seed)
    spec = TaskSpec(
        name=preset.name,
        data=str(root / preset.dataset),
        kind=preset.kind,
        prompt="",
        target_delimiter=preset.target_delimiter,
        fewshot_delimiter=preset.fewshot_delimiter,
        num_fewshot=preset.num_fewshot,
        fewshot_seed=options.fewshot_seed,
        limit=options.limit,
        max_new_tokens=options.max_new_tokens,
        stop=list(preset.stop),
    )
    examples = []
    for index, (doc, context) in enumerate(zip(docs, prompts)):
        if preset.kind == "multiple_choice":
            examples.append(Example(index, context, preset.choices(doc), doc["label"], []))
        else:
            examples.append(Example(index, context, [], -1, [reference(preset, doc)]))
    grade = None if preset.kind == "multiple_choice" else _GRADERS[preset.metric]
    if preset.metric == "rouge2":
        MecabTokenizer()  # its packages are missing: say so now, not after the first evaluation's generations
    return Task(spec, root, examples, grade=grade)


def load_suite(
    root: str | Path, names: list[str] | None = None, options: Options | None = None
) -> list[Task]:
    """The group's tasks (or `names` of them) read from the data root."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"ja_leaderboard data root {str(root)!r} is not a folder; point it at the local hub files"
        )
    unknown = [n for n in names or [] if n not in PRESETS]
    if unknown:
        raise UserError(f"unknown ja_leaderboard task(s) {unknown}; choose from {', '.join(PRESETS)}")
    return [load_preset(root, PRESETS[n], options or Options()) for n in names or PRESETS]


# ---------------------------------------------------------------------------------------------
# Metrics (generation); multiple choice is acc, as scoring.py computes it
# ---------------------------------------------------------------------------------------------


def reference(preset: Preset, doc: dict) -> str:
    if preset.metric == "mgsm_acc":
        return str(doc["answer_number"])
    return preset.target(doc)


def _edge_whitespace(text: str) -> str:
    """exact_match's regexes_to_ignore ('^\\s+', '\\s+$'), applied in that order."""
    return re.sub(r"\s+$", "", re.sub(r"^\s+", "", text))


def exact_match(examples: list[Example], generated: list[str]) -> tuple[dict, list[dict]]:
    """The `whitespaces` filter (strip), then exact match against the first answer."""
    hits = [
        _edge_whitespace(g.strip()) == _edge_whitespace(e.answers[0]) for e, g in zip(examples, generated)
    ]
    return {"exact_match": sum(hits) / len(hits)}, [{"exact_match": h} for h in hits]


_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")


def mgsm_number(completion: str) -> int | None:
    """The last number of the completion, as an int (None: no whole number), as the MGSM task reads it."""
    matches = _NUMBER.findall(completion)
    if not matches:
        return None
    try:
        value = float(matches[-1].strip(".").replace(",", ""))
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def mgsm_acc(examples: list[Example], generated: list[str]) -> tuple[dict, list[dict]]:
    extracted = [mgsm_number(g) for g in generated]
    hits = [x is not None and x == float(e.answers[0]) for x, e in zip(extracted, examples)]
    return {"acc": sum(hits) / len(hits)}, [{"extracted": x, "acc": h} for x, h in zip(extracted, hits)]


class MecabTokenizer:
    """The XL-Sum task's tokenizer: emoji removed, neologdn-normalised, MeCab words (fugashi)."""

    _EMOJI = re.compile(
        "[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff\u2702-\u27b0]+"
    )

    def __init__(self) -> None:
        try:
            import emoji
            import neologdn
            from fugashi import Tagger
        except ModuleNotFoundError as exc:
            raise UserError(
                f"ja_leaderboard_xlsum's ROUGE-2 needs {exc.name} (as lm-eval's task does); pip install -e "
                "'.[eval]' from the checkout (or: pip install emoji neologdn 'fugashi[unidic-lite]' rouge_score), "
                "or leave the task out (a suite file's tasks: list)"
            ) from exc
        self.emoji, self.neologdn, self.tagger = emoji, neologdn, Tagger("-Owakati")

    def tokenize(self, text: str) -> list[str]:
        text = "".join("" if self.emoji.is_emoji(c) else c for c in text)
        text = " ".join(self.neologdn.normalize(self._EMOJI.sub("", text)).split())
        return self.tagger.parse(text).split()


def rouge2(examples: list[Example], generated: list[str]) -> tuple[dict, list[dict]]:
    """rouge_score's ROUGE-2 F-measure on MeCab words, the median of its bootstrap (BootstrapAggregator,
    1000 resamples) with numpy's generator seeded 1234 as lm-eval seeds it, without touching the
    caller's numpy state."""
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(rouge_types=["rouge2"], tokenizer=MecabTokenizer())
    scores = [scorer.score(e.answers[0], g.strip()) for e, g in zip(examples, generated)]
    state = np.random.get_state()
    try:
        np.random.seed(FEWSHOT_SEED)
        aggregator = scoring.BootstrapAggregator()
        for score in scores:
            aggregator.add_scores(score)
        value = aggregator.aggregate()["rouge2"].mid.fmeasure
    finally:
        np.random.set_state(state)
    return {"rouge2": float(value)}, [{"rouge2": s["rouge2"].fmeasure} for s in scores]


_GRADERS: dict[str, Callable[[list[Example], list[str]], tuple[dict, list[dict]]]] = {
    "exact_match": exact_match,
    "mgsm_acc": mgsm_acc,
    "rouge2": rouge2,
}


def describe_presets() -> list[dict[str, Any]]:
    """One row per task, for the docs table and `kumihimo eval --help`."""
    return [
        {
            "task": p.name,
            "dataset": p.dataset,
            "config": p.config,
            "split": p.eval_split,
            "shots": p.num_fewshot,
        }
        for p in PRESETS.values()
    ]
