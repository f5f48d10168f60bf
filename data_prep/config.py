"""The data_prep config tree: one section per pipeline stage, defaults = the reference thresholds.

Defaults follow the Swallow corpus (Japanese, character based) and Gopher/C4 (English, word based)
as summarised in shared/reference/llm-jp-3.md; `configs/data_prep/*.yaml` are instances of this tree.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import ClassVar, Literal

from kumihimo.core import configtree, recipes
from kumihimo.core.configtree import ConfigError, bad_value

PiiType = Literal["email", "phone", "my_number", "credit_card", "postal_code", "ip_address"]
ALL_PII_TYPES: list[PiiType] = ["email", "phone", "my_number", "credit_card", "postal_code", "ip_address"]


def _check_ratio(key: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise bad_value(key, value, "is not a ratio", "use a number between 0 and 1")


def _check_min_max(section: str, config, minimum: str, maximum: str) -> None:
    low, high = getattr(config, minimum), getattr(config, maximum)
    if low > high:
        raise bad_value(
            f"{section}.{minimum}",
            low,
            f"is above {maximum}={high}",
            "make the minimum smaller than the maximum",
        )


@dataclass(kw_only=True)
class SourceConfig:
    name: str
    """Name of the source; it names the outputs (`curated/<name>.jsonl`, `<name>_text_document`)."""
    paths: list[str]
    """Glob patterns of input files: JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet (.parquet, read by
    row groups) or Common Crawl WARC (.warc.gz, see input.warc), e.g. `/data/cc/ja/*.jsonl.gz`,
    `/data/fineweb2/jpn_Jpan/*.parquet` or `/data/cc/CC-MAIN-2024-10/*.warc.gz`."""
    weight_multiplier: float = 1.0
    """Blend weight = this source's token share x this multiplier (then normalised); 2.0 = two epochs."""

    def validate(self) -> None:
        configtree.check_file_name("input.sources[].name", self.name)
        if not self.paths:
            raise bad_value(
                f"input.sources[{self.name}].paths",
                self.paths,
                "is empty",
                "list at least one glob of JSONL or Parquet files",
            )
        if self.weight_multiplier < 0:
            raise bad_value(
                f"input.sources[{self.name}].weight_multiplier",
                self.weight_multiplier,
                "is negative",
                "use 0 (leave out of the blend) or a positive number",
            )


WarcExtractor = Literal["resiliparse", "trafilatura"]


@dataclass(kw_only=True)
class WarcConfig:
    extractor: WarcExtractor = "resiliparse"
    """Main-text extractor for HTML pages: `resiliparse` (fast, the default; see docs/benchmarks.md) or
    `trafilatura` (what Swallow used; several times slower)."""
    japanese_precheck: bool = True
    """Extract only pages whose <html> says lang="ja" or whose title looks Japanese (Swallow's pre-check);
    the others are dropped as warc/not_japanese before decoding. Turn off for non-Japanese crawls."""


