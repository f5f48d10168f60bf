"""Scoring tasks with any model that can score token rows: log-likelihood of choices, greedy answers.

Tokenisation follows lm-evaluation-harness (0.4) so both give the same numbers: whitespace at the end
of the context moves to the front of the continuation; the context is encoded alone and the whole
text (context + continuation) is encoded too, with the tokenizer's usual special tokens (a leading
<s> for kumihimo's tokenizers); the continuation is the whole encoding after the context's length.
The model sees context tokens + those continuation tokens, left-truncated to its sequence length.
With SentencePiece this matters: "答え:" + " 東京" encoded whole gives "▁東京" where encoding
" 東京" alone would give a dummy-prefix "▁" piece plus a space piece.

acc picks the choice with the highest summed log-probability; acc_norm divides it by the choice's
length in characters (lm-evaluation-harness's acc_norm). Generation decodes greedily, cuts the text
at the first stop string and compares it, stripped, with each accepted answer (exact match).

A backend implements `score_rows(rows) -> [(logprobs, argmaxes)]`: for each row (tokens, positions,
targets) the log-probability of targets[j] at input position positions[j], and the most likely token
there. The Megatron backend runs that across its pipeline and tensor-parallel ranks; HF runs it on one
module; `select_scores` is the arithmetic both share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kumihimo.pretrain.evaluate.tasks import Example, Task


class Codec(Protocol):
    """Text <-> ids as the model's tokenizer does it."""

    def encode(self, text: str) -> list[int]:
        """With the tokenizer's usual special tokens (a leading BOS for ours)."""

    def encode_plain(self, text: str) -> list[int]:
        """Without special tokens."""

    def decode(self, ids: list[int]) -> str: ...

    prefix_id: int  # conditions an empty context (BOS, else EOS), as lm-evaluation-harness does
    eos_id: int | None


@dataclass
class Row:
    tokens: list[int]
    positions: list[int]
    targets: list[int]


class Backend(Protocol):
    max_length: int

    def score_rows(self, rows: list[Row]) -> list[tuple[list[float], list[int]]]: ...


def select_scores(
    logits: torch.Tensor, rows: list[Row], vocab_size: int
) -> list[tuple[list[float], list[int]]]:
    """logits [b, s, >=vocab] -> per row (log-probs of its targets, argmax tokens) at its positions."""
    picked = torch.cat([logits[i, row.positions] for i, row in enumerate(rows)])
    return score_picked(picked, rows, vocab_size)


