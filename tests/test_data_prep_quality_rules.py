"""Swallow's Japanese metrics on real text, the blank-line deviation, clean-up, NG words and refilter.

tests/fixtures/ja_manual_pages.jsonl: 24 pages of Japanese software documentation (GIMP help, GPL-3.0+;
LibreOffice help, MPL-2.0; LilyPond documentation, GFDL-1.3) from Debian's gimp-help-ja,
libreoffice-help-ja and lilypond-doc-html-ja packages, HTML with code and tables removed, written by
`python benchmarks/quality_calibration.py --fixture tests/fixtures/ja_manual_pages.jsonl`.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from test_data_prep_pipeline import differing_outputs, write_corpus

from kumihimo.core.errors import UserError
from kumihimo.data_prep.cleanup import normalize_punctuation, trim_footer
from kumihimo.data_prep.config import FOOTER_KEYWORDS, load_config
from kumihimo.data_prep.ja_metrics import japanese_metrics
from kumihimo.data_prep.pipeline import curate, refilter
from kumihimo.data_prep.quality import QualityFilter, longest_matches

CONFIGS = Path(__file__).parent.parent / "configs" / "data_prep"
PAGES = [
    json.loads(line)
    for line in (Path(__file__).parent / "fixtures" / "ja_manual_pages.jsonl").read_text("utf-8").splitlines()
]


def plain_definitions(text: str) -> dict:
    """Swallow's definitions written the slow, obvious way (Counters over lines, sentences, n-grams)."""
    hiragana = sum(0x3041 <= ord(c) <= 0x3096 for c in text)
    katakana = sum(0x30A1 <= ord(c) <= 0x30FA for c in text)
    kanji = sum(c in "々〇〻" or 0x3400 <= ord(c) <= 0x9FFF or 0xF900 <= ord(c) <= 0xFAFF for c in text)
    marks = sum(c in "。．！？、，" for c in text)
    japanese = hiragana + katakana + kanji + marks
    lines = [re.findall(r"[^。．！？!?]+[。．！？!?]?", line) for line in text.split("\n")]
    sentences = [s for line in lines for s in line]
    out = {
        "hiragana_fraction": hiragana / japanese,
        "katakana_fraction": katakana / japanese,
        "japanese_fraction": japanese / len(text),
        "avg_sentence_length": sum(map(len, sentences)) / len(sentences),
        "max_sentence_length": max(map(len, sentences)),
    }
    for name, units in (("paragraph", ["".join(line) for line in lines]), ("sentence", sentences)):
        counts = Counter(units)
        out[f"duplicate_{name}_fraction"] = sum(f - 1 for f in counts.values()) / len(units)
    for n in range(2, 11):
        counts = Counter(text[i : i + n] for i in range(len(text) - n + 1))
        if n <= 4:
            out[f"top_{n}gram_character_fraction"] = max(counts.values()) / (len(text) - n + 1)
        else:
            out[f"duplicate_{n}gram_character_fraction"] = sum(f > 1 for f in counts.values()) / len(counts)
    return out


@pytest.mark.parametrize("page", range(0, len(PAGES), 3))
def test_metrics_follow_swallows_definitions_on_real_pages(page):
    text = PAGES[page]["text"]
    measured = japanese_metrics(text, count_blank_lines=True)
    for name, value in plain_definitions(text).items():
        assert measured[name] == pytest.approx(value, abs=1e-12), name


def dressed_as_article(text: str) -> str:
    lines = text.split("\n")
    return "\n".join(
        [lines[0], "2024年5月1日 文・編集部", "", "\n\n".join(lines[1:]), "", "Copyright © 2024 Example Inc."]
    )


def test_blank_lines_between_paragraphs_drop_articles_only_under_the_reference_rule():
    swallow = QualityFilter(load_config(CONFIGS / "swallow-v1.yaml").filters)
    web = QualityFilter(load_config(CONFIGS / "llmjp-web.yaml").filters)
    checked = 0
    for page in PAGES:
        if web.check(page["text"], "ja", None)[1] is not None:
            continue
        article = dressed_as_article(page["text"])
        assert web.check(article, "ja", None)[1] is None, page["id"]
        if page["text"].count("\n") >= 3:
            assert japanese_metrics(article, count_blank_lines=True)["duplicate_paragraph_fraction"] > 0.3
            assert japanese_metrics(article, count_blank_lines=False)["duplicate_paragraph_fraction"] <= 0.3
            assert swallow.check(article, "ja", None)[1] is not None, page["id"]
            checked += 1
    assert checked >= 3, "too few fixture pages pass the web recipe to test the deviation"


