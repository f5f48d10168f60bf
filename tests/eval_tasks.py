"""Tiny task files in the layouts of the common benchmarks, made for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

JCQA = [
    {
        "q_id": i,
        "question": q,
        "choice0": c[0],
        "choice1": c[1],
        "choice2": c[2],
        "choice3": c[3],
        "choice4": c[4],
        "label": gold,
    }
    for i, (q, c, gold) in enumerate(
        [
            ("日本の首都はどこ？", ["大阪", "東京", "京都", "札幌", "福岡"], 1),
            ("空の色は？", ["赤", "緑", "青", "黒", "白"], 2),
            ("猫が好きな食べ物は？", ["魚", "石", "紙", "鉄", "砂"], 0),
            ("冬は何が降る？", ["雨", "花", "葉", "雪", "星"], 3),
            ("本を読む場所は？", ["海", "山", "川", "空", "図書館"], 4),
        ]
    )
]
JNLI = [
    {"sentence_pair_id": str(i), "sentence1": a, "sentence2": b, "label": lab}
    for i, (a, b, lab) in enumerate(
        [
            ("男性が駅で電車を待っている。", "人が駅にいる。", "entailment"),
            ("子供が公園で遊んでいる。", "子供は家で寝ている。", "contradiction"),
            ("女性が本を読んでいる。", "女性は学生だ。", "neutral"),
            ("犬が走っている。", "動物が動いている。", "entailment"),
        ]
    )
]
ARC = [
    {"id": f"q{i}", "question": q, "choices": {"text": t, "label": ["A", "B", "C"]}, "answerKey": k}
    for i, (q, t, k) in enumerate(
        [
            ("Which one is a planet?", ["Mars", "Moon", "Sun"], "A"),
            ("What do plants need to grow?", ["sand", "light", "noise"], "B"),
            ("Which is the coldest?", ["fire", "tea", "ice"], "C"),
        ]
    )
]
HELLASWAG = [
    {"activity_label": "Cooking", "ctx": "She puts the pan on the stove and", "endings": e, "label": lab}
    for e, lab in [
        (["turns on the heat.", "flies away.", "sings a song.", "reads a map."], "0"),
        (["eats the stove.", "adds some oil.", "paints the wall.", "goes to sleep."], "1"),
    ]
]
JEMHOPQA = [
    {"qid": str(i), "type": "comparison", "question": q, "answer": a}
    for i, (q, a) in enumerate(
        [("富士山がある国は？", "日本"), ("一年は何か月？", "12"), ("水の化学式は？", "H2O")]
    )
]

TASKS = {
    "jcqa": ({"format": "jcommonsenseqa", "num_fewshot": 2}, JCQA),
    "jnli": ({"format": "jnli", "num_fewshot": 1}, JNLI),
    "arc": ({"format": "arc"}, ARC),
    "hellaswag": ({"format": "hellaswag"}, HELLASWAG),
    "jemhopqa": ({"format": "jemhopqa", "num_fewshot": 1, "max_new_tokens": 4}, JEMHOPQA),
}


def write_tasks(folder: Path, names: tuple[str, ...] = tuple(TASKS)) -> list[Path]:
    """One YAML + JSONL per task in `folder`; returns the YAML paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        spec, docs = TASKS[name]
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
        )
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "data": f"{name}.jsonl", **spec}, allow_unicode=True))
        paths.append(path)
    return paths
