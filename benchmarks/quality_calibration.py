"""Real Japanese (and English) documents from Debian's documentation packages, and junk made from them.

    mkdir -p /work/peers/ja-docs && cd /work/peers/ja-docs
    apt-get download gimp-help-ja libreoffice-help-ja lilypond-doc-html-ja gimp-help-en
    for f in *.deb; do dpkg -x "$f" "${f%%_*}"; done
    python benchmarks/quality_calibration.py --docs /work/peers/ja-docs --out /tmp/calibration

Writes real_ja.jsonl, junk_ja.jsonl, real_en.jsonl, junk_en.jsonl (one {"id", "text", "kind"} per line;
kind names the package or the junk recipe). Real documents are HTML pages with code, navigation, scripts
and tables removed, block elements one per line, >= 400 characters. A quarter of them are dressed as
web articles (heading, byline, blank lines between paragraphs, copyright footer); they must survive.
Junk is made deterministically from the real text: keyword stuffing, menus and link lists, product
listings, repeated paragraphs, tag clouds, number tables, mojibake and boilerplate-heavy pages.

The texts are GPL (GIMP help), MPL-2.0 (LibreOffice help) and GFDL (LilyPond) documentation: keep them
outside the repository. `python benchmarks/quality_calibration.py --fixture tests/fixtures/...` writes
the small excerpt the tests use.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

PACKAGES = {
    "ja": {
        "gimp": "gimp-help-ja/usr/share/gimp/2.0/help/ja",
        "libreoffice": "libreoffice-help-ja/usr/share/libreoffice/help/ja",
        "lilypond": "lilypond-doc-html-ja",
    },
    "en": {"gimp": "gimp-help-en/usr/share/gimp/2.0/help/en"},
}
_BLOCKS = {"p", "h1", "h2", "h3", "h4", "li", "dt", "dd", "title"}
_DROP = ("script", "style", "pre", "code", "kbd", "table", "samp", "tt")
_SPACES = re.compile(r"\s+")


def page_text(path: Path) -> str:
    """The page's block elements, one per line, without code, tables and navigation."""
    import lxml.html

    try:
        root = lxml.html.fromstring(path.read_bytes())
    except Exception:  # noqa: BLE001 - a page lxml cannot read is skipped
        return ""
    for bad in root.xpath("//" + " | //".join(_DROP)):
        bad.drop_tree()
    for nav in root.xpath(
        "//*[contains(@class,'navheader') or contains(@class,'navfooter') or @id='navbar']"
    ):
        nav.drop_tree()
    lines = []
    for element in root.iter(*_BLOCKS):
        if element.tag == "title":
            continue
        if any(parent.tag in _BLOCKS for parent in element.iterancestors()):
            continue  # nested blocks are part of their parent's text
        text = _SPACES.sub(" ", element.text_content()).strip()
        if text:
            lines.append(text)
    return "\n".join(lines)


def real_documents(docs: Path, lang: str, min_chars: int = 400) -> list[dict]:
    out = []
    for kind, folder in PACKAGES[lang].items():
        root = docs / folder
        if not root.is_dir():
            continue
        pattern = "*.ja.html" if kind == "lilypond" else "*.html"
        for path in sorted(root.rglob(pattern)):
            if kind == "lilypond" and lang == "ja" and path.name.count(".") != 2:
                continue
            text = page_text(path)
            if len(text) >= min_chars:
                out.append({"id": f"{kind}:{path.relative_to(root)}", "text": text, "kind": kind})
    from kumihimo.data_prep.config import LangIdConfig
    from kumihimo.data_prep.langid import identify_batch

    # untranslated pages ship in the Japanese packages: keep what kumihimo's language ID calls `lang`
    labels = identify_batch([d["text"] for d in out], LangIdConfig())
    seen, unique = set(), []
    for doc, (label, confidence) in zip(out, labels):
        if label == lang and confidence >= 0.5 and doc["text"] not in seen:  # copies ship under two names
            seen.add(doc["text"])
            unique.append(doc)
    return unique


def as_article(doc: dict, rng: random.Random, lang: str) -> dict:
    """The same text dressed as a web article: heading, byline, blank-line paragraphs, copyright."""
    lines = doc["text"].split("\n")
    if lang == "ja":
        byline = f"{2015 + rng.randrange(10)}年{rng.randrange(1, 13)}月{rng.randrange(1, 29)}日 文・編集部"
        footer = "Copyright © 2024 Example Inc. All rights reserved."
    else:
        byline = f"By the editors, {rng.randrange(1, 29)} May {2015 + rng.randrange(10)}"
        footer = "Copyright © 2024 Example Inc. All rights reserved."
    body = "\n\n".join(lines[1:]) if len(lines) > 1 else lines[0]
    text = f"{lines[0]}\n{byline}\n\n{body}\n\n{footer}"
    return {"id": doc["id"] + "#article", "text": text, "kind": doc["kind"] + "-article"}


