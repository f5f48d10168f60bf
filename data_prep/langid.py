"""Offline language identification: script checks first, then py3langid's bundled model.

Kana only occur in Japanese, so a text with enough of them is `ja` whatever the statistical model
says (it labels kanji-heavy Japanese `zh` or `wuu`); Hangul likewise marks Korean.
"""

from __future__ import annotations

import re
from functools import lru_cache

from data_prep.config import LangIdConfig


@lru_cache(maxsize=1)
def _identifier():
    # Loading the model takes ~1 s; once per process.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


_KANA = re.compile("[\u3041-\u30ff\u31f0-\u31ff\uff66-\uff9d]")
_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff]")
_LETTER = re.compile(r"[^\W\d_]")


def script_counts(text: str) -> tuple[int, int, int]:
    """(letters, kana, hangul) in `text` (regex counting runs in C; a Python loop is 10x slower)."""
    return len(_LETTER.findall(text)), len(_KANA.findall(text)), len(_HANGUL.findall(text))


def identify(text: str, config: LangIdConfig) -> tuple[str, float]:
    """(ISO 639-1 code, confidence). Script rules give confidence 1.0."""
    sample = text[: config.sample_chars]
    num_letters, num_kana, num_hangul = script_counts(sample)
    if num_letters and num_kana / num_letters >= config.min_kana_ratio:
        return "ja", 1.0
    if num_letters and num_hangul / num_letters >= 0.3:
        return "ko", 1.0
    lang, score = _identifier().classify(sample)
    if lang == "wuu":  # Wu Chinese: what the model says for kanji-only snippets; treat as Chinese
        lang = "zh"
    return lang, float(score)
