"""Hugging Face tokenizer folders (tokenizer.json) as tokenizers of kumihimo, beside SentencePiece models.

Base models for continual pretraining (Llama, Qwen, ...) ship Hugging Face tokenizers, not SentencePiece
models. A folder holding tokenizer.json is loaded with transformers' AutoTokenizer (local files only, no
remote code) and encodes exactly as Megatron-LM's preprocess_data.py with `--tokenizer-type
HuggingFaceTokenizer` does: each text gets the tokenizer's own special tokens (`tokenizer(text).input_ids`,
so BOS is there when the tokenizer's template adds it), the end-of-document id is the eos token's
(the sep token's when there is no eos token), and the vocabulary size is len(tokenizer) (added tokens
included).

kumihimo.tokenizer.base.load_tokenizer picks the kind from the path (hf_tokenizer_folder): a `.model`
file or a folder with tokenizer.model is SentencePiece (as before); a folder with tokenizer.json and no
tokenizer.model, or the path of a tokenizer.json itself (to choose it in a folder that has both), is
Hugging Face.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from kumihimo.core.errors import UserError
from kumihimo.tokenizer.spm import MODEL_FILENAME

HF_TOKENIZER_FILE = "tokenizer.json"
# The files AutoTokenizer reads that change ids or special tokens; all of them make up the identity.
IDENTITY_FILES = (HF_TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def hf_tokenizer_folder(path: str | Path) -> Path | None:
    """The Hugging Face tokenizer folder `path` names, or None when it names a SentencePiece model."""
    path = Path(path)
    if path.is_file() and path.name == HF_TOKENIZER_FILE:
        return path.parent
    if path.is_dir() and not (path / MODEL_FILENAME).is_file() and (path / HF_TOKENIZER_FILE).is_file():
        return path
    return None


ROUND_TRIP_PROBE = "日本語の文章を書いています。The model reads data."
ROUND_TRIP_MIN_RATIO = 0.9
"""Share of the probe (whitespace and case aside) a usable tokenizer gives back (measured: 1.0 for the
tokenizers of the tests; 0.72 for Qwen2Tokenizer over an exported SentencePiece tokenizer.json)."""


def _comparable(text: str) -> str:
    return re.sub(r"\s+", "", text).casefold()


class HFTokenizer:
    """Encode/decode with a Hugging Face tokenizer: the Tokenizer protocol of kumihimo.tokenizer.base."""

    kind = "huggingface"

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        # What load_tokenizer reloads as this tokenizer (workers get the path): the folder, or its
        # tokenizer.json when a tokenizer.model beside it would make the folder mean SentencePiece.
        self.path = self.folder if hf_tokenizer_folder(self.folder) else self.folder / HF_TOKENIZER_FILE
        try:
            self.hf = AutoTokenizer.from_pretrained(
                self.folder, local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(
                f"{self.folder} holds {HF_TOKENIZER_FILE} but transformers cannot load it as a tokenizer "
                f"({str(exc).splitlines()[0][:200]}); pass a complete Hugging Face tokenizer folder"
            ) from exc
        self.vocab_size: int = len(self.hf)
        self.bos_id: int | None = self.hf.bos_token_id
        self.pad_id: int | None = self.hf.pad_token_id
        self.unk_id: int | None = self.hf.unk_token_id
        # As Megatron's HuggingFaceTokenizer: the eos token ends documents, or the sep token without one.
        self.eos_id: int | None = (
            self.hf.eos_token_id if self.hf.eos_token is not None else self.hf.sep_token_id
        )
        self.eod_id: int | None = self.eos_id
        if self.eod_id is None:
            raise UserError(
                f"{self.path} defines no eos_token (nor sep_token) to end documents with; set eos_token in "
                "its tokenizer_config.json"
            )
        # "Token indices sequence length is longer than the specified maximum": documents are not model inputs.
        logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
        self._check_round_trip()

    def _check_round_trip(self) -> None:
        """Refuse a tokenizer that cannot give a Japanese/English probe back. A config.json naming another
        family beside a tokenizer.json (a Qwen2 config beside an exported SentencePiece tokenizer) makes
        AutoTokenizer build that family's class, which silently drops the Japanese (issue 30)."""
        ids = self.hf(ROUND_TRIP_PROBE, add_special_tokens=False).input_ids
        back = self.hf.decode(ids, skip_special_tokens=True)
        kept = difflib.SequenceMatcher(None, _comparable(ROUND_TRIP_PROBE), _comparable(back)).ratio()
        if kept < ROUND_TRIP_MIN_RATIO:
            raise UserError(
                f"{self.folder}: AutoTokenizer built a {type(self.hf).__name__} that turns {ROUND_TRIP_PROBE!r} "
                f"into {len(ids)} tokens decoding to {back!r}; a config.json or tokenizer_config.json there "
                "probably names another model's tokenizer class: remove it or fix its tokenizer_class"
            )

    @cached_property
    def sha256(self) -> str:
        """Identity of the files that decide the ids: sha256 over each present file of IDENTITY_FILES
        (its name and its own sha256), so a changed tokenizer_config.json (eos token, BOS template) counts."""
        digest = hashlib.sha256()
        for name in IDENTITY_FILES:
            file = self.folder / name
            if file.is_file():
                digest.update(f"{name}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
        return digest.hexdigest()

    @cached_property
    def adds_bos(self) -> bool:
        """Whether the tokenizer's template starts every text with BOS."""
        ids = self.encode("a")
        return self.bos_id is not None and bool(ids) and ids[0] == self.bos_id

    def encode(self, text: str) -> list[int]:
        return self.hf(text).input_ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.hf(texts).input_ids if texts else []

    def encode_as_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids))

    def piece(self, token_id: int) -> str:
        return self.hf.convert_ids_to_tokens(token_id)

    def identity(self) -> dict[str, object]:
        """What checkpoints and datasets record about the tokenizer they were made with."""
        return {
            "kind": self.kind,
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "eod_id": self.eod_id,
            "pad_id": self.pad_id,
        }