@dataclass(kw_only=True)
class InputConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Named sources in priority order: when documents are duplicates, the earliest source keeps its copy."""
    text_field: str = "text"
    """JSON field (Parquet column) holding the document text."""
    id_field: str = "id"
    """JSON field (Parquet column) holding the document id; without one the id is `<source>:<file>:<line>`
    (for Parquet the line is the 1-based row number in the file)."""
    url_field: str | None = "url"
    """JSON field (Parquet column) holding the page URL (used by the host block list); null when there is none."""
    meta_fields: list[str] = field(default_factory=list)
    """Other input fields (Parquet columns) copied into the `meta` of kept documents."""
    shard_bytes: int = 256 * 1024 * 1024
    """Uncompressed .jsonl files larger than this are split into shards of about this size;
    compressed files are one shard each; Parquet files are split into runs of whole row groups holding
    about this many bytes of the columns read (uncompressed); a WARC file is one shard. Shards are the
    unit of parallel work and of resume."""
    warc: WarcConfig = field(default_factory=WarcConfig)
    """How .warc.gz sources become documents: text = main text, id = WARC-Record-ID, url, and
    meta.title / meta.date (WARC-Date). The field names above do not apply to WARC."""

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("input.sources is empty; list at least one source with a name and paths")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise bad_value(
                "input.sources[].name", dupes[0], "is used twice", "give every source its own name"
            )
        if self.shard_bytes < 1024:
            raise bad_value(
                "input.shard_bytes", self.shard_bytes, "is too small", "use at least 1048576 (1 MiB)"
            )
        for source in self.sources:  # validate_tree does not descend into lists
            source.validate()


@dataclass(kw_only=True)
class RepairConfig:
    fix_mojibake: bool = True
    """Repair mojibake (UTF-8 read as cp1252/latin-1) with ftfy, for texts a cheap check flags."""
    nfkc: bool = False
    """Apply Unicode NFKC. Off by default: it turns full-width letters, digits and kana into other forms."""
    max_replacement_chars: int = 0
    """Drop a document with more U+FFFD replacement characters than this (after repair)."""
    drop_residual_mojibake: bool = True
    """Drop a document that still looks like mojibake after repair (ftfy's badness heuristic)."""

    def validate(self) -> None:
        if self.max_replacement_chars < 0:
            raise bad_value(
                "repair.max_replacement_chars", self.max_replacement_chars, "is negative", "use 0 or more"
            )


@dataclass(kw_only=True)
class LangIdConfig:
    keep: list[str] = field(default_factory=lambda: ["ja", "en"])
    """ISO 639-1 codes of the languages to keep; documents in any other language are dropped."""
    min_kana_ratio: float = 0.05
    """Texts whose letters are at least this share hiragana/katakana are Japanese, whatever the model says
    (py3langid calls kanji-heavy Japanese 'zh' or 'wuu')."""
    min_confidence: float = 0.0
    """Drop documents whose py3langid probability is below this (0 = accept the top label)."""
    sample_chars: int = 1000
    """Identify the language from the first this many characters (enough for a stable label; py3langid's
    cost grows linearly with it and dominates curation time at 3000)."""

    def validate(self) -> None:
        if not self.keep:
            raise bad_value("langid.keep", self.keep, "is empty", "list the languages to keep, e.g. [ja, en]")
        _check_ratio("langid.min_kana_ratio", self.min_kana_ratio)
        _check_ratio("langid.min_confidence", self.min_confidence)
        if self.sample_chars < 50:
            raise bad_value("langid.sample_chars", self.sample_chars, "is too small", "use at least 200")


@dataclass(kw_only=True)
class RepetitionConfig:
    max_duplicate_line_ratio: float = 0.30
    """Drop when more than this share of lines (for Japanese: sentences) are repeats of earlier ones."""
    max_duplicate_line_char_ratio: float = 0.20
    """Drop when repeated lines (for Japanese: sentences) hold more than this share of the characters."""
    max_duplicate_paragraph_ratio: float = 0.30
    """Drop when more than this share of paragraphs (blocks split by blank lines; for Japanese, lines as in
    Swallow) are repeats."""
    max_duplicate_paragraph_char_ratio: float = 0.20
    """Drop when repeated paragraphs hold more than this share of the characters."""
    max_top_ngram_ratio: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """For n = 2, 3, 4: drop when the most frequent n-gram exceeds this share. English (Gopher): share of
    the words' characters its occurrences cover. Japanese (Swallow): its occurrences / all n-grams."""
    max_duplicate_ngram_ratio: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )
    """For n = 5..10: drop when repetition exceeds this share. English (Gopher): characters covered by
    repeated n-grams. Japanese (Swallow): distinct n-grams that occur more than once / distinct n-grams."""

    def check(self, prefix: str) -> None:
        for name in (
            "max_duplicate_line_ratio",
            "max_duplicate_line_char_ratio",
            "max_duplicate_paragraph_ratio",
            "max_duplicate_paragraph_char_ratio",
        ):
            _check_ratio(f"{prefix}.{name}", getattr(self, name))
        if len(self.max_top_ngram_ratio) != 3:
            raise bad_value(
                f"{prefix}.max_top_ngram_ratio",
                self.max_top_ngram_ratio,
                "does not have 3 entries",
                "give one ratio each for n = 2, 3, 4",
            )
        if len(self.max_duplicate_ngram_ratio) != 6:
            raise bad_value(
                f"{prefix}.max_duplicate_ngram_ratio",
                self.max_duplicate_ngram_ratio,
                "does not have 6 entries",
                "give one ratio each for n = 5, 6, 7, 8, 9, 10",
            )
        for i, ratio in enumerate([*self.max_top_ngram_ratio, *self.max_duplicate_ngram_ratio]):
            _check_ratio(f"{prefix}.ngram_ratio[{i}]", ratio)


