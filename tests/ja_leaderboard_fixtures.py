"""Tiny copies of the japanese_leaderboard datasets, in the layout the Hugging Face hub serves them
(<dataset>/<config>/<split>-00000-of-00001.parquet, fields and types as `datasets` loads them), and
lm-evaluation-harness task files that run the installed group's own YAMLs on them.

The harness task files only `include` the installed YAML and point dataset_path at the local parquet
files: prompts, process_docs, few-shot settings and metrics stay the harness's.
"""

from __future__ import annotations

from pathlib import Path

import yaml

JCQA = [
    ("日本の首都はどこ？", ["大阪", "東京", "京都", "札幌", "福岡"], 1),
    ("空の色は？", ["赤", "緑", "青", "黒", "白"], 2),
    ("猫が好きな食べ物は？", ["魚", "石", "紙", "鉄", "砂"], 0),
    ("冬は何が降る？", ["雨", "花", "葉", "雪", "星"], 3),
    ("本を読む場所は？", ["海", "山", "川", "空", "図書館"], 4),
    ("朝ご飯に食べるものは？", ["パン", "靴", "机", "窓", "車"], 0),
]
NLI = [
    ("男性が駅で電車を待っている。", "人が駅にいる。", 0),
    ("子供が公園で遊んでいる。", "子供は家で寝ている。", 1),
    ("女性が本を読んでいる。", "女性は学生だ。", 2),
    ("犬が走っている。", "動物が動いている。", 0),
    ("雨が降っている。", "天気は晴れだ。", 1),
]
MARC = [
    ("とても使いやすくて満足です。", 0),
    ("すぐに壊れました。", 1),
    ("値段の割に良い品です。", 0),
    ("二度と買いません。", 1),
]
SQUAD = [
    ("東京", "日本の首都[SEP] 日本の首都は東京である。人口が多い。", "日本の首都はどこ？", "東京"),
    ("富士山", "富士山[SEP] 富士山は日本で最も高い山である。", "日本で最も高い山は？", "富士山"),
    ("琵琶湖", "琵琶湖[SEP] 琵琶湖は滋賀県にある日本最大の湖である。", "日本最大の湖は？", "琵琶湖"),
    ("桜", "桜[SEP] 桜は春に咲く花である。", "春に咲く花は？", "桜"),
]
JAQKET = [
    ("日本で一番長い川は何？", ["信濃川"], ["信濃川は日本で一番長い川である。", "長野県と新潟県を流れる。"]),
    ("日本の国鳥は何？", ["キジ"], ["キジは日本の国鳥である。"]),
    ("将棋の駒で一番強いのは？", ["飛車", "竜王"], ["飛車は将棋で強い駒である。", "成ると竜王になる。"]),
]
MGSM_TRAIN = [
    ("問題：りんごが3個あります。2個買うと何個？", "ステップごとの答え：3+2=5。答えは5です。", 5),
    ("問題：鉛筆が10本あります。4本使うと何本？", "ステップごとの答え：10-4=6。答えは6です。", 6),
    ("問題：箱が2つあり、各箱に3個。全部で何個？", "ステップごとの答え：2×3=6。答えは6です。", 6),
    ("問題：1,000円から300円使うと？", "ステップごとの答え：1000-300=700。答えは700です。", 700),
    ("問題：5人に2個ずつ配ると何個？", "ステップごとの答え：5×2=10。答えは10です。", 10),
    ("問題：7から7を引くと？", "ステップごとの答え：7-7=0。答えは0です。", 0),
]
MGSM_TEST = [("花が8本あり、3本枯れました。残りは？", 5), ("車が4台あり、2台来ました。全部で？", 6)]
XLSUM = [
    ("東京で桜が満開になった。多くの人が花見を楽しんだ。", "東京で桜が満開に。"),
    ("大雨で電車が止まった。通勤客に影響が出た。", "大雨で電車が運休。"),
    ("新しい図書館が開館した。市民が訪れた。", "新図書館が開館。"),
]
XWINOGRAD = [
    ("猫は魚を食べた。それはお腹が空いていたから。", "魚は猫を食べた。それはお腹が空いていたから。", "1"),
    ("雨が降ったので、傘を差した。", "晴れたので、傘を差した。", "1"),
    ("彼はボールを投げ、犬が取った。", "犬はボールを投げ、彼が取った。", "1"),
    ("箱が重すぎて、持てなかった。", "箱が軽すぎて、持てなかった。", "1"),
]


