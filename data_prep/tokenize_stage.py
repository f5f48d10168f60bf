"""Curated JSONL -> one Megatron indexed dataset per source, plus blend.yaml.

Workers parse and encode batches of lines; the parent writes the results in input order, keeping
only a bounded window of batches in flight. A source is skipped on a re-run when its marker says the
same curated file was already encoded with the same tokenizer and settings. With `tokenize.tasks`, the
same encoders and writers write parts of the curated files, merged into the same bytes
(data_prep/tokenize_parts.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kumihimo.core.configtree import write_text_atomic
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.core.processes import RunLock
from kumihimo.core.progress import Progress
from kumihimo.data_prep import blend_groups
from kumihimo.data_prep.blend import BlendEntry, blend_weights, write_blend
from kumihimo.data_prep.blend_groups import DROPPED, SourceGrouping
from kumihimo.data_prep.config import DataPrepConfig, SourceConfig
from kumihimo.data_prep.executor import process_pool, run_ordered
from kumihimo.data_prep.indexed import IndexedDatasetWriter, token_dtype
from kumihimo.data_prep.layout import OUTPUT_FOLDERS
from kumihimo.data_prep.report import add_tokens
from kumihimo.tokenizer.base import Tokenizer, load_tokenizer
from kumihimo.tokenizer.hf import HFTokenizer

log = stage_logger("tokenize")

_TOKENIZER: Tokenizer | None = None
_NUMPY_OUTPUT = True  # cleared when the installed SentencePiece has no out_type="numpy"


@dataclass
class BuildResult:
    prefixes: dict[str, Path]  # source (or group: <source>_<score>_ge3.5) -> absolute Megatron prefix
    num_tokens: dict[str, int]
    num_documents: dict[str, int]
    blend_path: Path
    dtype: str


def dataset_prefix(out_dir: Path, source: str) -> Path:
    return out_dir / "datasets" / f"{source}_text_document"


def _init_tokenizer(path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(path)


def _curated_records(lines: list[str], path: str) -> list[dict[str, Any]]:
    """The records of curated lines; a line that is not a JSON object with a string "text" (a curated
    file edited or damaged by hand) is a one-line error naming the file, not a traceback."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) and isinstance(record.get("text"), str) else "no text"
        except (ValueError, RecursionError) as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:80]}"
        if problem is not None:
            raise UserError(
                f'{path}: a curated line is not a JSON object with a string "text" ({problem}): '
                f"{line[:60]!r}; curated files are written by `kumihimo data curate`: curate again"
            )
        records.append(record)
    return records


def _encode_lines(task: tuple[list[str], bool, bool, str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids, per-document lengths) for a batch of curated JSONL lines."""
    lines, add_bos, append_eod, path = task
    tokenizer = _TOKENIZER
    assert tokenizer is not None, "worker not initialised"
    encoded = encode_as_arrays(tokenizer, [record["text"] for record in _curated_records(lines, path)])
    return _flatten(encoded, tokenizer.bos_id if add_bos else None, tokenizer.eod_id if append_eod else None)


def encode_as_arrays(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text as an int32 array, on one thread (a Hugging Face tokenizer: with its own
    special tokens, as Megatron's preprocess_data encodes).

    SentencePiece >= 0.2.1 fills numpy buffers directly (out_type="numpy"), which spares building a
    Python int per token and reading it back (~20% of the encode time); the ids are the same as
    out_type=int. Older 0.2.x releases reject the type and get the list path.
    """
    global _NUMPY_OUTPUT
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_as_arrays(texts)
    if _NUMPY_OUTPUT:
        try:
            return tokenizer.sp.Encode(texts, out_type="numpy", num_threads=1)
        except ValueError:  # "unknown return_type=numpy"
            _NUMPY_OUTPUT = False
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(texts, num_threads=1)]