@dataclass(kw_only=True)
class JapaneseFilterConfig:
    enabled: bool = True
    """Apply the Japanese rules to documents labelled `ja`."""
    min_chars: int = 400
    """Drop documents shorter than this many characters."""
    max_chars: int = 1_000_000
    """Drop documents longer than this many characters (usually dumps, not prose)."""
    min_japanese_chars: int = 400
    """Drop documents with fewer Japanese letters than this (hiragana, katakana, kanji, 。．！？、，: Swallow's
    classes, see data_prep/ja_metrics.py)."""
    min_hiragana_ratio: float = 0.20
    """Drop when hiragana is less than this share of the Japanese letters (lists, tables, spam)."""
    max_katakana_ratio: float = 0.50
    """Drop when katakana is more than this share of the Japanese letters (product lists, keyword spam)."""
    min_japanese_ratio: float = 0.50
    """Drop when Japanese letters are less than this share of all characters."""
    min_mean_sentence_chars: float = 20
    """Drop when sentences (within a line, up to and including 。．！？!?) are shorter than this on average."""
    max_mean_sentence_chars: float = 90
    """Drop when sentences are longer than this on average."""
    max_sentence_chars: int = 200
    """Drop when any sentence is longer than this."""
    max_ellipsis_sentence_ratio: float = 0.20
    """Drop when more than this share of sentences end in ・ or … (truncated snippets)."""
    count_blank_lines: bool = False
    """Count whitespace-only lines as paragraphs and whitespace-only pieces as sentences, as Swallow's code
    does (true, recipe swallow-v1): blank lines between paragraphs then count as duplicate paragraphs and
    drop clean articles. false: leave them out."""
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    """Repetition rules over sentences, paragraphs (lines) and character n-grams."""

    def validate(self) -> None:
        for name in (
            "min_hiragana_ratio",
            "max_katakana_ratio",
            "min_japanese_ratio",
            "max_ellipsis_sentence_ratio",
        ):
            _check_ratio(f"filters.ja.{name}", getattr(self, name))
        _check_min_max("filters.ja", self, "min_mean_sentence_chars", "max_mean_sentence_chars")
        _check_min_max("filters.ja", self, "min_chars", "max_chars")
        self.repetition.check("filters.ja.repetition")


@dataclass(kw_only=True)
class EnglishFilterConfig:
    enabled: bool = True
    """Apply the Gopher/C4-style rules to documents labelled `en`."""
    min_words: int = 50
    """Drop documents with fewer words than this."""
    max_words: int = 100_000
    """Drop documents with more words than this."""
    min_mean_word_length: float = 3.0
    """Drop when the mean word length (characters) is below this."""
    max_mean_word_length: float = 10.0
    """Drop when the mean word length is above this."""
    max_symbol_word_ratio: float = 0.10
    """Drop when '#' and ellipses ('...', '…') per word exceed this."""
    max_bullet_line_ratio: float = 0.90
    """Drop when more than this share of lines start with a bullet."""
    max_ellipsis_line_ratio: float = 0.30
    """Drop when more than this share of lines end in an ellipsis."""
    min_alpha_word_ratio: float = 0.80
    """Drop when fewer than this share of words contain a letter."""
    min_stop_words: int = 2
    """Drop when fewer than this many distinct stop words (the, be, to, of, and, that, have, with) occur."""
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    """Repetition rules over lines, paragraphs and word n-grams."""

    def validate(self) -> None:
        for name in ("max_bullet_line_ratio", "max_ellipsis_line_ratio", "min_alpha_word_ratio"):
            _check_ratio(f"filters.en.{name}", getattr(self, name))
        _check_min_max("filters.en", self, "min_words", "max_words")
        self.repetition.check("filters.en.repetition")


@dataclass(kw_only=True)
class BoilerplateConfig:
    line_patterns: list[str] = field(
        default_factory=lambda: [
            "javascript",
            "cookie policy",
            "uses cookies",
            "use of cookies",
            "accept cookies",
            "terms of use",
            "privacy policy",
            "cookieを使用",
            "クッキーを使用",
            "cookieの使用",
            "javascriptを有効",
            "javascriptが無効",
            "プライバシーポリシー",
            "利用規約",
        ]
    )
    """Lines containing any of these (case-insensitive) are removed from the text (C4 style)."""
    max_removed_line_ratio: float = 0.50
    """Drop the document when more than this share of its lines were boilerplate."""
    document_patterns: list[str] = field(default_factory=lambda: ["lorem ipsum"])
    """Drop the whole document when it contains any of these (case-insensitive)."""

    def validate(self) -> None:
        _check_ratio("filters.boilerplate.max_removed_line_ratio", self.max_removed_line_ratio)


@dataclass(kw_only=True)
class NgWordConfig:
    words: list[str] = field(default_factory=list)
    """NG words (adult, gambling, spam vocabulary); matched as substrings, case-insensitive, longest first
    at each position, left to right (Swallow's longest-match scan)."""
    words_file: str | None = None
    """A UTF-8 file with more NG words, one per line (# starts a comment)."""
    max_matches: int | None = 2
    """LLM-jp's count rule: drop when more than this many NG-word occurrences are found (one match has
    false positives); null turns it off."""
    max_char_ratio: float | None = 0.05
    """Swallow's rule: drop when the matched characters are at least this share of the Japanese letters
    (of all characters for other languages); null turns it off."""

    def validate(self) -> None:
        if self.words_file is not None and not os.path.isfile(self.words_file):
            raise bad_value(
                "filters.ng_words.words_file",
                self.words_file,
                "does not exist",
                "give the path of a UTF-8 word list or null",
            )
        if self.max_matches is not None and self.max_matches < 0:
            raise bad_value("filters.ng_words.max_matches", self.max_matches, "is negative", "use 0 or more")
        _check_ratio("filters.ng_words.max_char_ratio", self.max_char_ratio)


