"""A SentencePiece model as the rest of kumihimo sees it: ids, special tokens, identity. One of the two
implementations of the Tokenizer protocol (kumihimo.tokenizer.base), which loads it.

Any SentencePiece `.model` works here (ours or an existing one such as llm-jp-tokenizer's); the
special ids are read from the model itself, never assumed.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from kumihimo.core.errors import UserError

MODEL_FILENAME = "tokenizer.model"


def resolve_model_path(path: str | Path) -> Path:
    """A `.model` file, or a directory holding `tokenizer.model`."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILENAME
    if not path.is_file():
        raise UserError(
            f"tokenizer model {str(path)!r} does not exist; train one with `kumihimo tokenizer train` "
            "or pass the path of a SentencePiece .model file (or of a Hugging Face tokenizer folder)"
        )
    return path


class SentencePieceTokenizer:
    """Encode/decode with a SentencePiece model; BOS/EOD are added by callers, never implicitly."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, eod_piece: str | None = None):
        self.path = resolve_model_path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{self.path} is not a SentencePiece model ({exc}); pass a .model file") from exc
        self.vocab_size: int = self.sp.GetPieceSize()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int | None = _or_none(self.sp.bos_id())
        self.eos_id: int | None = _or_none(self.sp.eos_id())
        self.pad_id: int | None = _or_none(self.sp.pad_id())
        if eod_piece is None:
            self.eod_id = self.eos_id
        else:
            piece_id = self.sp.PieceToId(eod_piece)
            if piece_id == self.unk_id and eod_piece != self.sp.IdToPiece(self.unk_id):
                raise UserError(f"eod piece {eod_piece!r} is not in {self.path}; use one of its pieces")
            self.eod_id = piece_id
        if self.eod_id is None:
            raise UserError(f"{self.path} has no </s> piece to end documents with; pass eod_piece=...")

    @cached_property
    def sha256(self) -> str:
        """Identity of the model file, stored with datasets and checkpoints to catch mix-ups."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.Encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))

    def piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(token_id)

    def identity(self) -> dict[str, object]:
        """What checkpoints and datasets record about the tokenizer they were made with."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "eod_id": self.eod_id,
            "pad_id": self.pad_id,
        }


def _or_none(token_id: int) -> int | None:
    return None if token_id < 0 else token_id
