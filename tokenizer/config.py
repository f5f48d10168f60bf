"""The tokenizer-training recipe: where the text comes from and how SentencePiece is set up.

Defaults follow llm-jp-tokenizer v3 (Unigram, byte fallback, identity normalization, split digits,
whitespace-only pieces, no whitespace collapsing, pieces of at most 16 characters, specials
<unk>=0 <s>=1 </s>=2). `configs/tokenizer/*.yaml` are instances of `TokenizerTrainConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from kumihimo.core.configtree import bad_value, check_file_name

NUM_BYTE_PIECES = 256
NEWLINE = "\n"
WHITESPACE = "\u2581"  # SentencePiece's escaped space


@dataclass(kw_only=True)
class SourceConfig:
    """One input source (usually one language) of curated JSONL documents. Sources have the shape they
    have in data_prep: a list under `input.sources`, each item named."""

    name: str
    """Name of the source (e.g. ja, en, code); override one with `input.sources.ja.paths=[...]`."""
    paths: list[str]
    """Glob patterns of JSONL or JSONL.gz files (one JSON object per line), e.g. `data/ja/*.jsonl.gz`."""
    lang: str | None = None
    """Keep only documents whose `lang` field equals this (data_prep writes `lang`); null keeps all.
    Lets two sources share one mixed-language file."""
    ratio: float = 1.0
    """Share of the sampled training sentences taken from this source, relative to the other sources
    (normalised by their sum); 0 leaves the source out."""


@dataclass(kw_only=True)
class InputConfig:
    """The corpus to sample from (the same shape as data_prep's `input`)."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Input sources, each `{name, paths, lang, ratio}`; override one with `input.sources.ja.ratio=0.6`."""
    text_field: str = "text"
    """The JSON key holding each document's text (data_prep writes `text`)."""


@dataclass(kw_only=True)
class SpecialTokensConfig:
    """Control pieces: never produced from text, only inserted by code (ids in this order)."""

    unk: str = "<unk>"
    """Unknown piece, id 0 (never used with byte fallback unless a byte piece is missing)."""
    bos: str = "<s>"
    """Beginning of document, id 1; data_prep writes [<s>] + ids + [</s>]."""
    eos: str = "</s>"
    """End of document, id 2; also the end-of-document (EOD) id the trainer masks on."""
    pad: str | None = "<pad>"
    """Padding piece, id 3; null for none."""
    extra: list[str] = field(default_factory=lambda: ["<mask>", "<eod>"])
    """Further control pieces after <pad> (LLM-jp keeps <mask> and <eod> for compatibility)."""
    num_reserved: int = 0
    """Unused control pieces `<reserved_0>` ... appended after `extra`, so later fine-tuning can give
    them a meaning without resizing the embedding."""

    def pieces(self) -> list[str]:
        """All control pieces in id order (unk, bos, eos, pad, extra, reserved)."""
        named = [self.unk, self.bos, self.eos] + ([self.pad] if self.pad is not None else [])
        return named + list(self.extra) + [f"<reserved_{i}>" for i in range(self.num_reserved)]

    def validate(self) -> None:
        for name in ("unk", "bos", "eos"):
            value = getattr(self, name)
            if not value or not value.strip():
                raise bad_value(
                    f"special_tokens.{name}",
                    value,
                    "is empty",
                    f"give the piece a name such as {getattr(SpecialTokensConfig, name)!r}",
                )
        if self.pad is not None and not self.pad.strip():
            raise bad_value("special_tokens.pad", self.pad, "is empty", "name it (e.g. '<pad>') or set null")
        if self.num_reserved < 0:
            raise bad_value("special_tokens.num_reserved", self.num_reserved, "is negative", "use 0 or more")
        seen: set[str] = set()
        for piece in self.pieces():
            if piece in seen:
                raise bad_value(
                    "special_tokens",
                    piece,
                    "appears twice among the special tokens",
                    "give every special token a distinct name",
                )
            if not piece.strip() or any(c.isspace() for c in piece) or "," in piece:
                raise bad_value(
                    "special_tokens",
                    piece,
                    "contains whitespace or a comma",
                    "use names like <mask> (SentencePiece splits its flags on commas)",
                )
            if piece.startswith("<0x") and len(piece) == 6:
                raise bad_value(
                    "special_tokens", piece, "collides with a byte-fallback piece name", "choose another name"
                )
            seen.add(piece)


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    """Train a SentencePiece tokenizer on sampled sentences of the curated corpus."""

    RECIPE_FOLDER: ClassVar[str] = "tokenizer"
    """Shipped recipes for this tree live in configs/tokenizer/ (a recipe argument may name one)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "sources": "write input.sources as a list of {name, paths, lang, ratio} (the shape data_prep uses), "
        "and input.text_field instead of sources.<name>.text_field",
    }
    """Keys of earlier releases, refused with the new spelling."""

    input: InputConfig = field(default_factory=InputConfig)
    """The corpus: named sources and the text field."""
    output_dir: str
    """Directory that receives tokenizer.model, tokenizer.vocab, train_config.yaml, train_stats.json."""
    overwrite: bool = False
    """Replace a tokenizer this command trained in output_dir, whole (otherwise training refuses a
    non-empty output_dir). A folder holding anything else is always refused, never deleted."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece algorithm; llm-jp-tokenizer v3 is Unigram."""
    vocab_size: int = 32000
    """Number of pieces including special, newline, required and the 256 byte pieces (before padding)."""
    pad_vocab_to_multiple_of: int | None = 128
    """Round vocab_size up to a multiple of this. Megatron pads the embedding to 128 x TP anyway, so
    use 128 x your largest TP size and those rows become real pieces instead of dead padding."""
    character_coverage: float = 0.9995
    """Share of characters covered by character pieces; the rarest rest falls back to bytes."""
    input_sentence_size: int = 10_000_000
    """Sentences (lines) sampled over all sources for training; bounds memory (each at most
    max_sentence_length bytes)."""
    shuffle_input_sentence: bool = True
    """true: uniform random sample of each source (reads all of it, reservoir sampling); false: take
    the first lines of each source (fast, but biased towards the first files)."""
    max_sentence_length: int = 4192
    """Longest training sentence in bytes; longer lines are cut into pieces of at most this size."""
    on_short_source: Literal["scale_down", "keep"] = "scale_down"
    """When a source has fewer lines than its share: scale_down shrinks the other sources so the
    ratios still hold; keep uses everything available (ratios then drift; a warning says by how much)."""
    byte_fallback: bool = True
    """Encode characters outside the vocabulary as UTF-8 byte pieces instead of <unk>."""
    split_digits: bool = True
    """Never merge digits (each digit is its own piece), which helps arithmetic."""
    normalization: Literal["identity", "nfkc"] = "identity"
    """Text normalization before tokenizing; identity keeps full-width forms, as llm-jp-tokenizer v3."""
    allow_whitespace_only_pieces: bool = True
    """Allow pieces made of spaces only, so code indentation costs few tokens."""
    remove_extra_whitespaces: bool = False
    """Collapse runs of spaces and strip line ends; false keeps code indentation intact."""
    # No dummy prefix (as llm-jp-tokenizer v3): Japanese has no spaces, so a prepended "▁" would
    # either cost an extra token per document or split the vocabulary into "▁X"/"X" twins; and a
    # document, a continuation and a prompt then tokenize the same way.
    add_dummy_prefix: bool = False
    """Prepend a space to every text before tokenizing (SentencePiece's default); false keeps the
    first word of Japanese text from turning into a separate '▁'-prefixed piece."""
    max_piece_length: int = 16
    """Longest piece in characters."""
    newline_piece: bool = True
    """Keep "\\n" as a piece of its own (a required character; training lines keep their newlines),
    so line structure and code layout survive and cost one token per newline instead of a byte piece."""
    special_tokens: SpecialTokensConfig = field(default_factory=SpecialTokensConfig)
    """Control pieces and their order."""
    required_pieces: list[str] = field(default_factory=list)
    """Pieces forced into the vocabulary. Single characters (e.g. kanji) become required characters;
    longer strings become user-defined symbols, which are always split out of the text as a unit."""
    required_pieces_file: str | None = None
    """A UTF-8 file with more required pieces, one per line (e.g. the Joyo kanji list)."""
    seed: int = 1234
    """Seed for sentence sampling (SentencePiece's own training is deterministic given its input)."""
    num_threads: int = 0
    """Threads for SentencePiece training; 0 uses all CPU cores."""
    log_sentencepiece: bool = False
    """Show SentencePiece's own (verbose) training log on stderr."""

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to pad_vocab_to_multiple_of: the size actually trained."""
        multiple = self.pad_vocab_to_multiple_of or 1
        return math.ceil(self.vocab_size / multiple) * multiple

    def user_defined_pieces(self) -> list[str]:
        """Multi-character required pieces: SentencePiece always splits them out of the text."""
        return [piece for piece in self.all_required_pieces() if len(piece) > 1]

    def required_chars(self) -> str:
        """Whitespace, newline and single-character required pieces, kept whatever character_coverage says.
        (Newline is a required character, not a user-defined symbol: SentencePiece scores
        user-defined symbols with an inexact bonus, which makes its float32 Viterbi break exact ties
        differently from Hugging Face's; see export_hf.)"""
        # The whitespace symbol too: a corpus without spaces (Japanese-only, say) would otherwise leave
        # it out, and a space would byte-fall-back to the bytes of U+2581 and decode as "▁", not " ".
        chars = (
            [WHITESPACE]
            + ([NEWLINE] if self.newline_piece else [])
            + [p for p in self.all_required_pieces() if len(p) == 1]
        )
        return "".join(dict.fromkeys(chars))

    def all_required_pieces(self) -> list[str]:
        pieces = list(self.required_pieces)
        if self.required_pieces_file is not None:
            path = Path(self.required_pieces_file)
            text = path.read_text(encoding="utf-8")
            pieces += [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]
        return list(dict.fromkeys(pieces))

    def num_fixed_pieces(self) -> int:
        """Pieces that exist whatever the data: specials, user-defined, required chars, bytes."""
        return (
            len(self.special_tokens.pieces())
            + len(self.user_defined_pieces())
            + len(self.required_chars())
            + (NUM_BYTE_PIECES if self.byte_fallback else 0)
        )

    def validate(self) -> None:
        self._validate_sources()
        positive_ints = {
            "input_sentence_size": self.input_sentence_size,
            "max_piece_length": self.max_piece_length,
            "max_sentence_length": self.max_sentence_length,
        }
        for key, value in positive_ints.items():
            if value < 1:
                raise bad_value(key, value, "must be at least 1", "set a positive number")
        if self.pad_vocab_to_multiple_of is not None and self.pad_vocab_to_multiple_of < 1:
            raise bad_value(
                "pad_vocab_to_multiple_of",
                self.pad_vocab_to_multiple_of,
                "must be at least 1",
                "use e.g. 128, or null for no rounding",
            )
        if not 0.0 < self.character_coverage <= 1.0:
            raise bad_value(
                "character_coverage",
                self.character_coverage,
                "is outside (0, 1]",
                "use 0.9995 for Japanese (1.0 for small alphabets)",
            )
        if self.num_threads < 0:
            raise bad_value("num_threads", self.num_threads, "is negative", "use 0 for all cores")
        if not self.output_dir:
            raise bad_value("output_dir", self.output_dir, "is empty", "set a directory for the tokenizer")
        self._validate_pieces()

    def _validate_sources(self) -> None:
        sources = self.input.sources
        if not sources:
            raise bad_value(
                "input.sources",
                sources,
                "is empty",
                "add at least one source, e.g. input.sources=[{name: ja, paths: [data/ja/*.jsonl.gz]}]",
            )
        if not self.input.text_field:
            raise bad_value("input.text_field", self.input.text_field, "is empty", "use e.g. text")
        names = [source.name for source in sources]
        for source in sources:
            key = f"input.sources.{source.name}"
            check_file_name("input.sources[].name", source.name)
            if names.count(source.name) > 1:
                raise bad_value(
                    "input.sources[].name", source.name, "names two sources", "give each a new name"
                )
            if not source.paths:
                raise bad_value(f"{key}.paths", source.paths, "is empty", "list at least one glob pattern")
            if not math.isfinite(source.ratio) or source.ratio < 0:
                raise bad_value(
                    f"{key}.ratio",
                    source.ratio,
                    "must be a finite number >= 0",
                    "give each source a non-negative share such as 0.5",
                )
        total = sum(s.ratio for s in sources)
        if not total > 0:
            ratios = {s.name: s.ratio for s in sources}
            raise bad_value(
                "input.sources[].ratio",
                ratios,
                "sum to 0, so no source would be sampled",
                "give at least one source a ratio > 0",
            )

    def _validate_pieces(self) -> None:
        if self.required_pieces_file is not None and not Path(self.required_pieces_file).is_file():
            raise bad_value(
                "required_pieces_file",
                self.required_pieces_file,
                "does not exist",
                "pass a UTF-8 file with one piece per line, or null",
            )
        specials = set(self.special_tokens.pieces())
        for piece in self.all_required_pieces():
            if piece in specials:
                raise bad_value(
                    "required_pieces", piece, "is also a special token", "remove it from required_pieces"
                )
            if any(c.isspace() for c in piece) and piece != NEWLINE:
                raise bad_value(
                    "required_pieces",
                    piece,
                    "contains whitespace",
                    "list pieces without spaces (whitespace pieces are learned from the data)",
                )
            if len(piece) > 1 and "," in piece:
                raise bad_value(
                    "required_pieces",
                    piece,
                    "contains a comma",
                    "drop it (SentencePiece splits user-defined symbols on commas)",
                )
            if len(piece) > self.max_piece_length:
                raise bad_value(
                    "required_pieces",
                    piece,
                    f"is longer than max_piece_length={self.max_piece_length}",
                    "shorten it or raise max_piece_length",
                )
        minimum = self.num_fixed_pieces() + 1
        if self.padded_vocab_size < minimum:
            raise bad_value(
                "vocab_size",
                self.vocab_size,
                f"leaves no room for learned pieces ({self.num_fixed_pieces()} pieces are fixed: "
                "special tokens, newline, required pieces and byte pieces)",
                f"set vocab_size to well above {minimum}",
            )