@dataclass(kw_only=True)
class UrlFilterConfig:
    blocked_hosts: list[str] = field(default_factory=list)
    """Hosts whose pages are dropped; `example.com` also blocks its subdomains."""
    blocked_hosts_file: str | None = None
    """A file with more blocked hosts, one per line (# starts a comment)."""

    def validate(self) -> None:
        if self.blocked_hosts_file is not None and not os.path.isfile(self.blocked_hosts_file):
            raise bad_value(
                "filters.urls.blocked_hosts_file",
                self.blocked_hosts_file,
                "does not exist",
                "give the path of a host list or null",
            )


@dataclass(kw_only=True)
class FiltersConfig:
    ja: JapaneseFilterConfig = field(default_factory=JapaneseFilterConfig)
    """Swallow-style character rules for Japanese."""
    en: EnglishFilterConfig = field(default_factory=EnglishFilterConfig)
    """Gopher/C4-style word rules for English."""
    boilerplate: BoilerplateConfig = field(default_factory=BoilerplateConfig)
    """Boilerplate line removal and lorem-ipsum documents (all languages)."""
    ng_words: NgWordConfig = field(default_factory=NgWordConfig)
    """NG-word counting (all languages)."""
    urls: UrlFilterConfig = field(default_factory=UrlFilterConfig)
    """URL host block list (documents with a url field)."""
    min_compression_ratio: float | None = None
    """Drop when zlib compressed/raw size is below this (highly repetitive); LLM-jp v1 uses 0.30."""
    max_compression_ratio: float | None = None
    """Drop when zlib compressed/raw size is above this (random strings, encoded data); LLM-jp v1 uses 0.70."""
    refilterable: bool = False
    """Also carry the documents that thresholded rules drop through clean-up, decontamination, PII and
    hashing (into work/shards/), so that `kumihimo data refilter` can apply other thresholds later without
    re-running extraction, repair, language ID or hashing. Costs that work for the dropped documents."""

    def validate(self) -> None:
        _check_ratio("filters.min_compression_ratio", self.min_compression_ratio)
        _check_ratio("filters.max_compression_ratio", self.max_compression_ratio)


@dataclass(kw_only=True)
class DedupConfig:
    exact: bool = True
    """Drop documents whose normalised text (NFKC, lower case, whitespace removed) was seen before."""
    fuzzy: bool = True
    """Drop near duplicates found by MinHash + LSH over character n-grams."""
    ngram_size: int = 5
    """Character n-gram (shingle) size for MinHash."""
    num_bands: int = 20
    """LSH bands b; a pair with Jaccard J is caught with probability 1 - (1 - J^r)^b."""
    rows_per_band: int = 10
    """LSH rows per band r; signature length = bands x rows (Swallow uses 40 x 20, LLM-jp v4 20 x 10)."""
    min_jaccard: float | None = None
    """If set, LSH candidate pairs must also have an estimated Jaccard of at least this (fewer false hits)."""
    seed: int = 1234
    """Seed of the MinHash permutations; changing it changes which borderline pairs are caught."""
    record_cluster_size: bool = False
    """Store attributes.cluster_size in every kept document: 1 + the documents removed as its exact or
    near duplicates (FineWeb-2's minhash_cluster_size). tokenize.rehydration needs it."""

    def validate(self) -> None:
        if self.ngram_size < 1:
            raise bad_value("dedup.ngram_size", self.ngram_size, "is below 1", "use 5 (the reference)")
        if self.num_bands < 1 or self.rows_per_band < 1:
            raise bad_value(
                "dedup.num_bands",
                f"{self.num_bands}x{self.rows_per_band}",
                "has a zero",
                "use positive bands and rows, e.g. 20 x 10",
            )
        _check_ratio("dedup.min_jaccard", self.min_jaccard)


FOOTER_KEYWORDS = [
    "Copyright", "copyright", "COPYRIGHT", "©", "(c)", "All Rights Reserved", "All rights reserved",
    "all rights reserved", "Inc.", "無断転載", "無断複製", "転載禁止", "禁無断転載",
    "プライバシーポリシー", "個人情報保護方針", "利用規約", "会社概要", "運営会社", "お問い合わせ",
    "お問合せ", "サイトマップ", "ページの先頭へ", "ページトップへ", "トップへ戻る", "トップページ",
    "ホーム", "関連記事", "人気記事", "新着記事", "カテゴリー", "カテゴリ", "タグ", "アーカイブ",
    "シェア", "ツイート", "いいね", "ブックマーク", "コメント", "トラックバック", "スポンサーリンク",
    "広告", "PR", "ログイン", "ログアウト", "新規登録", "会員登録", "マイページ", "ランキング", "Twitter",
    "Facebook", "LINE", "http", "|", "｜", "›", "»",
]  # fmt: skip


