"""Mojibake repair and text clean-up.

ftfy is thorough but slow on long text, so it only runs when a cheap scan finds characters that
mojibake of Japanese/UTF-8 text produces (Latin-1 letters, C1 controls, cp1252 punctuation pairs).
"""

from __future__ import annotations

import re
import unicodedata

import ftfy
from ftfy.badness import is_bad

from kumihimo.data_prep.config import RepairConfig

# UTF-8 read as cp1252/latin-1 turns every multi-byte character into a lead byte U+00C2..U+00F4
# followed by continuation bytes U+0080..U+00BF or cp1252 punctuation; real text rarely has that pair.
_SUSPICIOUS = re.compile(
    "[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)
# C0/C1 controls except tab and newline, and invisible format characters that only confuse tokenizers.
_REMOVE = {
    c: None
    for c in [
        *range(0x00, 0x09),
        0x0B,
        0x0C,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x80, 0xA0),
        0x200B,
        0x2060,
        0xFEFF,
        0x00AD,
    ]
}
_REMOVE[0x09] = " "
_REMOVABLE = re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(_REMOVE)) + "]")
_DELETABLE = re.compile(
    "[" + "".join(re.escape(chr(c)) for c, to in sorted(_REMOVE.items()) if to is None) + "]"
)
_SPACE_RUNS = re.compile(r"[ \u00a0]{2,}")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def looks_suspicious(text: str) -> bool:
    """Cheap test: could this be mojibake? (Only then is ftfy's slower fixer worth running.)"""
    return _SUSPICIOUS.search(text) is not None


def clean_whitespace(text: str) -> str:
    """Unify line breaks, drop control/invisible characters, trim spaces; newlines are kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    if _REMOVABLE.search(text):  # most texts need neither; when one does, it has few such characters
        # what text.translate(_REMOVE) does, without its dict lookup per character (6x slower)
        text = _DELETABLE.sub("", text.replace("\t", " "))
    # each regex runs only when the substring every one of its matches contains is there (str.__contains__
    # is a fast scan; most texts need none of the three); tabs are spaces by now
    if "  " in text or "\u00a0" in text:
        text = _SPACE_RUNS.sub(" ", text)
    if " \n" in text or "\u00a0\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def repair_text(text: str, config: RepairConfig) -> tuple[str, str | None, bool]:
    """(clean text, drop reason or None, whether mojibake was repaired)."""
    repaired = False
    if config.fix_mojibake and looks_suspicious(text):
        fixed = ftfy.fix_text(
            text,
            normalization=None,
            fix_line_breaks=False,
            uncurl_quotes=False,
            fix_latin_ligatures=False,
            fix_character_width=False,
        )
        repaired = fixed != text
        text = fixed
        if config.drop_residual_mojibake and looks_suspicious(text) and is_bad(text):
            return text, "residual_mojibake", repaired
    if text.count("\ufffd") > config.max_replacement_chars:
        return text, "replacement_chars", repaired
    if config.nfkc:
        text = unicodedata.normalize("NFKC", text)
    text = clean_whitespace(text)
    if not text:
        return text, "empty_after_cleanup", repaired
    return text, None, repaired
