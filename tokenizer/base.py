"""The tokenizer as every stage sees it: the `Tokenizer` protocol (what data_prep, training, evaluation,
conversion and doctor use of one) and `load_tokenizer(path)`, the one way to open a tokenizer.

Two implementations: `SentencePieceTokenizer` (kumihimo.tokenizer.spm: a `.model` file, or a folder
holding tokenizer.model) and `HFTokenizer` (kumihimo.tokenizer.hf: a Hugging Face folder with
tokenizer.json, or the path of a tokenizer.json). Neither imports this module; callers that need only
what the protocol offers import this module alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from kumihimo.core.errors import UserError
from kumihimo.tokenizer.hf import HFTokenizer, hf_tokenizer_folder
from kumihimo.tokenizer.spm import SentencePieceTokenizer


@runtime_checkable
class Tokenizer(Protocol):
    """Ids, special tokens and identity of a tokenizer; BOS/EOD are added by callers, never implicitly
    (a Hugging Face tokenizer's own template may add BOS in encode)."""

    kind: str
    """"sentencepiece" or "huggingface"."""
    path: Path
    """What load_tokenizer reloads as this tokenizer (workers get the path)."""
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eod_id: int
    """The id that ends every document in the datasets."""
    pad_id: int | None
    unk_id: int | None

    @property
    def sha256(self) -> str:
        """Identity of the files that decide the ids, stored with datasets and checkpoints."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def piece(self, token_id: int) -> str: ...

    def identity(self) -> dict[str, object]:
        """What checkpoints and datasets record about the tokenizer they were made with."""
        ...


def load_tokenizer(path: str | Path, eod_piece: str | None = None) -> Tokenizer:
    """The tokenizer at `path`: a SentencePiece model, or a Hugging Face tokenizer folder (tokenizer.json;
    see kumihimo.tokenizer.hf for how the kind is told from the files). `eod_piece` picks the piece that
    ends documents of a SentencePiece model (default: its </s>)."""
    folder = hf_tokenizer_folder(path)
    if folder is None:
        return SentencePieceTokenizer(path, eod_piece)
    if eod_piece is not None:
        raise UserError(
            f"{path} is a Hugging Face tokenizer: its eos token ends documents; eod_piece={eod_piece!r} "
            "applies to SentencePiece models only"
        )
    return HFTokenizer(folder)