@dataclass(kw_only=True)
class CleanupConfig:
    enabled: bool = False
    """Clean up Japanese documents that passed the filters (Swallow's phase 4): 、。 normalisation and
    footer trimming, counted in the report with before/after examples."""
    normalize_punctuation: bool = True
    """Rewrite ，． as 、。 in documents that use them more often than 、。 after Japanese letters."""
    trim_footer: bool = True
    """Cut the footer: from the first of the last footer_lines lines that is mostly footer keywords."""
    footer_lines: int = 10
    """How many lines at the end are searched for the footer's first line."""
    footer_keyword_share: float = 0.30
    """A line starts the footer when footer keywords are more than this share of its characters."""
    footer_keywords: list[str] = field(default_factory=lambda: list(FOOTER_KEYWORDS))
    """Footer keywords (copyright notices, share buttons, site menus), matched case-sensitively."""

    def validate(self) -> None:
        _check_ratio("cleanup.footer_keyword_share", self.footer_keyword_share)
        if self.footer_lines < 1:
            raise bad_value(
                "cleanup.footer_lines", self.footer_lines, "is below 1", "use 1 or more (10 in Swallow)"
            )


@dataclass(kw_only=True)
class PiiConfig:
    enabled: bool = True
    """Replace personal information in kept documents with typed placeholders."""
    types: list[PiiType] = field(default_factory=lambda: list(ALL_PII_TYPES))
    """Which kinds of personal information to redact."""
    placeholder: str = "<{type}>"
    """Replacement text; `{type}` becomes EMAIL, PHONE, MY_NUMBER, CREDIT_CARD, POSTAL_CODE or IP_ADDRESS."""

    def validate(self) -> None:
        if "{type}" not in self.placeholder:
            raise bad_value(
                "pii.placeholder",
                self.placeholder,
                "does not contain {type}",
                "write e.g. '<{type}>' so the kind of redaction stays visible",
            )


@dataclass(kw_only=True)
class DecontamConfig:
    eval_paths: list[str] = field(default_factory=list)
    """Globs of evaluation files (.jsonl: every string field or `eval_fields`; other: one item per line)."""
    eval_fields: list[str] = field(default_factory=list)
    """Fields of evaluation JSONL records to use; empty = all string values."""
    word_ngram_size: int = 13
    """Word n-gram size for space-separated languages (13 as in GPT-3's decontamination)."""
    char_ngram_size: int = 25
    """Character n-gram size for Japanese/Chinese/Korean text (no spaces); 25 chars ~ 13 tokens at the
    ~2 characters per token of Japanese."""
    min_matches: int = 1
    """Drop a document sharing at least this many distinct n-grams with the evaluation data."""

    def validate(self) -> None:
        if self.word_ngram_size < 3 or self.char_ngram_size < 5:
            raise bad_value(
                "decontam.word_ngram_size",
                f"{self.word_ngram_size}/{self.char_ngram_size}",
                "is too small (ordinary phrases would match)",
                "use >= 8 words and >= 15 chars",
            )
        if self.min_matches < 1:
            raise bad_value("decontam.min_matches", self.min_matches, "is below 1", "use 1 or more")


