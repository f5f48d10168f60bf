"""Megatron indexed datasets (.bin/.idx) written exactly as Megatron-LM's preprocess_data.py does.

.idx layout: b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code, <Q number of sequences, <Q number of
document indices, then int32 sequence lengths, int64 byte pointers, int64 document indices
([0, 1, ..., N]: one sequence per document). .bin is the tokens back to back.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from kumihimo.core.files import TEMP_MARK

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_COPY_BUFFER = 16 * 1024 * 1024
_INDEX_CHUNK = 1 << 22  # document indices written per numpy call (32 MiB)
UINT16_VOCAB_LIMIT = 65500  # Megatron's DType.optimal_dtype switches to int32 at this vocabulary size


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Append documents, then `finish()`: .bin and .idx appear (renamed from temp names) only then."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.bin_path = Path(f"{self.prefix}.bin")
        self.idx_path = Path(f"{self.prefix}.idx")
        self._bin_tmp = Path(f"{self.prefix}.bin{TEMP_MARK}{os.getpid()}")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths."""
        assert int(lengths.sum()) == len(tokens), "lengths must add up to the token count"
        self._bin.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))  # no bytes copy
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += len(tokens)

    @property
    def num_documents(self) -> int:
        return sum(len(x) for x in self._lengths)

    def finish(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        idx_tmp = Path(f"{self.prefix}.idx{TEMP_MARK}{os.getpid()}")
        with open(idx_tmp, "wb") as handle:
            _write_index_header(handle, self.dtype, len(lengths))
            handle.write(lengths.astype(np.int32).tobytes(order="C"))
            handle.write(pointers.tobytes(order="C"))
            handle.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes(order="C"))
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)


def _write_index_header(handle: BinaryIO, dtype: np.dtype, num_documents: int) -> None:
    handle.write(INDEX_HEADER)
    handle.write(struct.pack("<Q", INDEX_VERSION))
    handle.write(struct.pack("<B", DTYPE_CODES[dtype]))
    handle.write(struct.pack("<Q", num_documents))  # sequences: one per document
    handle.write(struct.pack("<Q", num_documents + 1))  # document indices


def _append_file(source: BinaryIO, target: BinaryIO) -> None:
    """Append all of `source` to `target`: os.copy_file_range where the kernel has it (no copy through
    Python; file systems with reflinks share the blocks, NFS 4.2 copies on the server), else a plain copy."""
    size = os.fstat(source.fileno()).st_size
    copied = 0
    try:
        while copied < size:
            done = os.copy_file_range(source.fileno(), target.fileno(), size - copied)
            if done == 0:
                break
            copied += done
    except (AttributeError, OSError):  # no such call here, or not between these two files
        pass
    if copied < size:  # the rest by plain copy, from where the kernel's copy stopped
        target.seek(0, os.SEEK_END)
        source.seek(copied)
        shutil.copyfileobj(source, target, _COPY_BUFFER)


def concatenate_datasets(parts: list[Path], prefix: str | Path) -> tuple[int, int]:
    """Write `prefix`.bin/.idx holding the documents of `parts` (prefixes, all of one dtype) in order:
    the bytes one IndexedDatasetWriter given the same documents writes, and those of Megatron-LM's
    IndexedDatasetBuilder.add_index over the parts (tools/merge_datasets.py). Returns (num_tokens,
    num_documents). Memory is one part's index at a time: the .idx is written in three passes (lengths,
    pointers, document indices) that read the parts' indexes again instead of holding all of them."""
    if not parts:
        raise ValueError("concatenate_datasets needs at least one part")
    dtypes = {read_index(part)[0] for part in parts}
    if len(dtypes) != 1:
        raise ValueError(
            f"the parts {[str(p) for p in parts]} hold different token dtypes {sorted(map(str, dtypes))}"
        )
    (dtype,) = dtypes
    prefix = Path(prefix)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    bin_tmp = Path(f"{prefix}.bin{TEMP_MARK}{os.getpid()}")
    idx_tmp = Path(f"{prefix}.idx{TEMP_MARK}{os.getpid()}")
    try:
        with open(bin_tmp, "wb") as out:
            for part in parts:
                with open(f"{part}.bin", "rb") as handle:
                    _append_file(handle, out)
        num_documents = sum(len(read_index(part)[1]) for part in parts)
        num_tokens = 0
        with open(idx_tmp, "wb") as out:
            _write_index_header(out, dtype, num_documents)
            for part in parts:
                out.write(read_index(part)[1].tobytes(order="C"))
            for part in parts:  # byte pointers continue from the previous part's end
                lengths = read_index(part)[1].astype(np.int64)
                pointers = np.empty(len(lengths), dtype=np.int64)
                if len(lengths):
                    pointers[0] = num_tokens * dtype.itemsize
                    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
                    pointers[1:] += pointers[0]
                out.write(pointers.tobytes(order="C"))
                num_tokens += int(lengths.sum())
            for start in range(0, num_documents + 1, _INDEX_CHUNK):
                stop = min(start + _INDEX_CHUNK, num_documents + 1)
                out.write(np.arange(start, stop, dtype=np.int64).tobytes(order="C"))
        os.replace(bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
    except BaseException:
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
        raise
    return num_tokens, num_documents


def read_index(prefix: str | Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, lengths, pointers, document indices) of an .idx file, for checks without megatron."""
    data = Path(f"{prefix}.idx").read_bytes()
    if not data.startswith(INDEX_HEADER):
        raise ValueError(f"{prefix}.idx is not a Megatron index (bad header)")
    offset = len(INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", data, offset)
    (code,) = struct.unpack_from("<B", data, offset + 8)
    num_seq, num_doc = struct.unpack_from("<QQ", data, offset + 9)
    offset += 25
    dtype = {v: k for k, v in DTYPE_CODES.items()}[code]
    lengths = np.frombuffer(data, np.int32, num_seq, offset)
    pointers = np.frombuffer(data, np.int64, num_seq, offset + 4 * num_seq)
    docs = np.frombuffer(data, np.int64, num_doc, offset + 12 * num_seq)
    assert version == INDEX_VERSION
    return dtype, lengths, pointers, docs