def _rows() -> dict[tuple[str, str | None], dict[str, list[dict]]]:
    jcqa = [
        {"q_id": i, "question": q, **{f"choice{k}": c[k] for k in range(5)}, "label": g}
        for i, (q, c, g) in enumerate(JCQA)
    ]
    nli = [
        {"sentence_pair_id": str(i), "yjcaptions_id": f"{i}-0", "sentence1": a, "sentence2": b, "label": g}
        for i, (a, b, g) in enumerate(NLI)
    ]
    marc = [{"sentence": s, "label": g, "review_id": f"R{i}"} for i, (s, g) in enumerate(MARC)]
    squad = [
        {
            "id": f"s{i}",
            "title": t,
            "context": c,
            "question": q,
            "answers": {"text": [a], "answer_start": [c.index(a)]},
            "is_impossible": False,
        }
        for i, (t, c, q, a) in enumerate(SQUAD)
    ]
    jaqket = [
        {
            "qid": f"QA{i}",
            "question": q,
            "answers": {"text": a},
            "ctxs": {
                "id": list(range(len(c))),
                "title": ["t"] * len(c),
                "text": c,
                "has_answer": [True] * len(c),
            },
        }
        for i, (q, a, c) in enumerate(JAQKET)
    ]
    mgsm_train = [
        {"question": q, "answer": a, "answer_number": n, "equation_solution": None} for q, a, n in MGSM_TRAIN
    ]
    mgsm_test = [
        {"question": q, "answer": None, "answer_number": n, "equation_solution": None} for q, n in MGSM_TEST
    ]
    xlsum = [
        {"id": str(i), "url": f"https://example.invalid/{i}", "title": s, "summary": s, "text": t}
        for i, (t, s) in enumerate(XLSUM)
    ]
    xwino = [{"sentence1": a, "sentence2": b, "answer": g} for a, b, g in XWINOGRAD]
    return {
        ("Rakuten/JGLUE", "JCommonsenseQA"): {
            "train": jcqa[:3] + jcqa[5:],
            "validation": jcqa[3:5] + jcqa[:2],
        },
        ("Rakuten/JGLUE", "JNLI"): {"train": nli, "validation": nli[::-1]},
        ("Rakuten/JGLUE", "MARC-ja"): {"train": marc, "validation": marc[1:]},
        ("Rakuten/JGLUE", "JSQuAD"): {"train": squad, "validation": squad[:2]},
        ("kumapo/JAQKET", "v2.0"): {"train": jaqket, "validation": jaqket[1:]},
        ("juletxara/mgsm", "ja"): {"train": mgsm_train, "test": mgsm_test},
        ("mkshing/xlsum_ja", None): {"train": xlsum, "validation": xlsum[:1], "test": xlsum[1:]},
        ("polm-stability/xwinograd-ja", None): {"test": xwino},
    }


def write_hub_files(root: Path) -> dict[str, dict[str, list[str]]]:
    """The parquet files under root; returns {dataset folder: {split: [file]}} for the harness."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {}
    for (dataset, config), splits in _rows().items():
        folder = root / dataset / (config or "")
        folder.mkdir(parents=True, exist_ok=True)
        key = f"{dataset}/{config}" if config else dataset
        files[key] = {}
        schema = pa.Table.from_pylist(next(iter(splits.values()))).schema  # one schema for every split
        for split, rows in splits.items():
            path = folder / f"{split}-00000-of-00001.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
            files[key][split] = [str(path)]
    return files


def harness_folder() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "japanese_leaderboard"


def write_harness_tasks(folder: Path, files: dict[str, dict[str, list[str]]]) -> list[str]:
    """One YAML per group task: `include` the installed YAML, read the local parquet files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for installed in sorted(harness_folder().glob("ja_leaderboard_*.yaml")):
        config = yaml.safe_load(installed.read_text().replace("!function", ""))
        key = config["dataset_path"] + (f"/{config['dataset_name']}" if config.get("dataset_name") else "")
        name = f"local_{config['task']}"
        override = {
            "include": str(installed),
            "task": name,
            "dataset_path": "parquet",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files[key]},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(override, allow_unicode=True))
        names.append(name)
    return names