def test_web_recipe_keeps_more_real_pages_than_the_reference_rules():
    swallow = QualityFilter(load_config(CONFIGS / "swallow-v1.yaml").filters)
    web = QualityFilter(load_config(CONFIGS / "llmjp-web.yaml").filters)
    kept_swallow = sum(swallow.check(p["text"], "ja", None)[1] is None for p in PAGES)
    kept_web = sum(web.check(p["text"], "ja", None)[1] is None for p in PAGES)
    assert kept_web > kept_swallow


def test_punctuation_is_normalised_only_where_western_marks_dominate():
    text = next(p["text"] for p in PAGES if p["text"].count("、") >= 3 and p["text"].count("。") >= 3)
    western = text.replace("、", "，").replace("。", "．")
    assert normalize_punctuation(western) == (text, True, True)
    assert normalize_punctuation(text) == (text, False, False)
    # full-width numbers and letters keep their marks
    mixed = western + "\n円周率は３．１４です．Ｈｉ，こんにちは，"
    cleaned, _, _ = normalize_punctuation(mixed)
    assert cleaned.endswith("円周率は３．１４です。Ｈｉ，こんにちは、")


def test_footer_lines_are_cut_and_prose_is_not():
    text = PAGES[0]["text"]
    footer = (
        "Copyright © 2024 Example Inc. All rights reserved.\nプライバシーポリシー | 利用規約 | お問い合わせ"
    )
    assert trim_footer(text + "\n" + footer, FOOTER_KEYWORDS, 10, 0.3) == (text, 2)
    for page in PAGES:
        assert trim_footer(page["text"], FOOTER_KEYWORDS, 10, 0.3)[1] == 0, page["id"]


def test_ng_words_take_the_longest_match_and_swallows_ratio():
    assert longest_matches("無料登録者", ["無料", "無料登録", "登録者"]) == ["無料登録"]
    config = load_config(CONFIGS / "swallow-v1.yaml").filters
    config.ng_words.words = ["無料登録"]
    qf = QualityFilter(config)
    text = max((p["text"] for p in PAGES), key=lambda t: japanese_metrics(t)["num_japanese_letters"])
    japanese = japanese_metrics(text)["num_japanese_letters"]
    assert japanese > 400
    spam = "".join(f"無料登録は{i}番。" for i in range(japanese // 40))  # NG letters ~8% of Japanese letters
    verdict = qf.check(text + "\n" + spam, "ja", None)[1]
    assert verdict is not None and verdict[0] == "ng_word_chars"
    one = qf.check(text + "\n無料登録。", "ja", None)[1]
    assert one is None or not one[0].startswith("ng_")  # one match is far below 5%


# ---- refilter -------------------------------------------------------------------------------------


def test_refilter_gives_what_a_full_run_with_the_new_thresholds_gives(tmp_path):
    base = write_corpus(tmp_path / "corpus")
    base.filters.refilterable = True

    def config_for(out: str, **ja):
        config = copy.deepcopy(base)  # (writing the corpus again would change its files' mtimes)
        config.output_dir = str(tmp_path / out)
        for key, value in ja.items():
            setattr(config.filters.ja, key, value)
        return config

    strict = curate(config_for("run", min_hiragana_ratio=0.9))
    assert strict.dropped["quality"].get("ja_low_hiragana_ratio", 0) >= 3
    result = refilter(config_for("run"))
    fresh = curate(config_for("fresh"))
    assert result.num_kept == fresh.num_kept > strict.num_kept
    assert differing_outputs(tmp_path / "run", tmp_path / "fresh") == []
    plain = config_for("plain")
    plain.filters.refilterable = False
    kept = curate(plain)
    ids = {json.loads(line)["id"] for line in (tmp_path / "plain/curated/ja.jsonl").read_text().splitlines()}
    again = {json.loads(line)["id"] for line in (tmp_path / "run/curated/ja.jsonl").read_text().splitlines()}
    assert ids == again and kept.num_kept == result.num_kept
    changed = config_for("run")
    changed.filters.ng_words.words = ["別の語"]
    with pytest.raises(UserError, match="filters.ng_words.words"):
        refilter(changed)
    with pytest.raises(UserError, match="refilterable=false"):
        refilter(plain)
