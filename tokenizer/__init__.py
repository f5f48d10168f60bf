"""Tokenizer stage: train, evaluate and export SentencePiece tokenizers for Japanese/English/code."""

from kumihimo.tokenizer.spm import Tokenizer

__all__ = ["Tokenizer"]