@dataclass(kw_only=True)
class ScorerConfig:
    name: str
    """The score's name: stored as attributes["score_<name>"] of every kept document."""
    kind: Literal["fasttext", "hf"] = "fasttext"
    """fasttext: a model.bin from `kumihimo data train-classifier` (CPU). hf: a Hugging Face
    sequence-classification or regression folder (an edu-classifier-style model; GPU when present)."""
    path: str
    """The fastText model file, or the Hugging Face model folder (config.json, weights, tokenizer)."""
    label: str | None = None
    """Which label's probability is the score (fastText; hf with 2+ labels). null = fastText: the model's
    first label; hf: the last label (the positive class of a binary classifier). An hf model with one
    output (regression, like FineWeb-Edu's classifier) gives that output and ignores `label`."""
    batch_size: int = 32
    """Documents per forward pass of an hf model."""
    max_tokens: int = 512
    """hf: tokens of each document the model sees (the rest is cut off)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """hf: where the model runs; auto = CUDA when present, else CPU."""
    min_score: float | None = None
    """Drop kept documents scoring below this (a quality drop `low_score_<name>`); null = store the score
    only. With filters.refilterable, `kumihimo data refilter` may change it later from the stored scores."""
    enabled: bool = True
    """Skip this scorer when false (its settings stay in the recipe)."""

    def validate(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise bad_value(
                "score.scorers.name", self.name, "is not a plain name", "use letters, digits and _"
            )
        for key in ("batch_size", "max_tokens"):
            if getattr(self, key) < 1:
                raise bad_value(f"score.scorers.{key}", getattr(self, key), "is below 1", "use 1 or more")


@dataclass(kw_only=True)
class ScoreConfig:
    scorers: list[ScorerConfig] = field(default_factory=list)
    """Named model scores added to every kept document's attributes (stored, so cut-offs can be chosen
    later); empty = no scoring."""

    def validate(self) -> None:
        for scorer in self.scorers:  # list items are not sections: validate_tree does not reach them
            scorer.validate()
        names = [s.name for s in self.scorers]
        for name in names:
            if names.count(name) > 1:
                raise bad_value("score.scorers.name", name, "is used twice", "give every scorer its own name")

    @property
    def active(self) -> list[ScorerConfig]:
        return [s for s in self.scorers if s.enabled]


def prefix_number(value: float) -> str:
    """How a bucket edge or a rehydration weight is written in a dataset prefix name (`{:g}`: 6
    significant digits), so two values that print alike would name one prefix for two groups."""
    return f"{value:g}"


@dataclass(kw_only=True)
class ScoreBucketsConfig:
    source: str
    """The source (input.sources[].name) whose documents these buckets split."""
    score: str
    """The scorer (score.scorers[].name) whose stored attributes.score_<score> decides the bucket."""
    edges: list[float]
    """Increasing cut points e1 < e2 < ...: bucket 0 holds scores < e1 (prefix `<source>_<score>_lt<e1>`),
    bucket i holds e_i <= score < e_i+1 (`<source>_<score>_ge<e_i>`), the last one score >= the last edge."""
    multipliers: list[float]
    """One per bucket (len(edges) + 1, the low bucket first): the blend weight of a bucket is its tokens x
    the source's weight_multiplier x this, so 2.0 = its documents are seen twice as often per token as
    those of a 1.0 bucket (epochs, not tokens). 0 = leave the bucket out: not written, not in the blend."""

    def check(self, where: str) -> None:
        if not self.edges:
            raise bad_value(f"{where}.edges", self.edges, "is empty", "give at least one cut point")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise bad_value(f"{where}.edges", self.edges, "is not increasing", "sort the cut points")
        if len({prefix_number(e) for e in self.edges}) < len(self.edges):
            raise bad_value(
                f"{where}.edges",
                self.edges,
                "has cut points that give the same prefix name (6 significant digits)",
                "round them so that they differ within 6 significant digits",
            )
        if len(self.multipliers) != len(self.edges) + 1:
            raise bad_value(
                f"{where}.multipliers",
                self.multipliers,
                f"has {len(self.multipliers)} entries for {len(self.edges) + 1} buckets",
                f"give {len(self.edges) + 1}: the bucket below {self.edges[0]} first (0 leaves it out)",
            )
        if any(m < 0 for m in self.multipliers) or not any(m > 0 for m in self.multipliers):
            raise bad_value(
                f"{where}.multipliers", self.multipliers, "has a negative or only zeros", "use numbers >= 0"
            )


@dataclass(kw_only=True)
class RehydrationRow:
    min_size: int
    """Smallest cluster size this row applies to; it covers sizes up to the next row's min_size - 1."""
    weight: float
    """Blend multiplier of the kept documents of such clusters (0 = leave them out)."""


def _default_rehydration_table() -> list[RehydrationRow]:
    return [
        RehydrationRow(min_size=1, weight=1.0),
        RehydrationRow(min_size=2, weight=2.0),
        RehydrationRow(min_size=5, weight=3.0),
        RehydrationRow(min_size=100, weight=1.0),
    ]


@dataclass(kw_only=True)
class RehydrationConfig:
    enabled: bool = False
    """Upsample kept documents by the size of the duplicate cluster they stood for (FineWeb-2's
    rehydration), at blend time: each weight class of the table is its own prefix whose blend weight is
    multiplied by the class's weight. Needs documents curated with dedup.record_cluster_size=true."""
    table: list[RehydrationRow] = field(default_factory=_default_rehydration_table)
    """Cluster-size ranges -> weights, by increasing min_size starting at 1. The last row is the cap:
    every larger cluster gets its weight (huge clusters are templates and spam: keep it low)."""

    def validate(self) -> None:
        sizes = [row.min_size for row in self.table]
        if not self.table or sizes[0] != 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise bad_value(
                "tokenize.rehydration.table",
                sizes,
                "does not start at min_size 1 with increasing min_size",
                "list rows {min_size, weight} from min_size 1 upwards",
            )
        for row in self.table:
            if row.weight < 0:
                raise bad_value(
                    "tokenize.rehydration.table.weight", row.weight, "is negative", "use 0 or more"
                )
        if self.enabled and all(row.weight == 0 for row in self.table):
            raise bad_value(
                "tokenize.rehydration.table.weight",
                0,
                "is 0 in every row, which leaves every document of every source out of the blend",
                "give the cluster sizes to keep a weight above 0 (1 = as deduplicated), or set "
                "tokenize.rehydration.enabled=false",
            )
        weights = {row.weight for row in self.table}
        if len({prefix_number(w) for w in weights}) < len(weights):
            raise bad_value(
                "tokenize.rehydration.table.weight",
                sorted(weights),
                "has different weights that give the same prefix name (6 significant digits)",
                "make them equal or differ within 6 significant digits",
            )


