"""The datasets a run trains on, as files: inspecting them before the model is built, and the fingerprint
that ties a checkpoint to them. Reads headers and a few bytes of each file, never a whole .bin.

- Blend (`read_blend`): prefixes and weights from blend.yaml or the inline data.blend, and the tokenizer
  the blend file records (`check_tokenizer_matches_data`).
- Datasets (`inspect_prefix`, `check_datasets`): every prefix's .idx header and counts, and the .bin
  size they imply; one line per problem. `check_counts_and_ids`: blend.yaml's recorded counts and token
  ids below the vocabulary at each end of every .bin.
- Splits (`split_document_counts`, `check_splits`): every split with weight gets documents of every
  prefix, cut as Megatron cuts them.
- Data fingerprint (`data_fingerprint`): the tokenizer's sha256, split, sequence length, seed, blend
  weights and each prefix's .idx header, sizes and a sample of its bytes. Saved in every checkpoint and
  compared at resume (`compare_fingerprints`); it also keys Megatron's index cache, so a re-tokenized
  dataset in the same path never reuses stale shuffling indices.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kumihimo.core.errors import UserError
from kumihimo.data_prep.blend import declared_counts
from kumihimo.data_prep.blend import read_blend as read_blend_file
from kumihimo.data_prep.indexed import DTYPE_CODES, INDEX_HEADER, INDEX_VERSION
from kumihimo.pretrain.config import DataConfig
from kumihimo.tokenizer.base import load_tokenizer

HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
SAMPLE_BYTES = 1 << 16
"""Bytes of an .idx read from each end for the fingerprint (sequence lengths at the start, byte
pointers and document indices at the end): cheap, and any re-tokenization of other text changes them."""
_ITEM_SIZES = {code: dtype.itemsize for dtype, code in DTYPE_CODES.items()}
RETOKENIZE = "re-run `kumihimo data tokenize` to rebuild it"


# ---------------------------------------------------------------------------------------- datasets


def inspect_prefix(prefix: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(what the .idx says and the file sizes, problems) of one Megatron dataset prefix."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    problems = [f"{path} is missing; {RETOKENIZE}" for path in (idx, bin_) if not path.is_file()]
    if problems:
        return None, problems
    idx_bytes, bin_bytes = idx.stat().st_size, bin_.stat().st_size
    with open(idx, "rb") as handle:
        head = handle.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or not head.startswith(INDEX_HEADER):
            return None, [f"{idx} is not a Megatron index (bad or short header); {RETOKENIZE}"]
        version, code, num_sequences, num_documents = struct.unpack_from("<QBQQ", head, len(INDEX_HEADER))
        if version != INDEX_VERSION or code not in _ITEM_SIZES:
            return None, [
                f"{idx} has index version {version} and dtype code {code}, not a Megatron index; {RETOKENIZE}"
            ]
        expected_idx = HEADER_BYTES + 12 * num_sequences + 8 * num_documents
        if idx_bytes != expected_idx or num_documents < 1:
            return None, [
                f"{idx} is {idx_bytes} bytes but its header ({num_sequences} sequences, {num_documents} "
                f"document indices) needs {expected_idx}: truncated or corrupt; {RETOKENIZE}"
            ]
        expected_bin = 0
        if num_sequences:
            handle.seek(HEADER_BYTES + 4 * (num_sequences - 1))
            (last_length,) = struct.unpack("<i", handle.read(4))
            handle.seek(HEADER_BYTES + 4 * num_sequences + 8 * (num_sequences - 1))
            (last_pointer,) = struct.unpack("<q", handle.read(8))
            expected_bin = last_pointer + last_length * _ITEM_SIZES[code]
        handle.seek(idx_bytes - 8)
        (last_document,) = struct.unpack("<q", handle.read(8))
        if last_document != num_sequences:
            problems.append(
                f"{idx} ends its document indices at {last_document}, not at its {num_sequences} "
                f"sequences: corrupt; {RETOKENIZE}"
            )
        if bin_bytes != expected_bin:
            problems.append(
                f"{bin_} is {bin_bytes} bytes but {idx.name} indexes {expected_bin}: "
                f"{'truncated' if bin_bytes < expected_bin else 'not the file the index was written with'}; "
                f"{RETOKENIZE}"
            )
        handle.seek(0)
        sample = hashlib.sha256(handle.read(SAMPLE_BYTES))
        handle.seek(max(0, idx_bytes - SAMPLE_BYTES))
        sample.update(handle.read(SAMPLE_BYTES))
    info = {
        "prefix": str(prefix),
        "dtype_code": code,
        "num_sequences": num_sequences,
        "num_documents": num_documents,
        "idx_bytes": idx_bytes,
        "bin_bytes": bin_bytes,
        "idx_sample_sha256": sample.hexdigest(),
    }
    return info, problems


def check_datasets(prefixes: list[str], source: str) -> list[dict[str, Any]]:
    """Inspect every prefix; raise one UserError listing every problem (one line each)."""
    infos, problems = [], []
    for prefix in prefixes:
        info, found = inspect_prefix(prefix)
        infos.append(info)
        problems += found
    if problems:
        raise UserError(
            f"{len(problems)} problem(s) with the datasets of {source}:\n  " + "\n  ".join(problems)
        )
    return infos


def check_tokenizer_matches_data(recorded: dict | None, current: dict | None, blend_file: str) -> None:
    """The blend.yaml records the tokenizer its datasets were made with; training with another one
    (even of the same vocabulary size) would learn from token ids that mean other pieces."""
    if not recorded or not current or recorded.get("sha256") in (None, current["sha256"]):
        return
    raise UserError(
        f"data.tokenizer={current['path']} (sha256 {current['sha256'][:12]}) is not the tokenizer the "
        f"datasets in {blend_file} were made with (sha256 {recorded['sha256'][:12]}, {recorded.get('path')}); "
        f"set data.tokenizer={recorded.get('path')} or re-run `kumihimo data tokenize` with this one"
    )


def check_datasets_and_tokenizer(data: DataConfig) -> tuple[list[str], list[float], list[dict[str, Any]]]:
    """(prefixes, weights, what each .idx says) of a config's blend, after checking the datasets and
    that data.tokenizer is the tokenizer the blend file records and that every split with weight gets
    documents of every prefix; nothing for mock data."""
    if data.mock:
        return [], [], []
    prefixes, weights, recorded = read_blend(data)
    if recorded and data.tokenizer:
        check_tokenizer_matches_data(recorded, load_tokenizer(data.tokenizer).identity(), data.blend_file)
    infos = check_datasets(prefixes, data.blend_file or "data.blend")
    # the .idx header counts document boundaries: one more than documents
    check_splits(prefixes, [info["num_documents"] - 1 for info in infos], data.split)
    return prefixes, weights, infos


def read_blend(data: DataConfig) -> tuple[list[str], list[float], dict | None]:
    """Prefixes and weights of the blend (blend.yaml prefixes are relative to the file's folder), and
    the identity of the tokenizer the blend file records (None for an inline data.blend)."""
    if data.blend_file is None:
        return [e.prefix for e in data.blend], [e.weight for e in data.blend], None
    pairs, tokenizer = read_blend_file(data.blend_file)
    return [p for p, _ in pairs], [w for _, w in pairs], tokenizer


ID_SAMPLE_BYTES = 1 << 20
"""Token ids checked against the vocabulary at each end of every .bin (reading a whole .bin would
take minutes on a large corpus; a dataset made with another tokenizer shows at once)."""


def check_counts_and_ids(data: DataConfig, infos: list[dict], vocab_size: int) -> None:
    """What the dataset check (check_datasets) leaves out: blend.yaml's recorded token and
    document counts against the .bin/.idx they describe (a consistent pair of another source trained
    silently), and token ids below the tokenizer's vocabulary in the first and last MiB of each .bin
    (an id >= vocab_size fails an embedding lookup deep in the step, or trains garbage)."""
    item_sizes = {code: dtype.itemsize for dtype, code in DTYPE_CODES.items()}
    declared = declared_counts(data.blend_file) if data.blend_file else {}
    problems = []
    for info in infos:
        prefix, item = info["prefix"], item_sizes[info["dtype_code"]]
        num_tokens, num_documents = declared.get(prefix, (None, None))
        actual = (info["bin_bytes"] // item, info["num_sequences"])
        for what, said, found in zip(("tokens", "documents"), (num_tokens, num_documents), actual):
            if said is not None and said != found:
                problems.append(
                    f"{data.blend_file} says {prefix} has {said:,} {what} but its files hold {found:,}: "
                    "not the dataset the blend was written for; re-run `kumihimo data tokenize`"
                )
        dtype = next(d for d, c in DTYPE_CODES.items() if c == info["dtype_code"])
        with open(f"{prefix}.bin", "rb") as handle:
            head = handle.read(ID_SAMPLE_BYTES // item * item)
            handle.seek(max(0, info["bin_bytes"] - ID_SAMPLE_BYTES) // item * item)
            tail = handle.read()
        largest = max(
            (int(np.frombuffer(part, dtype=dtype).max()) for part in (head, tail) if part), default=-1
        )
        if largest >= vocab_size:
            problems.append(
                f"{prefix}.bin holds token id {largest}, but the tokenizer has {vocab_size:,} ids "
                "(data.tokenizer): the dataset was made with another tokenizer; re-run `kumihimo data tokenize`"
            )
    if problems:
        raise UserError(f"{len(problems)} problem(s) with the datasets:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------ splits


def source_name(prefix: str) -> str:
    """`.../ja_cc_text_document` -> `ja_cc`: the name per-source metrics are logged under."""
    return Path(prefix).name.removesuffix("_text_document")


SPLIT_NAMES = ("train", "validation", "test")


def split_document_counts(num_documents: int, split: str) -> list[int]:
    """Documents of one prefix in each split (train, validation, test), cut as Megatron's
    BlendedMegatronDatasetBuilder cuts them: cumulative normalised weights, `round(bound * n)`."""
    weights = [float(w) for w in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = [0.0]
    for weight in weights:
        bounds.append(bounds[-1] + weight / total)
    return [int(round(b * num_documents)) - int(round(a * num_documents)) for a, b in zip(bounds, bounds[1:])]


def check_splits(prefixes: list[str], num_documents: list[int], split: str) -> None:
    """Refuse a split with weight that gets no document of some prefix: Megatron would build it
    anyway and loop forever looking for tokens (GPTDataset._get_num_epochs)."""
    weights = [float(w) for w in split.split(",")] + [0.0] * 2
    empty = [
        (prefix, n, counts, [SPLIT_NAMES[i] for i, c in enumerate(counts) if c == 0 and weights[i] > 0])
        for prefix, n in zip(prefixes, num_documents)
        for counts in [split_document_counts(n, split)]
    ]
    empty = [e for e in empty if e[3]]
    if not empty:
        return
    prefix, n, counts, names = empty[0]
    per_split = " / ".join(f"{c} {name}" for c, name in zip(counts, SPLIT_NAMES))
    others = f" (and {len(empty) - 1} more prefix(es))" if len(empty) > 1 else ""
    hint = _split_that_fits(min(num_documents), weights)
    fix = f"use e.g. data.split={hint}" if hint else "give that source more documents"
    raise UserError(
        f"data.split={split} gives {source_name(prefix)} ({prefix}, {n} documents) {per_split} documents: "
        f"the {' and '.join(names)} split would be empty{others}; {fix}, or set an unused split's weight to 0"
    )


def _split_that_fits(num_documents: int, weights: list[float]) -> str | None:
    """The first `T,V,X` (percent) that gives every split with weight at least one of num_documents."""
    used = [w > 0 for w in weights[:3]]
    for part in range(1, 50):
        candidate = [part if used[i] else 0 for i in (1, 2)]
        text = ",".join(str(x) for x in (100 - sum(candidate), *candidate))
        counts = split_document_counts(num_documents, text)
        if all(c > 0 for c, u in zip(counts, [True, *used[1:]]) if u):
            return text
    return None


# ------------------------------------------------------------------------------------- fingerprint


def data_fingerprint(
    data: DataConfig,
    seq_length: int,
    seed: int,
    datasets: list[dict[str, Any]],
    weights: list[float],
    tokenizer_sha: str | None,
):
    """What the sample stream of a run depends on (see the module docstring)."""
    return {
        "tokenizer_sha256": tokenizer_sha,
        "mock": data.mock,
        "split": data.split,
        "seq_length": seq_length,
        "seed": seed,
        "datasets": [{**info, "weight": weight} for info, weight in zip(datasets, weights)],
    }


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


_CONTENT_KEYS = (
    "dtype_code",
    "num_sequences",
    "num_documents",
    "idx_bytes",
    "bin_bytes",
    "idx_sample_sha256",
)


def _content(entry: dict[str, Any]) -> tuple:
    return tuple(entry.get(k) for k in _CONTENT_KEYS)


def compare_fingerprints(
    saved: dict[str, Any], now: dict[str, Any]
) -> tuple[str | None, list[str], list[str]]:
    """(tokenizer refusal, changes that alter the sample stream, harmless differences) between the
    fingerprint a checkpoint recorded and this run's."""
    tokenizer = None
    if saved.get("tokenizer_sha256") != now.get("tokenizer_sha256"):
        tokenizer = f"tokenizer sha256 {str(saved.get('tokenizer_sha256'))[:12]} -> {str(now.get('tokenizer_sha256'))[:12]}"
    changes = [
        f"{key} {saved.get(key)!r} -> {now.get(key)!r}"
        for key in ("mock", "split", "seq_length", "seed")
        if saved.get(key) != now.get(key)
    ]
    harmless = []
    old, new = saved.get("datasets", []), now.get("datasets", [])
    if len(old) != len(new):
        changes.append(f"{len(old)} dataset prefix(es) -> {len(new)}")
    else:
        for before, after in zip(old, new):
            name = before["prefix"]
            if _content(before) != _content(after):
                diff = [
                    f"{k} {before.get(k)} -> {after.get(k)}"
                    for k in _CONTENT_KEYS
                    if before.get(k) != after.get(k) and k != "idx_sample_sha256"
                ] or ["same sizes, other contents"]
                changes.append(f"{name}: {', '.join(diff)} (re-tokenized)")
            elif before["prefix"] != after["prefix"]:
                harmless.append(f"{name} moved to {after['prefix']} (same contents)")
            if before.get("weight") != after.get("weight"):
                changes.append(f"{name}: blend weight {before.get('weight')} -> {after.get('weight')}")
    return tokenizer, changes, harmless