def _sentences(texts: list[str], lang: str) -> list[str]:
    split = re.compile(r"(?<=[。！？])" if lang == "ja" else r"(?<=[.!?]) ")
    return [
        s.strip() for t in texts for line in t.split("\n") for s in split.split(line) if len(s.strip()) > 8
    ]


def _words(texts: list[str], lang: str) -> list[str]:
    if lang == "ja":  # runs of katakana or kanji: the nouns of Japanese text
        return re.findall(r"[ァ-ヺー]{2,}|[一-龯]{2,}", "\n".join(texts))
    return [w for w in re.findall(r"[A-Za-z]{4,}", "\n".join(texts))]


def junk_documents(real: list[dict], lang: str, per_kind: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    texts = [d["text"] for d in real]
    sentences = _sentences(texts, lang)
    words = _words(texts, lang)
    ja = lang == "ja"
    yen, sep = ("円", "、") if ja else ("USD", ", ")

    def pick(items, k):
        return [rng.choice(items) for _ in range(k)]

    def stuffing():
        keys = pick(words, 4)
        parts = []
        for sentence in pick(sentences, 6):
            parts.append(sentence)
            parts.append(sep.join(keys * 3) + ("。" if ja else "."))
        return "\n".join(parts)

    def menu():
        return "\n".join(pick(words, rng.randrange(60, 140)))

    def links():
        return "\n".join(f"{w} | {v} | {u} » " for w, v, u in zip(*(iter(pick(words, 180)),) * 3))

    def products():
        rows = []
        for _ in range(rng.randrange(25, 50)):
            name = "".join(pick(words, 2))
            rows.append(
                f"{name} {rng.randrange(300, 99000):,}{yen} ({'税込' if ja else 'incl. tax'}) ★{rng.randrange(1, 6)}"
            )
        return "\n".join(rows)

    def repeated():
        paragraph = "".join(pick(sentences, 3)) if ja else " ".join(pick(sentences, 3))
        return "\n".join([paragraph] * rng.randrange(3, 7) + pick(sentences, 2))

    def tag_cloud():
        return " ".join(f"#{w}" for w in pick(words, rng.randrange(120, 250)))

    def numbers():
        return "\n".join(
            " ".join(f"{rng.uniform(0, 1000):.2f}" for _ in range(8)) for _ in range(rng.randrange(30, 60))
        )

    def mojibake():  # decoded with the wrong codec, bytes lost: beyond repair (ftfy fixes lossless cases)
        text = "\n".join(pick(sentences, 12))
        if ja:
            return text.encode("utf-8").decode("cp1252", errors="replace")
        return text.encode("utf-8").decode("utf-16-le", errors="replace")  # ASCII survives cp1252 unchanged

    def boilerplate():
        menu_lines = pick(words, 30)
        legal = (
            ("ホーム", "会社概要", "お問い合わせ", "サイトマップ", "ログイン", "新規登録")
            if ja
            else ("Home", "About us", "Contact", "Sitemap", "Log in", "Sign up")
        )
        core = pick(sentences, 2)
        return "\n".join([*legal, *menu_lines, *core, *legal, *menu_lines[:15]])

    makers = [stuffing, menu, links, products, repeated, tag_cloud, numbers, mojibake, boilerplate]
    out = []
    for make in makers:
        for i in range(per_kind):
            out.append({"id": f"junk:{make.__name__}:{i}", "text": make(), "kind": make.__name__})
    return out


def build(docs: Path, lang: str, junk_per_kind: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    real = real_documents(docs, lang)
    rng = random.Random(seed)
    real += [as_article(d, rng, lang) for d in real if rng.random() < 0.25]
    return real, junk_documents(real, lang, junk_per_kind, seed)


def write_jsonl(path: Path, docs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=Path, default=Path("/work/peers/ja-docs"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/calibration"))
    parser.add_argument("--junk-per-kind", type=int, default=60)
    parser.add_argument("--fixture", type=Path, help="write a small excerpt (for tests) to this JSONL file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for lang in ("ja", "en"):
        real, junk = build(args.docs, lang, args.junk_per_kind if lang == "ja" else args.junk_per_kind // 2)
        if not real:
            raise SystemExit(f"no {lang} documents under {args.docs}; see the instructions at the top")
        write_jsonl(args.out / f"real_{lang}.jsonl", real)
        write_jsonl(args.out / f"junk_{lang}.jsonl", junk)
        print(f"{lang}: {len(real)} real, {len(junk)} junk -> {args.out}")
    if args.fixture:
        rng = random.Random(1)
        real, _ = build(args.docs, "ja", 1)
        plain = [d for d in real if not d["kind"].endswith("article") and len(d["text"]) < 1500]
        rng.shuffle(plain)
        write_jsonl(args.fixture, plain[:24])
        print(f"fixture: {args.fixture}")


if __name__ == "__main__":
    main()
