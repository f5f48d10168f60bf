"""Deterministic, varied Japanese / English / code documents for tests and benchmarks.

No network and no data files: text is composed from small word lists and templates, with enough
combinations (numbers, names, nested code) that a few thousand lines are distinct, which is what
SentencePiece needs to learn a vocabulary of a few thousand pieces.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

JA_NOUNS = (
    "日本 東京 大阪 京都 北海道 沖縄 学校 先生 学生 会社 社員 電車 駅 病院 図書館 公園 天気 季節 春 夏 秋 冬 "
    "料理 寿司 味噌汁 ラーメン 果物 野菜 経済 政治 歴史 文化 言語 研究 技術 計算機 人工知能 言語モデル "
    "データ 情報 問題 解決 方法 結果 実験 論文 会議 旅行 写真 音楽 映画 小説 新聞 雑誌 子供 家族 友達 "
    "犬 猫 鳥 魚 山 川 海 空 雨 雪 風 桜 紅葉 祭り 神社 お寺 城 市場 商品 価格 地震 台風 環境 エネルギー"
).split()
JA_VERBS = (
    "行きました 来ました 見ました 食べました 飲みました 書きました 読みました 話しました 考えました "
    "調べました 作りました 使いました 始めました 終わりました 変わりました 増えました 減りました "
    "発表しました 開発しました 説明しました 確認しました 参加しました 利用しています 研究しています"
).split()
JA_ADJS = (
    "新しい 古い 大きな 小さな 美しい 難しい 易しい 面白い 重要な 有名な 静かな 便利な 複雑な 簡単な".split()
)
JA_ENDINGS = ("。", "。", "。", "！", "？", "と言われています。", "ようです。", "そうです。")
JA_PARTICLES = "は が を に で と の から まで より も".split()
EN_NOUNS = (
    "model data system city river teacher student company market language history culture research "
    "computer network weather season garden library station hospital paper result method problem "
    "solution experiment journal music movie novel family friend forest mountain ocean island bridge "
    "engine server client kernel compiler database function variable token vocabulary corpus"
).split()
EN_VERBS = (
    "builds reads writes finds improves explains describes measures compares trains evaluates "
    "changes supports reduces increases publishes announces studies visits opens closes"
).split()
EN_ADJS = (
    "new old large small quick slow bright quiet important famous useful complex simple modern "
    "ancient efficient robust careful strange"
).split()
EN_NAMES = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy".split()
CODE_WORDS = "count total value items index result buffer config path name size offset token batch".split()
EXTRAS = ("😀", "👍", "👨‍👩‍👧", "🇯🇵", "𠮷野家", "𩸽", "葛󠄀城", "①②③", "ｶﾀｶﾅ", "ＡＢＣ", "…", "〜")


def ja_sentence(rng: random.Random) -> str:
    parts = [rng.choice(JA_NOUNS), rng.choice(JA_PARTICLES)]
    if rng.random() < 0.5:
        parts += [rng.choice(JA_ADJS), rng.choice(JA_NOUNS), rng.choice(JA_PARTICLES)]
    if rng.random() < 0.4:
        parts += [f"{rng.randint(1, 2030)}年{rng.randint(1, 12)}月に"]
    if rng.random() < 0.05:
        parts.append(rng.choice(EXTRAS))
    parts += [
        rng.choice(JA_NOUNS),
        "を",
        rng.choice(JA_VERBS)[:-2] if rng.random() < 0.1 else "",
        rng.choice(JA_VERBS),
    ]
    return "".join(parts).replace("をを", "を") + rng.choice(JA_ENDINGS)


def en_sentence(rng: random.Random) -> str:
    words = [
        rng.choice(("The", "A", "This", "Every", rng.choice(EN_NAMES) + "'s")),
        rng.choice(EN_ADJS),
        rng.choice(EN_NOUNS),
        rng.choice(EN_VERBS),
        "the",
        rng.choice(EN_NOUNS),
    ]
    if rng.random() < 0.4:
        words += ["in", str(rng.randint(1900, 2030))]
    if rng.random() < 0.3:
        words += ["with", str(rng.randint(2, 999)), rng.choice(EN_NOUNS) + "s"]
    if rng.random() < 0.03:
        words.append(rng.choice(EXTRAS))
    return " ".join(words) + rng.choice((".", ".", "!", "?", ";"))


def code_block(rng: random.Random) -> str:
    name = f"{rng.choice(EN_VERBS).rstrip('s')}_{rng.choice(CODE_WORDS)}"
    arg, other = rng.sample(CODE_WORDS, 2)
    indent = "\t" if rng.random() < 0.2 else "    "
    lines = [
        f"def {name}({arg}, {other}={rng.randint(0, 64)}):",
        f'{indent}"""{rng.choice(EN_VERBS).capitalize()} the {rng.choice(EN_NOUNS)}."""',
        f"{indent}{other} = {arg} * {rng.randint(2, 9)} + len({arg})",
        f"{indent}for i in range({other}):",
        f"{indent * 2}if i % {rng.randint(2, 7)} == 0:",
        f"{indent * 3}{arg}[i] = {{'{rng.choice(CODE_WORDS)}': i, \"n\": {rng.randint(0, 10**6)}}}",
        f"{indent}return {arg}  # {rng.choice(JA_NOUNS)}を返す",
        "",
    ]
    return "\n".join(lines)


def document(rng: random.Random, lang: str) -> str:
    """One multi-line document in `lang` (ja, en or code)."""
    if lang == "code":
        return "\n".join(code_block(rng) for _ in range(rng.randint(1, 3)))
    make = ja_sentence if lang == "ja" else en_sentence
    joiner = "" if lang == "ja" else " "
    paragraphs = [joiner.join(make(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    return "\n\n".join(paragraphs) if rng.random() < 0.5 else "\n".join(paragraphs)


def documents(lang: str, num_documents: int, seed: int = 0) -> Iterator[str]:
    rng = random.Random(f"{seed}:{lang}")
    for _ in range(num_documents):
        yield document(rng, lang)


def write_jsonl(path: Path, lang: str, num_documents: int, seed: int = 0) -> Path:
    """data_prep-style JSONL (`text`, `lang`); gzip-compressed when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for text in documents(lang, num_documents, seed):
            handle.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    return path
