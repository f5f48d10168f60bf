"""Curated JSONL -> one Megatron indexed dataset per source, plus blend.yaml.

Workers parse and encode batches of lines; the parent writes the results in input order, keeping
only a bounded window of batches in flight. A source is skipped on a re-run when its marker says the
same curated file was already encoded with the same tokenizer and settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kumihimo.core.configtree import write_text_atomic
from kumihimo.core.errors import UserError
from kumihimo.core.processes import RunLock
from kumihimo.core.progress import Progress, say
from kumihimo.data_prep.blend import BlendEntry, blend_weights, write_blend
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.data_prep.executor import process_pool, run_ordered
from kumihimo.data_prep.indexed import IndexedDatasetWriter, token_dtype
from kumihimo.data_prep.report import add_tokens
from kumihimo.tokenizer.spm import Tokenizer

_TOKENIZER: Tokenizer | None = None
_NUMPY_OUTPUT = True  # cleared when the installed SentencePiece has no out_type="numpy"


@dataclass
class BuildResult:
    prefixes: dict[str, Path]  # source -> absolute Megatron prefix (without .bin/.idx)
    num_tokens: dict[str, int]
    num_documents: dict[str, int]
    blend_path: Path
    dtype: str


def dataset_prefix(out_dir: Path, source: str) -> Path:
    return out_dir / "datasets" / f"{source}_text_document"


def _init_tokenizer(path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer.load(path)


def _encode_lines(task: tuple[list[str], bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids, per-document lengths) for a batch of curated JSONL lines."""
    lines, add_bos, append_eod = task
    tokenizer = _TOKENIZER
    assert tokenizer is not None, "worker not initialised"
    encoded = encode_as_arrays(tokenizer, [json.loads(line)["text"] for line in lines])
    return _flatten(encoded, tokenizer.bos_id if add_bos else None, tokenizer.eod_id if append_eod else None)


def encode_as_arrays(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text as an int32 array, on one thread.

    SentencePiece >= 0.2.1 fills numpy buffers directly (out_type="numpy"), which spares building a
    Python int per token and reading it back (~20% of the encode time); the ids are the same as
    out_type=int. Older 0.2.x releases reject the type and get the list path.
    """
    global _NUMPY_OUTPUT
    if _NUMPY_OUTPUT:
        try:
            return tokenizer.sp.Encode(texts, out_type="numpy", num_threads=1)
        except ValueError:  # "unknown return_type=numpy"
            _NUMPY_OUTPUT = False
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(texts, num_threads=1)]


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


def _batches(path: Path, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                batch.append(line)
                if len(batch) >= size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def _encode_source(
    curated: Path,
    writer: IndexedDatasetWriter,
    config: DataPrepConfig,
    tokenizer_path: str,
    num_workers: int,
    progress: Progress,
) -> None:
    flags = (config.tokenize.add_bos, config.tokenize.append_eod)
    tasks = ((batch, *flags) for batch in _batches(curated, config.tokenize.batch_documents))
    if num_workers == 1:
        _init_tokenizer(tokenizer_path)
        for task in tasks:
            tokens, lengths = _encode_lines(task)
            writer.add_documents(tokens, lengths)
            progress.update(len(lengths))
        return
    with process_pool(num_workers, _init_tokenizer, (tokenizer_path,)) as pool:
        for tokens, lengths in run_ordered(pool, _encode_lines, tasks, window=2 * num_workers):
            writer.add_documents(tokens, lengths)
            progress.update(len(lengths))


def _marker_for(curated: Path, tokenizer: Tokenizer, config: DataPrepConfig) -> dict[str, Any]:
    stat = curated.stat()
    return {
        "curated_size": stat.st_size,
        "curated_mtime_ns": stat.st_mtime_ns,
        "tokenizer_sha256": tokenizer.sha256,
        "add_bos": config.tokenize.add_bos,
        "append_eod": config.tokenize.append_eod,
    }


def build_datasets(config: DataPrepConfig, tokenizer_path: str | Path) -> BuildResult:
    from kumihimo.data_prep.pipeline import OUTPUT_FOLDERS

    with RunLock(config.output_dir, "tokenize", OUTPUT_FOLDERS):  # one live run; clears a killed one's debris
        return _build_datasets(config, tokenizer_path)


def _build_datasets(config: DataPrepConfig, tokenizer_path: str | Path) -> BuildResult:
    out = Path(config.output_dir)
    tokenizer = Tokenizer.load(tokenizer_path)
    if config.tokenize.add_bos and tokenizer.bos_id is None:
        raise UserError(
            f"tokenize.add_bos=True but {tokenizer.path} has no <s> piece; "
            "set tokenize.add_bos=false or use a model with a BOS piece"
        )
    entries: list[BlendEntry] = []
    for source in config.input.sources:
        curated = out / "curated" / f"{source.name}.jsonl"
        if not curated.is_file():
            raise UserError(f"{curated} does not exist; run `kumihimo data curate` with this config first")
        prefix = dataset_prefix(out, source.name).resolve()
        marker_path = out / "work" / "tokenize" / f"{source.name}.json"
        wanted = _marker_for(curated, tokenizer, config)
        done = json.loads(marker_path.read_text(encoding="utf-8")) if marker_path.is_file() else {}
        if {k: done.get(k) for k in wanted} == wanted and Path(f"{prefix}.idx").is_file():
            say(f"[tokenize] {source.name}: already done ({done['num_tokens']} tokens)")
            num_tokens, num_documents = done["num_tokens"], done["num_documents"]
        else:
            writer = IndexedDatasetWriter(prefix, tokenizer.vocab_size)
            try:
                with Progress(f"tokenize {source.name}", None, "documents") as progress:
                    _encode_source(
                        curated, writer, config, str(tokenizer.path), config.resolved_num_workers, progress
                    )
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            num_tokens, num_documents = writer.num_tokens, writer.num_documents
            write_text_atomic(
                marker_path, json.dumps({**wanted, "num_tokens": num_tokens, "num_documents": num_documents})
            )
        entries.append(BlendEntry(source.name, prefix, num_tokens, num_documents, source.weight_multiplier))
    blend_path = out / "blend.yaml"
    write_blend(blend_path, entries, tokenizer.identity())
    weights = blend_weights(entries)
    add_tokens(
        out,
        {
            e.source: {
                "prefix": str(e.prefix),
                "num_tokens": e.num_tokens,
                "num_documents": e.num_documents,
                "weight": w,
            }
            for e, w in zip(entries, weights)
        },
    )
    return BuildResult(
        prefixes={e.source: e.prefix for e in entries},
        num_tokens={e.source: e.num_tokens for e in entries},
        num_documents={e.source: e.num_documents for e in entries},
        blend_path=blend_path,
        dtype=token_dtype(tokenizer.vocab_size).name,
    )
