"""data_prep per-document stages: repair, language ID, quality filters, PII, decontamination."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from kumihimo.data_prep.config import (
    DecontamConfig,
    FiltersConfig,
    LangIdConfig,
    PiiConfig,
    RepairConfig,
)
from kumihimo.data_prep.decontam import Decontaminator, build_eval_index
from kumihimo.data_prep.ja_metrics import japanese_metrics
from kumihimo.data_prep.langid import identify
from kumihimo.data_prep.ngrams import duplicate_ngram_coverage, top_ngram_coverage
from kumihimo.data_prep.pii import PiiRedactor, luhn_valid, my_number_check_digit
from kumihimo.data_prep.quality import QualityFilter
from kumihimo.data_prep.repair import looks_suspicious, repair_text

FIXTURES = Path(__file__).parent / "fixtures" / "data_prep"
JA = (FIXTURES / "ja_docs.txt").read_text(encoding="utf-8").split("\n\n")
EN = (FIXTURES / "en_docs.txt").read_text(encoding="utf-8").split("\n\n")


def quality(**changes) -> QualityFilter:
    config = FiltersConfig()
    for key, value in changes.items():
        section, _, name = key.partition("__")
        setattr(getattr(config, section), name, value)
    return QualityFilter(config)


def reason(text: str, lang: str, qf: QualityFilter | None = None, url: str | None = None) -> str | None:
    verdict = (qf or quality()).check(text, lang, url)[1]
    return verdict[0] if verdict else None


# ---- repair ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["latin-1", "sloppy-windows-1252"])
def test_mojibake_of_japanese_is_repaired(codec):
    import ftfy.bad_codecs  # noqa: F401 - registers sloppy-windows-1252

    garbled = JA[0].encode("utf-8").decode(codec)
    assert looks_suspicious(garbled)
    text, drop, repaired = repair_text(garbled, RepairConfig())
    assert drop is None and repaired
    assert text == JA[0]


def test_unrepairable_text_is_dropped():
    # cp1252 with errors=replace loses bytes: the text keeps U+FFFD and mojibake pieces
    broken = JA[1].encode("utf-8").decode("cp1252", errors="replace")
    _, drop, _ = repair_text(broken, RepairConfig())
    assert drop in {"residual_mojibake", "replacement_chars"}
    _, drop, _ = repair_text("正しい文章の途中に\ufffd置換文字がある。", RepairConfig())
    assert drop == "replacement_chars"
    assert (
        repair_text("正しい文章の途中に\ufffd置換文字がある。", RepairConfig(max_replacement_chars=1))[1]
        is None
    )


def test_clean_text_is_untouched_and_accents_are_not_suspicious():
    assert not looks_suspicious("Café au lait, naïve résumé. 東京の「喫茶店」で…")
    assert repair_text(JA[2], RepairConfig()) == (JA[2], None, False)


def test_control_characters_and_whitespace_cleanup_keep_newlines():
    raw = "一行目\x00です。\u200b\r\n二行目\tです。   \n\n\n\n三行目\x85です。  "
    text, drop, _ = repair_text(raw, RepairConfig())
    assert drop is None
    assert text == "一行目です。\n二行目 です。\n\n三行目です。"
    assert repair_text(" \x00\u200b ", RepairConfig())[1] == "empty_after_cleanup"


def test_nfkc_is_optional_and_off_by_default():
    raw = "ＡＢＣ１２３ ｶﾀｶﾅ"
    assert repair_text(raw, RepairConfig())[0] == raw
    assert repair_text(raw, RepairConfig(nfkc=True))[0] == "ABC123 カタカナ"


# ---- language ID -----------------------------------------------------------------------------------


def test_language_identification():
    config = LangIdConfig()
    assert identify(JA[0], config)[0] == "ja"
    assert identify(EN[0], config)[0] == "en"
    assert identify("오늘은 날씨가 좋아서 공원에 산책하러 갔습니다.", config)[0] == "ko"
    assert identify("这是一个关于城市交通和公共自行车的中文段落，我们今天去公园散步。", config)[0] == "zh"
    assert (
        identify("Dies ist ein deutscher Text über das Wetter in der Stadt und die Leute.", config)[0] == "de"
    )
    # kana present => ja, even inside mostly-Latin text
    assert identify("Tokyo Station ni tsukimashita. 東京駅に着きました。ありがとう", config)[0] == "ja"


# ---- Japanese quality rules ------------------------------------------------------------------------


def test_clean_japanese_documents_pass():
    for doc in JA:
        assert reason(doc, "ja") is None, doc[:30]


def test_japanese_length_rules():
    assert reason(JA[0][:300], "ja") == "ja_too_short"
    # 325 Japanese letters and an English paragraph: long enough, Japanese enough, too few Japanese letters
    assert reason(JA[0][:330] + "\n" + EN[0][:250], "ja") == "ja_few_japanese_chars"


def test_japanese_script_ratio_rules():
    hira_to_kata = str.maketrans({chr(c): chr(c + 0x60) for c in range(0x3041, 0x3097)})
    assert reason(JA[0].translate(hira_to_kata), "ja") == "ja_low_hiragana_ratio"
    rng = random.Random(0)  # a listing of katakana (not repeating, so the repetition rules stay quiet)
    letters = [chr(c) for c in range(0x30A1, 0x30F7)]
    katakana = "\n".join("".join(rng.choice(letters) for _ in range(40)) + "。" for _ in range(13))
    assert reason(JA[0] + "\n" + katakana, "ja") == "ja_high_katakana_ratio"
    mixed = JA[0] + "\n" + " ".join(f"item{i:03d}=value{i * 7:04d}" for i in range(45))
    assert reason(mixed, "ja") == "ja_low_japanese_ratio"


def test_japanese_sentence_rules():
    assert reason(JA[0].replace("、", "。"), "ja") == "ja_short_sentences"
    one_sentence = JA[1].replace("。", "、").replace("\n", "")
    assert reason(one_sentence, "ja") == "ja_long_sentences"
    lines = JA[2].split("\n")
    long_line = lines[2].replace("。", "、") + lines[3].replace("。", "、") + lines[4]
    assert len(long_line) > 200
    assert reason("\n".join([*JA[4].split("\n"), long_line]), "ja") == "ja_sentence_too_long"
    ellipsis = JA[0].replace("。", "…\n")
    assert reason(ellipsis, "ja") == "ja_ellipsis_sentences"


def test_japanese_repetition_rules():
    assert reason(JA[0] + "\n" + JA[0], "ja") == "ja_duplicate_paragraphs"  # lines, in Swallow's terms
    sentences = JA[4].split("\n")
    repeated = sentences[2] + sentences[3]
    assert reason(JA[4] + "\n" + repeated, "ja") == "ja_duplicate_sentence_chars"
    # the same words with other punctuation are not equal sentences, but their 5-grams repeat
    assert reason(JA[4] + "\n" + repeated.replace("。", "！"), "ja") == "ja_duplicate_5grams"
    # a short phrase said twice stays under every limit
    assert reason(JA[4] + "\nよろしくお願いします。\nよろしくお願いします。", "ja") is None


def test_swallow_repetition_values_by_hand():
    # 10 characters, 6 five-grams of which 5 are distinct and 1 (あいうえお) occurs twice: 1/5
    metrics = japanese_metrics("あいうえおあいうえお")
    assert metrics["duplicate_5gram_character_fraction"] == pytest.approx(1 / 5)
    assert metrics["duplicate_6gram_character_fraction"] == 0.0
    # 9 two-grams; あい, いう, うえ, えお occur twice each: the top one is 2 of 9
    assert metrics["top_2gram_character_fraction"] == pytest.approx(2 / 9)
    text = "段落その一です。段落その一です。\n\n別の行です！\n段落その一です。"
    # sentences: 段落その一です。 x3 and 別の行です！ -> 2 of 4 repeat; lines: 3 non-blank + 1 blank
    ours = japanese_metrics(text, count_blank_lines=False)
    assert ours["duplicate_sentence_fraction"] == pytest.approx(2 / 4)
    assert ours["duplicate_paragraph_fraction"] == 0.0  # the three lines differ
    swallow = japanese_metrics(text, count_blank_lines=True)
    assert swallow["duplicate_paragraph_fraction"] == 0.0  # one blank line: nothing to repeat yet
    blank_twice = japanese_metrics(text.replace("\n\n", "\n\n\n"), count_blank_lines=True)
    assert blank_twice["duplicate_paragraph_fraction"] == pytest.approx(1 / 5)
    assert japanese_metrics(text.replace("\n\n", "\n\n\n"))["duplicate_paragraph_fraction"] == 0.2


def test_ngram_coverage_values():
    items = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5, 8, 7, 6, 0, 11, 12, 13, 14, 15], dtype=np.uint32)
    weights = np.ones(len(items))
    # "1 2 3 4 5" occurs twice: its second occurrence (5 of 20 items) is a repeat
    assert duplicate_ngram_coverage(items, weights, 5) == pytest.approx(0.25)
    assert duplicate_ngram_coverage(items, weights, 4) == pytest.approx(0.25)  # two overlapping repeats
    assert duplicate_ngram_coverage(np.array([7] * 10), np.ones(10), 5) == pytest.approx(
        0.9
    )  # all but the first
    assert duplicate_ngram_coverage(items, weights, 6) == 0.0
    # the most frequent 2-gram occurs twice and covers 4 of 20 items
    assert top_ngram_coverage(items, weights, 2) == pytest.approx(0.2)
    assert top_ngram_coverage(np.arange(30, dtype=np.uint32), np.ones(30), 3) == 0.0


# ---- English rules ---------------------------------------------------------------------------------


def test_clean_english_documents_pass():
    for doc in EN:
        assert reason(doc, "en") is None, doc[:30]


def test_english_rules():
    words = EN[0].split()
    assert reason(" ".join(words[:30]), "en") == "en_few_words"
    assert reason(" ".join(["it is an ox, so do go by me"] * 12), "en") == "en_mean_word_length"
    assert reason(EN[0] + " " + " ".join(f"#tag{i}" for i in range(20)), "en") == "en_symbol_ratio"
    bullets = "\n".join(f"- {w} item number {i} in the list" for i, w in enumerate(words[:20]))
    assert reason(bullets, "en") == "en_bullet_lines"
    trailing = "\n".join(" ".join(words[i : i + 12]) + "..." for i in range(0, 96, 12))
    assert reason(trailing, "en") == "en_ellipsis_lines"
    numbers = EN[1] + " " + " ".join(str(1000 + i) for i in range(40))
    assert reason(numbers, "en") == "en_non_alpha_words"
    no_stop = (
        "Quick brown foxes jump over lazy dogs while clever cats watch from sunny windows. "
        "Bright mornings bring fresh coffee, warm bread, cheerful neighbours, busy streets. "
    ) * 4
    assert reason(no_stop, "en") == "en_few_stop_words"
    assert reason(EN[2] + "\n" + EN[2], "en") == "en_duplicate_lines"


# ---- shared rules ----------------------------------------------------------------------------------


def test_boilerplate_lines_are_removed_and_lorem_ipsum_dropped():
    text = (
        EN[0] + "\nThis site uses cookies to improve your experience.\nPlease enable JavaScript to continue."
    )
    cleaned, verdict, num_removed = quality().check(text, "en", None)
    assert verdict is None and num_removed == 2 and cleaned == EN[0]
    ja = JA[0] + "\n当サイトはCookieを使用しています。\nJavaScriptを有効にしてください。"
    cleaned, verdict, num_removed = quality().check(ja, "ja", None)
    assert verdict is None and num_removed == 2 and cleaned == JA[0]
    mostly = "Accept cookies\nPrivacy policy\nTerms of use\n" + EN[1].split("\n")[0]
    assert reason(mostly, "en") == "boilerplate_lines"
    assert reason(EN[1] + "\nLorem ipsum dolor sit amet.", "en") == "boilerplate_document"


def test_ng_words_reject_only_above_the_count_threshold():
    qf = quality(
        ng_words__words=["出会い系", "無料登録"], ng_words__max_matches=2, ng_words__max_char_ratio=0.5
    )
    one = JA[0] + "\n出会い系サイトの被害について注意を呼びかけている。"
    assert reason(one, "ja", qf) is None
    three = JA[0] + "\n出会い系で無料登録、今すぐ無料登録！"
    assert reason(three, "ja", qf) == "ng_words"
    dense = quality(ng_words__words=["出会い系"], ng_words__max_char_ratio=0.01)
    two = JA[0] + "\n出会い系、出会い系。"
    assert reason(two, "ja", dense) == "ng_word_chars"


def test_url_host_block_list(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# blocked\nbad.example\n", encoding="utf-8")
    qf = quality(urls__blocked_hosts=["spam.example.com"], urls__blocked_hosts_file=str(hosts))
    assert reason(JA[0], "ja", qf, "https://spam.example.com/page") == "blocked_host"
    assert reason(JA[0], "ja", qf, "http://www.bad.example/x?y=1") == "blocked_host"
    assert reason(JA[0], "ja", qf, "https://notbad.example/") is None
    assert reason(JA[0], "ja", qf, None) is None


def test_compression_ratio_window():
    config = FiltersConfig(min_compression_ratio=0.3, max_compression_ratio=0.7)
    assert QualityFilter(config).check(JA[0], "ja", None)[1] is None
    repetitive = "あいうえおかきくけこ" * 60
    assert QualityFilter(config).check(repetitive, "ja", None)[1][0] == "low_compression_ratio"


# ---- PII -------------------------------------------------------------------------------------------


def redact(text: str) -> tuple[str, dict]:
    out, counts = PiiRedactor(PiiConfig()).redact(text)
    return out, dict(counts)


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("連絡先は taro.yamada@example.co.jp です。", "連絡先は <EMAIL> です。", "email"),
        ("電話は03-1234-5678まで", "電話は<PHONE>まで", "phone"),
        ("携帯 090-1234-5678 へ", "携帯 <PHONE> へ", "phone"),
        ("携帯09012345678へ", "携帯<PHONE>へ", "phone"),
        ("全角０３－１２３４－５６７８です", "全角<PHONE>です", "phone"),
        ("代表 (03) 1234-5678", "代表 <PHONE>", "phone"),
        ("call +81-3-1234-5678 now", "call <PHONE> now", "phone"),
        ("call +1 (555) 123-4567 now", "call <PHONE> now", "phone"),
        ("個人番号 1234 5678 9018 を", "個人番号 <MY_NUMBER> を", "my_number"),
        ("番号123456789018です", "番号<MY_NUMBER>です", "my_number"),
        ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "credit_card"),
        ("card 5500-0000-0000-0004.", "card <CREDIT_CARD>.", "credit_card"),
        ("〒100-0001 東京都", "<POSTAL_CODE> 東京都", "postal_code"),
        ("住所 160-0023 新宿区", "住所 <POSTAL_CODE> 新宿区", "postal_code"),
        ("server 192.168.10.1.", "server <IP_ADDRESS>.", "ip_address"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 <IP_ADDRESS> here", "ip_address"),
    ],
)
def test_pii_positive(text, expected, kind):
    out, counts = redact(text)
    assert out == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "個人番号 1234 5678 9012 は検査数字が違う",  # wrong My Number check digit
        "card 4111 1111 1111 1112 fails Luhn",
        "version 1.2.3.4.5 and 999.1.1.1",
        "time 12:30:45 and std::vector<int>",
        "date 2024-05-01 and order 12345678",
        "follow @someone on social media",
        "code 1000-0001 is not a postal code",
        "total 0000 0000 0000 is not a My Number",
    ],
)
def test_pii_negative(text):
    assert redact(text) == (text, {})


def test_pii_check_digit_algorithms():
    assert my_number_check_digit("12345678901") == 8
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_pii_types_and_placeholder_are_configurable():
    redactor = PiiRedactor(PiiConfig(types=["email"], placeholder="[{type}]"))
    out, counts = redactor.redact("a@example.com 03-1234-5678")
    assert out == "[EMAIL] 03-1234-5678" and dict(counts) == {"email": 1}
    assert PiiRedactor(PiiConfig(enabled=False)).redact("a@example.com")[0] == "a@example.com"


# ---- decontamination -------------------------------------------------------------------------------


def test_decontamination_by_word_and_char_ngrams(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(
        json.dumps({"question": EN[1].split("\n")[0][:300], "id": 1})
        + "\n"
        + json.dumps(
            {"question": "次の文を読んで答えなさい。" + JA[2].split("\n")[1], "answer": "A"},
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    text_eval = tmp_path / "eval.txt"
    text_eval.write_text(JA[4].split("\n")[2] + "\n", encoding="utf-8")
    config = DecontamConfig(eval_paths=[str(eval_file), str(text_eval)])
    decon = Decontaminator(build_eval_index(config), config)
    assert decon.check(EN[1]) is not None
    assert "word 13-grams" in decon.check(EN[1])
    assert decon.check(JA[2]) is not None and "char 25-grams" in decon.check(JA[2])
    assert decon.check(JA[4]) is not None
    assert decon.check(EN[0]) is None and decon.check(JA[0]) is None
    # spacing and width differences do not hide a copy
    assert decon.check(EN[1].upper().replace(" ", "  ")) is not None
    strict = DecontamConfig(eval_paths=[str(eval_file)], min_matches=1000)
    assert Decontaminator(build_eval_index(strict), strict).check(EN[1]) is None