@dataclass(kw_only=True)
class TokenizeConfig:
    add_bos: bool = True
    """Start every document with the tokenizer's <s> (LLM-jp: [<s>] + ids + [</s>])."""
    append_eod: bool = True
    """End every document with the tokenizer's end-of-document id (</s>)."""
    batch_documents: int = 512
    """Documents per encoding task sent to a worker process."""
    buckets: list[ScoreBucketsConfig] = field(default_factory=list)
    """Score buckets per source: that source is written as one prefix per bucket of a stored model score,
    each weighted by its own multiplier in blend.yaml (e.g. LLM-jp v4's higher weight for score >= 3.5)."""
    rehydration: RehydrationConfig = field(default_factory=RehydrationConfig)
    """Upsampling of deduplicated documents by their duplicate cluster size, as blend weights."""
    tasks: int | None = None
    """null: one writer per source in this process (num_workers encoder processes). N: the curated files
    are cut into parts of `part_bytes` at line starts, dealt to N tasks run by `executor.kind` (local: a
    pool of num_workers processes; datatrove-local; datatrove-slurm: an array job and a dependent merge
    job), each writing its parts' .bin/.idx; the merge then writes the same bytes one writer would."""
    part_bytes: int = 128 * 1024 * 1024
    """Curated JSONL bytes per part when `tasks` is set: the unit of work dealt to tasks and of resume
    (a killed task redoes only its unfinished parts)."""

    def validate(self) -> None:
        if self.batch_documents < 1:
            raise bad_value("tokenize.batch_documents", self.batch_documents, "is below 1", "use e.g. 512")
        if self.tasks is not None and self.tasks < 1:
            raise bad_value(
                "tokenize.tasks", self.tasks, "is below 1", "use null (one process) or 1 or more tasks"
            )
        if self.part_bytes < 1:
            raise bad_value(
                "tokenize.part_bytes", self.part_bytes, "is below 1", "use e.g. 134217728 (128 MiB)"
            )
        sources = [b.source for b in self.buckets]
        for i, buckets in enumerate(self.buckets):  # list items are not sections: validated here
            if sources.count(buckets.source) > 1:
                raise bad_value(
                    "tokenize.buckets.source", buckets.source, "is listed twice", "give each source one entry"
                )
            buckets.check(f"tokenize.buckets[{i}]")


@dataclass(kw_only=True)
class ReportConfig:
    examples_per_reason: int = 3
    """Example excerpts shown per drop reason in report.md."""
    excerpt_chars: int = 200
    """Characters of text kept in dropped/quarantine records and report examples."""


ExecutorKind = Literal["local", "datatrove-local", "datatrove-slurm"]


@dataclass(kw_only=True)
class ExecutorConfig:
    kind: ExecutorKind = "local"
    """local: a process pool on this machine. datatrove-local / datatrove-slurm: per-shard curation as
    `executor.tasks` datatrove tasks (LocalPipelineExecutor / SlurmPipelineExecutor, needs
    `pip install datatrove`), then the dedup stages and one task for merge and report, each depending on
    the one before."""
    tasks: int = 1
    """Number of datatrove tasks the shards are dealt to (task i curates shards i, i+tasks, ...); for every
    executor also the key ranges of the exact dedup stage and the tasks of the band stage (num_bands x
    ceil(tasks / num_bands) units)."""
    workers: int | None = None
    """Tasks run at once by datatrove-local (null = num_workers); datatrove-slurm: array jobs at once (null = all)."""
    logging_dir: str | None = None
    """datatrove's logs and completion markers; null = <output_dir>/work/datatrove."""
    slurm_partition: str | None = None
    """Slurm partition for datatrove-slurm (required there)."""
    slurm_time: str = "24:00:00"
    """Time limit of each Slurm job."""
    slurm_cpus_per_task: int = 1
    """CPUs per Slurm array task; the task curates its shards with this many worker processes (1: one shard
    at a time), whatever `num_workers` says (that is the local pool's size)."""
    slurm_dedup_cpus: int = 4
    """CPUs of the single-task jobs (the dedup alive step and summary, merge and report); each gets this x
    slurm_mem_per_cpu_gb of memory. The alive step holds one byte per document and the exact copies
    (docs/data_prep.md, "Dedup at scale"); the clustering runs as executor.tasks tasks."""
    slurm_mem_per_cpu_gb: int = 4
    """Memory per CPU in GB (a worker holds ~300 MB of models and tables plus one shard's buffers)."""
    slurm_env_command: str | None = None
    """Shell command run at the start of each job, e.g. `source /path/to/.venv/bin/activate`; null = put
    the bin folder of the Python that runs `kumihimo data curate` first on PATH (the jobs start datatrove's
    `launch_pickled_pipeline` from there, so they use the same environment)."""
    slurm_sbatch_args: list[str] = field(default_factory=list)
    """Extra #SBATCH options as key=value, e.g. [account=myproj, qos=high]."""

    def validate(self) -> None:
        if self.tasks < 1:
            raise bad_value(
                "executor.tasks", self.tasks, "is below 1", "use 1 or more (e.g. one per 1-10 shards)"
            )
        if self.workers is not None and self.workers < 1:
            raise bad_value("executor.workers", self.workers, "is below 1", "use null or >= 1")
        for name in ("slurm_cpus_per_task", "slurm_dedup_cpus", "slurm_mem_per_cpu_gb"):
            if getattr(self, name) < 1:
                raise bad_value(f"executor.{name}", getattr(self, name), "is below 1", "use 1 or more")
        if self.kind == "datatrove-slurm" and not self.slurm_partition:
            raise bad_value(
                "executor.slurm_partition",
                self.slurm_partition,
                "is not set for datatrove-slurm",
                "name the Slurm partition to run on, e.g. executor.slurm_partition=cpu",
            )
        for arg in self.slurm_sbatch_args:
            if "=" not in arg:
                raise bad_value(
                    "executor.slurm_sbatch_args", arg, "is not key=value", "write e.g. account=myproj"
                )