def _encode_grouped(task: tuple[list[str], bool, bool, SourceGrouping, str]) -> tuple[np.ndarray, ...]:
    """(flat token ids, per-document lengths, per-document group) for a batch of a grouped source;
    documents of groups left out (multiplier 0) are neither encoded nor returned."""
    lines, add_bos, append_eod, grouping, path = task
    tokenizer = _TOKENIZER
    assert tokenizer is not None, "worker not initialised"
    records = _curated_records(lines, path)
    groups = np.fromiter(map(grouping.group_of, records), dtype=np.int64, count=len(records))
    texts = [r["text"] for r, g in zip(records, groups) if g != DROPPED]
    encoded = encode_as_arrays(tokenizer, texts)
    bos, eod = tokenizer.bos_id if add_bos else None, tokenizer.eod_id if append_eod else None
    return (*_flatten(encoded, bos, eod), groups[groups != DROPPED], int(np.count_nonzero(groups == DROPPED)))


def _flatten(
    encoded: list[np.ndarray], bos_id: int | None, eod_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """One flat array [bos] + ids + [eod] per document, concatenated in one numpy call."""
    extra = (bos_id is not None) + (eod_id is not None)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + extra
    if not encoded:
        return np.empty(0, dtype=np.int32), lengths
    if not extra:
        return np.concatenate(encoded), lengths
    bos = [np.array([bos_id], dtype=np.int32)] if bos_id is not None else []
    eod = [np.array([eod_id], dtype=np.int32)] if eod_id is not None else []
    return np.concatenate([part for ids in encoded for part in (*bos, ids, *eod)]), lengths


def _batches(path: Path, size: int, span: tuple[int, int] | None = None) -> Iterator[list[str]]:
    """The non-blank lines of `path` in batches of `size`; with `span` (start, end): only the lines that
    start in that byte range (a part of a multi-task run; its ends are line starts)."""
    batch: list[str] = []
    start, end = span or (0, None)
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        for raw in handle:
            if end is not None and position >= end:
                break
            position += len(raw)
            line = raw.decode("utf-8")
            if line.strip():
                batch.append(line)
                if len(batch) >= size:
                    yield batch
                    batch = []
    if batch:
        yield batch


class GroupWriters:
    """One IndexedDatasetWriter per group of a source, opened at the group's first document."""

    def __init__(self, out: Path, grouping: SourceGrouping, vocab_size: int):
        self.out, self.grouping, self.vocab_size = out, grouping, vocab_size
        self.writers: dict[int, IndexedDatasetWriter] = {}
        self.num_left_out = 0
        if grouping.trivial:  # a plain source always has its dataset, even when empty
            self._writer(0)

    def _writer(self, group: int) -> IndexedDatasetWriter:
        if group not in self.writers:
            prefix = dataset_prefix(self.out, self.grouping.groups[group].name).resolve()
            self.writers[group] = IndexedDatasetWriter(prefix, self.vocab_size)
        return self.writers[group]

    def add(self, result: tuple) -> int:
        """Write one encoded batch; returns its number of documents (written or left out)."""
        if len(result) == 2:  # one group: the batch as it is
            tokens, lengths = result
            self._writer(0).add_documents(tokens, lengths)
            return len(lengths)
        tokens, lengths, groups, num_left_out = result
        self.num_left_out += num_left_out
        token_group = np.repeat(groups, lengths)
        for group in np.unique(groups).tolist():
            self._writer(group).add_documents(tokens[token_group == group], lengths[groups == group])
        return len(lengths) + num_left_out

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def counts(self) -> dict[str, list[int]]:
        """{group name: [num_tokens, num_documents]} of the groups written, in group order."""
        return {
            self.grouping.groups[g].name: [w.num_tokens, w.num_documents]
            for g, w in sorted(self.writers.items())
        }

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


@contextmanager
def encoders(tokenizer_path: str, num_workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Where `encode_source` encodes: in this process (None, for num_workers=1) or on a pool of
    num_workers processes that serves every file encoded inside the block (spawned once, not per file)."""
    if num_workers == 1:
        _init_tokenizer(tokenizer_path)
        yield None
        return
    with process_pool(num_workers, _init_tokenizer, (tokenizer_path,)) as pool:
        yield pool


def encode_source(
    curated: Path,
    writers: GroupWriters,
    config: DataPrepConfig,
    pool: ProcessPoolExecutor | None,
    num_workers: int,
    progress: Progress,
    span: tuple[int, int] | None = None,
) -> None:
    """Encode the curated file (or the lines starting in its byte `span`) into `writers`, in order, on
    `pool` (from `encoders`; None: in this process) with at most 2 x num_workers batches in flight."""
    flags = (config.tokenize.add_bos, config.tokenize.append_eod)
    grouping = writers.grouping
    batches = _batches(curated, config.tokenize.batch_documents, span)
    if grouping.trivial:
        work, tasks = _encode_lines, ((batch, *flags, str(curated)) for batch in batches)
    else:
        work, tasks = _encode_grouped, ((batch, *flags, grouping, str(curated)) for batch in batches)
    if pool is None:
        for task in tasks:
            progress.update(writers.add(work(task)))
        return
    for result in run_ordered(pool, work, tasks, window=2 * num_workers):
        progress.update(writers.add(result))


def source_marker(
    curated: Path, tokenizer: Tokenizer, config: DataPrepConfig, grouping: SourceGrouping
) -> dict[str, Any]:
    """What must match for a source's datasets to be reused: the curated file, tokenizer and settings."""
    stat = curated.stat()
    marker = {
        "curated_size": stat.st_size,
        "curated_mtime_ns": stat.st_mtime_ns,
        "tokenizer_sha256": tokenizer.sha256,
        "add_bos": config.tokenize.add_bos,
        "append_eod": config.tokenize.append_eod,
    }
    grouped = blend_groups.settings(grouping)
    if grouped is not None:  # absent for a plain source, so earlier markers still match
        marker["groups"] = grouped
    return marker


def marker_path(out: Path, source: str) -> Path:
    """The marker of a source whose datasets are complete: its settings and counts."""
    return out / "work" / "tokenize" / f"{source}.json"


def finished_marker(
    wanted: dict[str, Any], grouping: SourceGrouping, counts: dict[str, list[int]], num_left_out: int
) -> dict[str, Any]:
    """The marker written once a source's datasets are in place (by one writer or by merged parts)."""
    marker = {
        **wanted,
        "num_tokens": sum(c[0] for c in counts.values()),
        "num_documents": sum(c[1] for c in counts.values()),
    }
    if not grouping.trivial:
        marker.update(counts=counts, num_left_out=num_left_out)
    return marker


def curated_path(out: Path, source: str) -> Path:
    """The curated file of a source, refused in one line when curate has not written it."""
    curated = out / "curated" / f"{source}.jsonl"
    if not curated.is_file():
        raise UserError(f"{curated} does not exist; run `kumihimo data curate` with this config first")
    return curated


def finished_counts(out: Path, source: str, wanted: dict[str, Any]) -> dict[str, list[int]] | None:
    """{group: [num_tokens, num_documents]} when the source's datasets are complete and were made from
    `wanted` (the same curated file, tokenizer and settings); None when the source must be encoded."""
    marker = marker_path(out, source)
    done = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    counts = done.get("counts") or (
        {source: [done.get("num_tokens"), done.get("num_documents")]} if done else {}
    )
    complete = all(Path(f"{dataset_prefix(out, name)}.idx").is_file() for name in counts)
    # "groups" is compared even when absent from `wanted`: a source whose buckets were removed since
    # must be encoded as one prefix again, not matched against the earlier groups' counts
    same = {k: done.get(k) for k in (*wanted, "groups")} == {**wanted, "groups": wanted.get("groups")}
    return counts if same and counts and complete else None


def _tokenize_source(
    config: DataPrepConfig, tokenizer: Tokenizer, source: SourceConfig, out: Path
) -> list[BlendEntry]:
    """Encode one source (every group of it), or read the counts of an earlier identical run."""
    curated = curated_path(out, source.name)
    grouping = blend_groups.source_grouping(config, source.name)
    wanted = source_marker(curated, tokenizer, config, grouping)
    counts = finished_counts(out, source.name, wanted)
    if counts is not None:
        log.info(f"{source.name}: already done ({sum(c[0] for c in counts.values())} tokens)")
    else:
        writers = GroupWriters(out, grouping, tokenizer.vocab_size)
        try:
            num_workers = config.resolved_num_workers
            with (
                Progress(f"tokenize {source.name}", None, "documents") as progress,
                encoders(str(tokenizer.path), num_workers) as pool,
            ):
                encode_source(curated, writers, config, pool, num_workers, progress)
            writers.finish()
        except BaseException:
            writers.abort()
            raise
        counts = writers.counts()
        marker = finished_marker(wanted, grouping, counts, writers.num_left_out)
        write_text_atomic(marker_path(out, source.name), json.dumps(marker))
    entries = []
    for group in grouping.groups:
        if group.name in counts:
            num_tokens, num_documents = counts[group.name]
            entries.append(
                BlendEntry(
                    source.name,
                    dataset_prefix(out, group.name).resolve(),
                    num_tokens,
                    num_documents,
                    source.weight_multiplier * group.multiplier,
                    name=group.name,
                    bucket=group.bucket,
                    rehydration_weight=group.rehydration_weight,
                )
            )
    return entries


def _without_add_bos(config: DataPrepConfig, tokenizer: HFTokenizer) -> DataPrepConfig:
    """A Hugging Face tokenizer adds its own special tokens (its template decides BOS), as Megatron's
    preprocess_data with HuggingFaceTokenizer does; tokenize.add_bos would double it, so it is off."""
    if config.tokenize.add_bos:
        log.info(
            f"note: {tokenizer.path} is a Hugging Face tokenizer; its own template "
            f"{'starts documents with BOS' if tokenizer.adds_bos else 'adds no BOS'}, so tokenize.add_bos "
            "is not applied (as Megatron's preprocess_data with HuggingFaceTokenizer)"
        )
    return dataclasses.replace(config, tokenize=dataclasses.replace(config.tokenize, add_bos=False))


def build_datasets(config: DataPrepConfig, tokenizer_path: str | Path) -> BuildResult:
    """Every source with one writer in this process (num_workers encoders); tokenize.tasks is run by
    `kumihimo data tokenize` (tokenize_parts.tokenize), not here."""
    if config.tokenize.tasks is not None:
        log.info(
            f"note: tokenize.tasks={config.tokenize.tasks} is not applied by build_datasets, which "
            "writes in this process; `kumihimo data tokenize` (tokenize_parts.tokenize) runs the tasks"
        )
    with RunLock(config.output_dir, "tokenize", OUTPUT_FOLDERS):  # one live run; clears a killed one's debris
        return build_datasets_unlocked(config, tokenizer_path)


def checked_settings(config: DataPrepConfig, tokenizer_path: str | Path) -> tuple[DataPrepConfig, Tokenizer]:
    """(config as the encoders apply it, tokenizer): add_bos off for a Hugging Face tokenizer, and a
    one-line error for add_bos with a model that has no BOS piece."""
    tokenizer = load_tokenizer(tokenizer_path)
    if isinstance(tokenizer, HFTokenizer):
        config = _without_add_bos(config, tokenizer)
    if config.tokenize.add_bos and tokenizer.bos_id is None:
        raise UserError(
            f"tokenize.add_bos=True but {tokenizer.path} has no <s> piece; "
            "set tokenize.add_bos=false or use a model with a BOS piece"
        )
    return config, tokenizer


def build_datasets_unlocked(config: DataPrepConfig, tokenizer_path: str | Path) -> BuildResult:
    """`build_datasets` for a caller that holds the output folder's RunLock (a multi-task run's merge:
    every source is complete by then, so this reads their counts and writes blend.yaml and the report)."""
    out = Path(config.output_dir)
    config, tokenizer = checked_settings(config, tokenizer_path)
    entries: list[BlendEntry] = []
    for source in config.input.sources:
        entries += _tokenize_source(config, tokenizer, source, out)
    blend_path = out / "blend.yaml"
    write_blend(blend_path, entries, tokenizer.identity())
    weights = blend_weights(entries)
    add_tokens(
        out,
        {
            e.key: {
                "prefix": str(e.prefix),
                "num_tokens": e.num_tokens,
                "num_documents": e.num_documents,
                "weight": w,
                **e.extra(),
            }
            for e, w in zip(entries, weights)
        },
    )
    return BuildResult(
        prefixes={e.key: e.prefix for e in entries},
        num_tokens={e.key: e.num_tokens for e in entries},
        num_documents={e.key: e.num_documents for e in entries},
        blend_path=blend_path,
        dtype=token_dtype(tokenizer.vocab_size).name,
    )
