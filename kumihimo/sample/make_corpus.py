"""Deterministic generator for the bundled bilingual sample corpus.

    python -m kumihimo.sample.make_corpus            # rewrite ja.jsonl.gz, en.jsonl.gz, eval.jsonl
    python -m kumihimo.sample.make_corpus --check    # exit 1 if the shipped files are stale

Standard library only. Clean documents are composed from the hand-written sentence pools in
``_material_ja`` / ``_material_en``; planted dirt (duplicates, mojibake, boilerplate, PII, other
languages, short docs, spam, eval contamination) comes from ``_material_dirt``. Every planted
document has a tagged id (``ja-dirty-neardup-003``, ``en-pii-001``, ...); see README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kumihimo.sample import _material_dirt as dirt
from kumihimo.sample import _material_en as mat_en
from kumihimo.sample import _material_ja as mat_ja

SEED = 20250611
SAMPLE_DIR = Path(__file__).resolve().parent

# Size targets (UTF-8 bytes of the uncompressed JSONL). Clean documents are added until reached.
TARGET_CLEAN_BYTES = {"ja": 195_000, "en": 118_000}
# Two clean documents of the same language never exceed this character 5-gram Jaccard.
MAX_CLEAN_JACCARD = 0.2
NEARDUP_RANGE = (0.8, 0.95)

# How many of each planted kind, per language.
COUNTS = {
    "ja": {
        "exactdup": 4,
        "neardup": 5,
        "pii": 4,
        "contam": 4,
        "boilerplate": 3,
        "spam": 3,
        "short": 5,
        "mojibake": 4,
        "garbled": 2,
    },
    "en": {"exactdup": 3, "neardup": 3, "pii": 2, "contam": 3, "boilerplate": 2, "spam": 2, "short": 4},
}
DOMAINS = {"ja": "https://example.jp", "en": "https://example.com"}


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    url: str
    kind: str  # clean, pii, exactdup, neardup, mojibake, garbled, boilerplate, spam, short, lang, contam
    source: str | None = None  # clean doc id (dups) or eval id (contam) this doc derives from
    original: str | None = None  # mojibake/garbled: the text before it was corrupted

    def record(self) -> dict:
        return {"id": self.id, "text": self.text, "url": self.url}


@dataclass
class Corpus:
    ja: list[Doc] = field(default_factory=list)
    en: list[Doc] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)

    def docs(self, lang: str) -> list[Doc]:
        return self.ja if lang == "ja" else self.en

    def files(self) -> dict[str, bytes]:
        """File name -> exact bytes to ship."""
        return {
            "ja.jsonl.gz": gzip_bytes(jsonl_bytes(d.record() for d in self.ja)),
            "en.jsonl.gz": gzip_bytes(jsonl_bytes(d.record() for d in self.en)),
            "eval.jsonl": jsonl_bytes(self.eval),
        }


# --- serialization -------------------------------------------------------------------------------------
_UNSAFE = re.compile("[\u0080-\u009f\u2028\u2029]")


def jsonl_bytes(records) -> bytes:
    """One JSON object per line, UTF-8. C1 controls and U+2028/2029 (present in mojibake) are
    \\u-escaped so that no reader (str.splitlines treats U+0085 as a line break) can split a record."""
    lines = []
    for rec in records:
        line = json.dumps(rec, ensure_ascii=False)
        lines.append(_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", line))
    return ("\n".join(lines) + "\n").encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """gzip with mtime=0 and no file name in the header, so the output is reproducible."""
    return gzip.compress(data, compresslevel=9, mtime=0)


# --- similarity ------------------------------------------------------------------------------------------
def shingles(text: str, n: int = 5) -> frozenset[str]:
    return frozenset(text[i : i + n] for i in range(max(len(text) - n + 1, 1)))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# --- composition of clean documents --------------------------------------------------------------------
@dataclass
class Draft:
    """A clean document before rendering: a title and paragraphs drawn from one to three topics
    (blog-style posts often wander from the weather to dinner to the garden)."""

    lang: str
    topics: list[dict]
    values: dict
    title: str
    paragraphs: list[list[str]]
    used: set[tuple[int, int]]  # (index into topics, index into that topic's sentence pool)

    @property
    def slug(self) -> str:
        return self.topics[0]["slug"]

    def render(self) -> str:
        sep = "" if self.lang == "ja" else " "
        return "\n".join([self.title] + [sep.join(p) for p in self.paragraphs if p])


def _fill(template: str, values: dict, lang: str) -> str:
    s = template.format(**values)
    if lang == "en":
        s = s[0].upper() + s[1:]
    return s


def _size(sentences: list[str], lang: str) -> int:
    return sum(len(s) for s in sentences) if lang == "ja" else sum(len(s.split()) for s in sentences)


def compose(rng: random.Random, lang: str, topics: list[dict]) -> Draft:
    """Title from the first topic, then one section of 4-7 pool sentences (kept in pool order, split
    into paragraphs of 2-4) per topic, until the document is long enough."""
    mat = mat_ja if lang == "ja" else mat_en
    slots = dict(mat.GLOBAL_SLOTS)
    for t in reversed(topics):
        slots.update(t["slots"])
    values = {k: rng.choice(v) for k, v in sorted(slots.items())}
    title = _fill(rng.choice(topics[0]["titles"]), values, lang)
    minimum = 420 if lang == "ja" else 100  # characters / words
    paragraphs: list[list[str]] = []
    used: set[tuple[int, int]] = set()
    total = 0
    for ti, topic in enumerate(topics):
        if ti >= 2 and total >= minimum:
            break
        pool = topic["sentences"]
        k = rng.randint(4, 7)
        if ti == len(topics) - 1:  # last section: make sure the document reaches the minimum
            order = rng.sample(range(len(pool)), len(pool))
            chosen = order[:k]
            while total + _size([_fill(pool[i], values, lang) for i in chosen], lang) < minimum:
                chosen = order[: len(chosen) + 1]
        else:
            chosen = rng.sample(range(len(pool)), k)
        chosen.sort()
        used.update((ti, i) for i in chosen)
        sentences = [_fill(pool[i], values, lang) for i in chosen]
        total += _size(sentences, lang)
        if ti > 0 and rng.random() < 0.6:
            sentences.insert(0, rng.choice(mat.TRANSITIONS))
        k = 0
        section = []
        while k < len(sentences):
            step = rng.randint(2, 4)
            section.append(sentences[k : k + step])
            k += step
        if len(section) > 1 and len(section[-1]) == 1:
            section[-2].extend(section.pop())
        paragraphs.extend(section)
    return Draft(lang, topics, values, title, paragraphs, used)


def _clean_drafts(rng: random.Random, lang: str, target_bytes: int, extra: int) -> list[Draft]:
    """Clean drafts, mutually dissimilar, until their JSONL size reaches target_bytes; then `extra`
    more (sources for mojibake, which must not otherwise appear in the corpus)."""
    mat = mat_ja if lang == "ja" else mat_en
    drafts: list[Draft] = []
    sigs: list[frozenset[str]] = []
    size, n_extra, t = 0, 0, 0
    misses = 0
    while size < target_bytes or n_extra < extra:
        first = mat.TOPICS[t % len(mat.TOPICS)]
        t += 1
        for _ in range(30):
            others = [x for x in mat.TOPICS if x is not first]
            d = compose(rng, lang, [first, *rng.sample(others, rng.choice([1, 1, 2, 2, 2]))])
            sig = shingles(d.render())
            if all(jaccard(sig, s) <= MAX_CLEAN_JACCARD for s in sigs):
                break
        else:
            misses += 1
            if misses > 5 * len(mat.TOPICS):
                raise RuntimeError(f"{lang}: sentence pools too small to reach {target_bytes} bytes")
            continue
        drafts.append(d)
        sigs.append(sig)
        if size < target_bytes:
            size += len(jsonl_bytes([{"id": "x" * 12, "text": d.render(), "url": "u" * 40}]))
        else:
            n_extra += 1
    return drafts


# --- planted dirt ------------------------------------------------------------------------------------------
def _near_dup(rng: random.Random, d: Draft) -> str:
    """A copy of d with a sentence or two swapped/dropped/edited; 5-gram Jaccard within NEARDUP_RANGE."""
    base = d.render()
    base_sig = shingles(base)
    unused = [
        t["sentences"][i]
        for ti, t in enumerate(d.topics)
        for i in range(len(t["sentences"]))
        if (ti, i) not in d.used
    ]
    for _ in range(200):
        paras = [list(p) for p in d.paragraphs]
        n_edits = rng.randint(1, 2)
        for _ in range(n_edits):
            pi = rng.randrange(len(paras))
            si = rng.randrange(len(paras[pi]))
            op = rng.choice(["replace", "drop", "edit"] if len(paras[pi]) > 1 else ["replace", "edit"])
            if op == "replace" and unused:
                paras[pi][si] = _fill(rng.choice(unused), d.values, d.lang)
            elif op == "drop":
                del paras[pi][si]
            else:  # small wording change: a clause added to the sentence
                s = paras[pi][si]
                if d.lang == "ja":
                    paras[pi][si] = s[:-1] + "ね。" if s.endswith("す。") else "実は、" + s
                else:
                    paras[pi][si] = "Honestly, " + s[0].lower() + s[1:]
        sep = "" if d.lang == "ja" else " "
        text = "\n".join([d.title] + [sep.join(p) for p in paras if p])
        j = jaccard(base_sig, shingles(text))
        if NEARDUP_RANGE[0] <= j <= NEARDUP_RANGE[1]:
            return text
    raise RuntimeError("could not make a near duplicate in range")


def _sloppy_cp1252(data: bytes) -> str:
    """Decode as Windows-1252, mapping its five undefined bytes to U+0081 etc. (what browsers do)."""
    out = []
    for b in data:
        try:
            out.append(bytes([b]).decode("cp1252"))
        except UnicodeDecodeError:
            out.append(chr(b))
    return "".join(out)


def _garble(rng: random.Random, text: str, style: int) -> str:
    if style == 0:  # Shift_JIS bytes read as UTF-8: mostly U+FFFD, information lost
        return text.encode("shift_jis", errors="replace").decode("utf-8", errors="replace")
    # a transfer that lost most non-ASCII characters
    return "".join("\ufffd" if ord(c) > 0x7F and rng.random() < 0.6 else c for c in text)


def _spam(rng: random.Random, lang: str) -> str:
    words = dirt.SPAM_JA_WORDS if lang == "ja" else dirt.SPAM_EN_WORDS
    head = words[:4]
    lines = []
    for _ in range(rng.randint(14, 22)):
        line = head + rng.sample(words, rng.randint(2, 5))
        lines.append(" ".join(line))
    if lang == "ja":
        lines.insert(0, "【期間限定】カジノ 無料 ボーナス 今すぐ登録")
        lines.append("今すぐ登録で無料ボーナス。カジノで高額当選のチャンス。")
    else:
        lines.insert(0, "FREE CASINO BONUS - CLICK NOW")
        lines.append("Register now to claim your free casino bonus and win big today.")
    return "\n".join(lines)


def _boilerplate(rng: random.Random, lang: str, variant: int, filler: Draft) -> str:
    b = dirt.BOILER_JA if lang == "ja" else dirt.BOILER_EN
    sep = "" if lang == "ja" else " "
    more = "続きを読む" if lang == "ja" else "Read more"
    if variant == 0:  # nothing but chrome; navigation and copyright repeated
        lines = [b["nav"], b["cookie"], b["login"]]
        for _ in range(8):
            lines += [b["nav"], b["login"], b["pagetop"]]
        lines += [b["copyright"]] * 6 + [b["footer"]]
    elif variant == 1:  # a little real content buried in chrome
        body = [sep.join(p) for p in filler.paragraphs[:2]]
        lines = [b["nav"], b["cookie"], b["login"], filler.title, *body, b["share"], b["share"], b["share"]]
        lines += [b["pagetop"], b["footer"]] + [b["copyright"]] * 5 + [b["nav"]] * 3
    else:  # a listing page: the same teaser line many times
        lines = [b["nav"], b["cookie"]]
        for _ in range(12):
            lines += [filler.title, more]
        lines += [b["footer"], b["copyright"], b["copyright"], b["copyright"]]
    return "\n".join(lines)


def _insert_paragraph(rng: random.Random, d: Draft, paragraph: list[str]) -> str:
    paras = [list(p) for p in d.paragraphs]
    paras.insert(rng.randint(1, len(paras)), paragraph)
    sep = "" if d.lang == "ja" else " "
    return "\n".join([d.title] + [sep.join(p) for p in paras])


# --- the whole corpus ---------------------------------------------------------------------------------------
def _eval_records() -> list[dict]:
    out, n = [], {"ja": 0, "en": 0}
    for lang, q, passage, answer in dirt.EVAL_RECORDS:
        n[lang] += 1
        out.append(
            {
                "id": f"eval-{lang}-{n[lang]:03d}",
                "lang": lang,
                "question": q,
                "passage": passage,
                "answer": answer,
            }
        )
    return out


def _build_lang(rng: random.Random, lang: str, evals: list[dict]) -> list[Doc]:
    counts = COUNTS[lang]
    dom = DOMAINS[lang]
    n_hidden = counts.get("mojibake", 0) + counts.get("garbled", 0)
    drafts = _clean_drafts(rng, lang, TARGET_CLEAN_BYTES[lang], n_hidden)
    hidden, drafts = drafts[len(drafts) - n_hidden :], drafts[: len(drafts) - n_hidden]
    # Mojibake sources must be byte-for-byte stable under ftfy: pick drafts free of risky characters.
    assert all(not re.search("[\uff01-\uff5e\u3000\u2018-\u201d]", h.render()) for h in hidden)

    # The first few clean drafts (by topic rotation) become the PII / contamination carriers.
    pii = drafts[: counts["pii"]]
    contam = drafts[counts["pii"] : counts["pii"] + counts["contam"]]
    clean = drafts[counts["pii"] + counts["contam"] :]

    docs: list[Doc] = []
    for i, d in enumerate(clean, 1):
        docs.append(Doc(f"{lang}-{i:04d}", d.render(), f"{dom}/{d.slug}/{i:04d}.html", "clean"))
    by_id = {doc.id: (doc, d) for doc, d in zip(docs, clean)}

    pii_pool = dirt.PII_JA if lang == "ja" else dirt.PII_EN
    for i, d in enumerate(pii, 1):
        k = 2 if lang == "ja" else 2
        sents = [pii_pool[(2 * (i - 1) + j) % len(pii_pool)] for j in range(k)]
        docs.append(
            Doc(
                f"{lang}-pii-{i:03d}",
                _insert_paragraph(rng, d, sents),
                f"{dom}/info/contact-{i:03d}.html",
                "pii",
            )
        )

    lang_evals = [e for e in evals if e["lang"] == lang]
    intro = dirt.CONTAM_INTRO_JA if lang == "ja" else dirt.CONTAM_INTRO_EN
    for i, d in enumerate(contam, 1):
        e = lang_evals[i - 1]
        docs.append(
            Doc(
                f"{lang}-dirty-contam-{i:03d}",
                _insert_paragraph(rng, d, [intro, e["passage"]]),
                f"{dom}/{d.slug}/quiz-{i:03d}.html",
                "contam",
                source=e["id"],
            )
        )

    sources = rng.sample(sorted(by_id), counts["exactdup"] + counts["neardup"])
    for i, sid in enumerate(sources[: counts["exactdup"]], 1):
        src = by_id[sid][0]
        url = src.url.replace(dom, "https://example.net/mirror" if i % 2 else "https://example.org/copy")
        docs.append(Doc(f"{lang}-dirty-exactdup-{i:03d}", src.text, url, "exactdup", source=sid))
    for i, sid in enumerate(sources[counts["exactdup"] :], 1):
        src, d = by_id[sid]
        docs.append(
            Doc(
                f"{lang}-dirty-neardup-{i:03d}",
                _near_dup(rng, d),
                src.url + f"?ref=feed{i}",
                "neardup",
                source=sid,
            )
        )

    for i, h in enumerate(hidden[: counts.get("mojibake", 0)], 1):
        original = h.render()
        data = original.encode("utf-8")
        text = _sloppy_cp1252(data) if i % 2 else data.decode("latin-1")
        docs.append(
            Doc(
                f"{lang}-dirty-mojibake-{i:03d}",
                text,
                f"{dom}/old/{h.slug}-{i:03d}.html",
                "mojibake",
                original=original,
            )
        )
    for i, h in enumerate(hidden[counts.get("mojibake", 0) :], 1):
        original = h.render()
        docs.append(
            Doc(
                f"{lang}-dirty-garbled-{i:03d}",
                _garble(rng, original, i - 1),
                f"{dom}/old/garbled-{i:03d}.html",
                "garbled",
                original=original,
            )
        )

    for i in range(1, counts["boilerplate"] + 1):
        text = _boilerplate(rng, lang, (i - 1) % 3, rng.choice(clean))
        docs.append(Doc(f"{lang}-dirty-boilerplate-{i:03d}", text, f"{dom}/page/{i:03d}.html", "boilerplate"))
    for i in range(1, counts["spam"] + 1):
        docs.append(
            Doc(
                f"{lang}-dirty-spam-{i:03d}",
                _spam(rng, lang),
                f"https://casino.example.net/{lang}/{i}",
                "spam",
            )
        )
    shorts = dirt.SHORT_JA if lang == "ja" else dirt.SHORT_EN
    for i, s in enumerate(shorts[: counts["short"]], 1):
        docs.append(Doc(f"{lang}-dirty-short-{i:03d}", s, f"{dom}/short/{i:03d}.html", "short"))

    other = ["ko", "zh"] if lang == "ja" else ["de"]
    for code in other:
        tld = {"ko": "https://example.kr", "zh": "https://example.cn", "de": "https://example.de"}[code]
        for i, text in enumerate(dirt.OTHER_LANG[code], 1):
            docs.append(Doc(f"{lang}-dirty-lang-{code}-{i:03d}", text, f"{tld}/blog/{i:03d}", "lang"))

    rng.shuffle(docs)
    return docs


def generate() -> Corpus:
    rng = random.Random(SEED)
    evals = _eval_records()
    return Corpus(ja=_build_lang(rng, "ja", evals), en=_build_lang(rng, "en", evals), eval=evals)


def write(out_dir: Path = SAMPLE_DIR) -> dict[str, Path]:
    out = {}
    for name, data in generate().files().items():
        path = Path(out_dir) / name
        path.write_bytes(data)
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check", action="store_true", help="exit 1 if the shipped files differ from a fresh run"
    )
    ap.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output folder (default: the package)")
    args = ap.parse_args(argv)
    if args.check:
        stale = [
            n
            for n, b in generate().files().items()
            if not (args.out / n).exists() or (args.out / n).read_bytes() != b
        ]
        for n in stale:
            print(f"stale: {args.out / n}", file=sys.stderr)
        return 1 if stale else 0
    for path in write(args.out).values():
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
