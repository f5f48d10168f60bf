"""Tokenizer stage: train, evaluate and export SentencePiece tokenizers for Japanese/English/code."""

from kumihimo.tokenizer.base import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