@dataclass(kw_only=True)
class DataPrepConfig:
    """A curation and dataset-building run: sources in, curated JSONL, .bin/.idx, blend and report out."""

    RECIPE_FOLDER: ClassVar[str] = "data_prep"
    """Shipped recipes for this tree live in configs/data_prep/ (a recipe argument may name one)."""

    output_dir: str = "data_prep_out"
    """Where curated/, dropped/, quarantine/, datasets/, blend.yaml and report.md are written."""
    num_workers: int | None = None
    """Worker processes; null = one per CPU core."""
    input: InputConfig = field(default_factory=InputConfig)
    """Input sources and JSON field names."""
    repair: RepairConfig = field(default_factory=RepairConfig)
    """Mojibake repair and text normalisation."""
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    """Language identification."""
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    """Quality filters."""
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    """Evaluation-set decontamination."""
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    """Clean-up of filtered Japanese text (punctuation, footers)."""
    pii: PiiConfig = field(default_factory=PiiConfig)
    """PII redaction."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Model scores (fastText, Hugging Face classifiers) stored with every kept document."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and fuzzy deduplication across all sources."""
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    """Megatron .bin/.idx building."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """report.md / report.json."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Where curation runs: this machine's process pool, or datatrove tasks (local or Slurm)."""

    def validate(self) -> None:
        if self.num_workers is not None and self.num_workers < 1:
            raise bad_value("num_workers", self.num_workers, "is below 1", "use null (all cores) or >= 1")
        names = [s.name for s in self.input.sources]
        for buckets in self.tokenize.buckets:
            if buckets.source not in names:
                raise bad_value(
                    "tokenize.buckets.source",
                    buckets.source,
                    "is not one of input.sources",
                    f"use one of {', '.join(names)}",
                )

    @property
    def resolved_num_workers(self) -> int:
        return self.num_workers or os.cpu_count() or 1


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> DataPrepConfig:
    """YAML recipe + dotted overrides -> a validated DataPrepConfig."""
    config = configtree.load(DataPrepConfig, path, overrides)
    if path is not None:
        anchor_shipped_inputs(config, recipes.resolve_recipe(path, "data_prep"))
    return config


def anchor_shipped_inputs(config: DataPrepConfig, recipe: Path) -> None:
    """A shipped recipe's relative input paths (`kumihimo/sample/ja.jsonl.gz`) name files of the
    installation, not of the working folder: when one matches nothing here but matches beside the
    kumihimo package (the checkout, or site-packages), it is made absolute there, so the shipped
    recipes run from any working directory. Paths of your own recipes stay relative to where you are."""
    shipped = recipes.shipped_root().resolve()
    if shipped not in recipe.resolve().parents:
        return
    installation = Path(str(resources.files("kumihimo"))).resolve().parent

    def anchored(pattern: str) -> str:
        if Path(pattern).is_absolute() or glob.glob(pattern, recursive=True):
            return pattern
        there = str(installation / pattern)
        return there if glob.glob(there, recursive=True) else pattern

    for source in config.input.sources:
        source.paths = [anchored(p) for p in source.paths]
    config.decontam.eval_paths = [anchored(p) for p in config.decontam.eval_paths]
