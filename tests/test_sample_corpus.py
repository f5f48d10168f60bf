"""The bundled sample corpus: reproducible, the right size, clean where it should be, dirty where planted."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import re
import statistics

import ftfy
import pytest

from kumihimo.sample import SAMPLE_DIR, make_corpus, sample_paths


@pytest.fixture(scope="module")
def corpus() -> make_corpus.Corpus:
    return make_corpus.generate()


def _read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    paths = sample_paths()
    return {
        "ja": _read_jsonl(gzip.decompress(paths["ja"].read_bytes())),
        "en": _read_jsonl(gzip.decompress(paths["en"].read_bytes())),
        "eval": _read_jsonl(paths["eval"].read_bytes()),
    }


def _by_kind(corpus, lang, *kinds):
    return [d for d in corpus.docs(lang) if d.kind in kinds]


# --- reproducibility -------------------------------------------------------------------------------------


def test_sample_paths():
    paths = sample_paths()
    assert set(paths) == {"ja", "en", "eval"}
    for p in paths.values():
        assert p.parent == SAMPLE_DIR and p.is_file(), p


def test_shipped_files_equal_fresh_generation(corpus):
    fresh = corpus.files()
    for name, data in fresh.items():
        shipped = (SAMPLE_DIR / name).read_bytes()
        if name.endswith(".gz"):
            # Compare payloads (a different zlib build may pick different deflate blocks) and the header.
            assert gzip.decompress(shipped) == gzip.decompress(data), (
                f"{name} is stale: run python -m kumihimo.sample.make_corpus"
            )
            assert shipped[:4] == b"\x1f\x8b\x08\x00", "gzip header must carry no file name or flags"
            assert shipped[4:8] == b"\x00\x00\x00\x00", "gzip mtime must be 0"
        else:
            assert shipped == data, f"{name} is stale: run python -m kumihimo.sample.make_corpus"


def test_generator_is_deterministic(corpus):
    again = make_corpus.generate().files()
    assert again == corpus.files()


# --- shape ----------------------------------------------------------------------------------------------------


def test_sizes_and_language_split():
    paths = sample_paths()
    ja = len(gzip.decompress(paths["ja"].read_bytes()))
    en = len(gzip.decompress(paths["en"].read_bytes()))
    assert 300_000 <= ja + en <= 450_000, (ja, en)
    assert 0.55 <= ja / (ja + en) <= 0.75, (ja, en)


def test_records_well_formed_and_ids_unique(shipped):
    ids = []
    for lang in ("ja", "en"):
        for rec in shipped[lang]:
            assert set(rec) == {"id", "text", "url"}
            assert isinstance(rec["text"], str) and rec["text"]
            assert re.match(r"^https://([a-z0-9-]+\.)?example\.[a-z]+/", rec["url"]), rec["url"]
            assert rec["id"].startswith(lang + "-")
            ids.append(rec["id"])
    ids += [r["id"] for r in shipped["eval"]]
    assert len(ids) == len(set(ids))


def test_no_line_separators_inside_records():
    # Mojibake contains C1 controls; they are \\u-escaped, so str.splitlines() cannot split a record.
    for key in ("ja", "en"):
        raw = gzip.decompress(sample_paths()[key].read_bytes()).decode("utf-8")
        assert raw.splitlines() == raw.rstrip("\n").split("\n")


def test_eval_set(shipped):
    ev = shipped["eval"]
    assert 15 <= len(ev) <= 25
    for r in ev:
        assert set(r) == {"id", "lang", "question", "passage", "answer"}
        assert r["lang"] in ("ja", "en") and len(r["passage"]) >= 80


EXPECTED_KINDS = {
    "ja": [
        "exactdup",
        "neardup",
        "mojibake",
        "garbled",
        "boilerplate",
        "spam",
        "short",
        "contam",
        "lang-ko",
        "lang-zh",
    ],
    "en": ["exactdup", "neardup", "boilerplate", "spam", "short", "contam", "lang-de"],
}


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_every_dirt_kind_is_planted(shipped, lang):
    ids = [r["id"] for r in shipped[lang]]
    for kind in EXPECTED_KINDS[lang]:
        n = sum(i.startswith(f"{lang}-dirty-{kind}-") for i in ids)
        assert n >= 2, (lang, kind, n)
    assert sum(i.startswith(f"{lang}-pii-") for i in ids) >= 2
    clean = [i for i in ids if re.fullmatch(rf"{lang}-\d{{4}}", i)]
    assert len(clean) > 0.7 * len(ids)


# --- clean documents pass the quality filters ---------------------------------------------------------


def _ja_ratios(text: str) -> dict[str, float]:
    chars = [c for c in text if not c.isspace()]
    n = len(chars)
    hira = sum("\u3041" <= c <= "\u309f" for c in chars)
    kata = sum("\u30a0" <= c <= "\u30ff" for c in chars)
    kanji = sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in chars)
    punct = sum("\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef" for c in chars)
    return {"hira": hira / n, "kata": kata / n, "ja": (hira + kata + kanji + punct) / n}


def test_japanese_clean_docs_pass_swallow_like_filters(corpus):
    docs = _by_kind(corpus, "ja", "clean", "pii", "contam", "neardup", "exactdup")
    assert len(docs) >= 100
    for d in docs:
        t = d.text
        assert len(t) >= 400, d.id
        r = _ja_ratios(t)
        assert r["hira"] >= 0.2 and r["kata"] <= 0.5 and r["ja"] >= 0.5, (d.id, r)
        sents = [s.strip() for s in re.split(r"[。！？]", t) if s.strip()]
        lengths = [len(s) for s in sents]
        assert 20 <= statistics.mean(lengths) <= 90 and max(lengths) <= 200, (d.id, lengths)
        lines = [ln for ln in t.split("\n") if ln.strip()]
        assert len(lines) == len(set(lines)), f"repeated line in {d.id}"
        assert not any(ln.endswith(("…", "・")) for ln in lines), d.id
        assert ftfy.fix_text(t) == t, d.id


def test_english_clean_docs_look_like_prose(corpus):
    stop = {"the", "and", "of", "to", "a", "in", "is", "it", "that", "for", "with", "i"}
    docs = _by_kind(corpus, "en", "clean", "pii", "contam", "neardup", "exactdup")
    assert len(docs) >= 60
    for d in docs:
        words = d.text.split()
        assert 80 <= len(words) <= 600, (d.id, len(words))
        lines = d.text.split("\n")
        assert len(lines) == len(set(lines)), d.id
        for para in lines[1:]:  # the first line is a title
            assert para.rstrip()[-1] in ".!?", (d.id, para)
        assert sum(w.lower().strip(".,!?") in stop for w in words) / len(words) > 0.1, d.id


# --- similarity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_random_clean_pairs_are_not_near_duplicates(corpus, lang):
    docs = _by_kind(corpus, lang, "clean")
    sigs = [make_corpus.shingles(d.text) for d in docs]
    rng = random.Random(0)
    pairs = rng.sample(list(itertools.combinations(range(len(docs)), 2)), 400)
    js = [make_corpus.jaccard(sigs[a], sigs[b]) for a, b in pairs]
    assert statistics.mean(js) < 0.08, statistics.mean(js)
    assert max(js) < 0.3, max(js)


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_planted_duplicates(corpus, lang):
    by_id = {d.id: d for d in corpus.docs(lang)}
    exact = _by_kind(corpus, lang, "exactdup")
    near = _by_kind(corpus, lang, "neardup")
    assert len(exact) >= 3 and len(near) >= 3
    for d in exact:
        src = by_id[d.source]
        assert src.kind == "clean" and d.text == src.text and d.url != src.url
    for d in near:
        src = by_id[d.source]
        j = make_corpus.jaccard(make_corpus.shingles(d.text), make_corpus.shingles(src.text))
        assert 0.8 <= j <= 0.95, (d.id, j)


# --- the other planted dirt ---------------------------------------------------------------------------------


def test_mojibake_is_repairable_and_garbled_is_not(corpus):
    moji = _by_kind(corpus, "ja", "mojibake")
    assert len(moji) >= 4
    assert any("\u0081" in d.text for d in moji)  # cp1252-style (sloppy)
    assert any("ã\u0081" in d.text for d in moji)  # latin-1-style
    for d in moji:
        assert _ja_ratios(d.text)["ja"] < 0.1, d.id
        assert ftfy.fix_text(d.text) == d.original, d.id
    garbled = _by_kind(corpus, "ja", "garbled")
    assert len(garbled) >= 2
    for d in garbled:
        assert d.text.count("\ufffd") >= 100, d.id
        assert ftfy.fix_text(d.text) != d.original, d.id


def test_pii_docs(corpus):
    text = "\n".join(d.text for lang in ("ja", "en") for d in _by_kind(corpus, lang, "pii"))
    assert re.search(r"[\w.]+@example\.(jp|com|org)", text)
    assert re.search(r"\b0\d{1,2}-\d{4}-\d{4}\b", text)  # 03-1234-5678, 090-1234-5678
    assert re.search(r"\+81[- ]\d", text)
    assert re.search(r"〒\d{3}-\d{4}", text)
    clean_text = "\n".join(d.text for lang in ("ja", "en") for d in _by_kind(corpus, lang, "clean"))
    assert "@" not in clean_text and "+81" not in clean_text and "〒" not in clean_text


def test_contaminated_docs_contain_eval_passages(corpus):
    passages = {r["id"]: r["passage"] for r in corpus.eval}
    contam = _by_kind(corpus, "ja", "contam") + _by_kind(corpus, "en", "contam")
    assert len(contam) >= 5
    for d in contam:
        assert passages[d.source] in d.text
    others = [d for lang in ("ja", "en") for d in corpus.docs(lang) if d.kind != "contam"]
    for p in passages.values():
        probe = p[10:40]
        assert not any(probe in d.text for d in others)


def test_other_languages_short_spam_boilerplate(corpus):
    docs = {d.id: d for lang in ("ja", "en") for d in corpus.docs(lang)}
    for i, d in docs.items():
        if "-lang-ko-" in i:
            assert sum("\uac00" <= c <= "\ud7a3" for c in d.text) > 250
        elif "-lang-zh-" in i:
            assert len(d.text) > 250 and not re.search("[\u3041-\u309f\u30a0-\u30ff]", d.text)
        elif "-lang-de-" in i:
            assert len(d.text.split()) > 80 and re.search(r"\b(und|ich|der|die)\b", d.text)
        elif "-dirty-short-" in i:
            assert len(d.text) < 80
        elif "-dirty-spam-" in i:
            assert d.text.lower().count("カジノ" if i.startswith("ja") else "casino") >= 10
        elif "-dirty-boilerplate-" in i:
            lines = d.text.split("\n")
            assert 1 - len(set(lines)) / len(lines) >= 0.3, i
            assert "All rights reserved" in d.text