def score_picked(
    picked: torch.Tensor, rows: list[Row], vocab_size: int
) -> list[tuple[list[float], list[int]]]:
    """picked [sum of positions, >=vocab]: the logits at every row's positions, rows in order.
    Columns beyond vocab_size (Megatron's vocabulary padding) are dropped before the softmax, so a
    Megatron model and its Hugging Face export (which has no padding rows) give the same numbers."""
    logprobs = torch.log_softmax(picked[:, :vocab_size].float(), dim=-1)
    targets = torch.tensor([t for row in rows for t in row.targets], dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    best = logprobs.argmax(dim=-1).tolist()
    out, start = [], 0
    for row in rows:
        end = start + len(row.positions)
        out.append((chosen[start:end], best[start:end]))
        start = end
    return out


def encode_pair(codec: Codec, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split of (context, continuation) into token lists."""
    if context == "":
        cont = codec.encode_plain(continuation)
        if cont and cont[0] == codec.prefix_id:
            return cont[:1], cont[1:]
        return [codec.prefix_id], cont
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    context_ids = codec.encode(context)
    whole = codec.encode(context + continuation)
    return context_ids, whole[len(context_ids) :]


def loglikelihood_row(context_ids: list[int], continuation_ids: list[int], max_length: int) -> Row:
    if not continuation_ids:
        raise ValueError("empty continuation")  # internal: choices are non-empty strings
    full = (context_ids + continuation_ids)[-(max_length + 1) :]
    tokens = full[:-1]
    start = len(tokens) - len(continuation_ids)
    return Row(tokens, list(range(start, len(tokens))), list(continuation_ids))


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    complete: bool = True
    seconds: float = 0.0


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score_multiple_choice(
    task: Task, backend: Backend, codec: Codec, batch_size: int, should_stop: Callable[[], bool]
) -> TaskResult:
    started = time.perf_counter()
    requests = []  # (example, choice index, Row)
    for example in task.examples:
        for c, choice in enumerate(example.choices):
            ctx, cont = encode_pair(codec, example.context, task.spec.target_delimiter + choice)
            requests.append((example, c, loglikelihood_row(ctx, cont, backend.max_length)))
    scores: list[tuple[list[float], list[int]]] = []
    for batch in _batches(requests, batch_size):
        if should_stop():
            return TaskResult(task.name, {}, complete=False, seconds=time.perf_counter() - started)
        scores += backend.score_rows([row for _, _, row in batch])
    per_example: dict[int, list[tuple[float, bool]]] = {}
    for (example, _c, row), (logprobs, argmaxes) in zip(requests, scores):
        per_example.setdefault(example.index, []).append((sum(logprobs), argmaxes == row.targets))
    samples, correct, correct_norm = [], 0, 0
    for example in task.examples:
        lls = [ll for ll, _ in per_example[example.index]]
        normed = [ll / max(len(choice), 1) for ll, choice in zip(lls, example.choices)]
        pred, pred_norm = _argmax(lls), _argmax(normed)
        correct += pred == example.gold
        correct_norm += pred_norm == example.gold
        samples.append(
            {
                "index": example.index,
                "gold": example.gold,
                "loglikelihoods": lls,
                "is_greedy": [g for _, g in per_example[example.index]],
                "pred": pred,
                "pred_norm": pred_norm,
            }
        )
    n = len(task.examples)
    metrics = {"acc": correct / n, "acc_norm": correct_norm / n, "num_examples": n}
    return TaskResult(task.name, metrics, samples, seconds=time.perf_counter() - started)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def greedy_generate(
    examples: list[Example], backend: Backend, codec: Codec, max_new_tokens: int, stop: list[str]
) -> list[str]:
    """Greedy continuations of each context, cut at the first stop string (one batch)."""
    prompts = [codec.encode(e.context) if e.context else [codec.prefix_id] for e in examples]
    generated: list[list[int]] = [[] for _ in examples]
    done = [False] * len(examples)
    for _ in range(max_new_tokens):
        active = [i for i, d in enumerate(done) if not d]
        if not active:
            break
        rows = []
        for i in active:
            tokens = (prompts[i] + generated[i])[-backend.max_length :]
            rows.append(Row(tokens, [len(tokens) - 1], [0]))
        for i, (_, argmaxes) in zip(active, backend.score_rows(rows)):
            token = argmaxes[0]
            if codec.eos_id is not None and token == codec.eos_id:
                done[i] = True
                continue
            generated[i].append(token)
            text = codec.decode(generated[i])
            if any(s and s in text for s in stop):
                done[i] = True
    texts = []
    for ids in generated:
        text = codec.decode(ids)
        for s in stop:
            if s:
                text = text.split(s, 1)[0]
        texts.append(text)
    return texts


def score_generation(
    task: Task, backend: Backend, codec: Codec, batch_size: int, should_stop: Callable[[], bool]
) -> TaskResult:
    started = time.perf_counter()
    samples, correct = [], 0
    for batch in _batches(task.examples, batch_size):
        if should_stop():
            return TaskResult(task.name, {}, complete=False, seconds=time.perf_counter() - started)
        texts = greedy_generate(batch, backend, codec, task.spec.max_new_tokens, task.spec.stop)
        for example, text in zip(batch, texts):
            hit = text.strip() in [a.strip() for a in example.answers]
            correct += hit
            samples.append(
                {"index": example.index, "answers": example.answers, "generated": text, "exact_match": hit}
            )
    n = len(task.examples)
    metrics = {"exact_match": correct / n}
    if task.grade is not None:
        metrics, per_document = task.grade(task.examples, [s["generated"] for s in samples])
        for sample, fields in zip(samples, per_document):
            del sample["exact_match"]
            sample.update(fields)
    metrics = {**metrics, "num_examples": n}
    return TaskResult(task.name, metrics, samples, seconds=time.perf_counter() - started)


def score_task(
    task: Task,
    backend: Backend,
    codec: Codec,
    batch_size: int = 8,
    should_stop: Callable[[], bool] = lambda: False,
) -> TaskResult:
    """Score one task; stops between batches (complete=False) as soon as should_stop() says so."""
    score = score_generation if task.spec.kind == "generation" else score_multiple_choice
    return score(task, backend, codec, batch_size, should_stop)
