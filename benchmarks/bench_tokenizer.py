"""Tokenizer benchmarks: training time and peak memory at a 100k-class vocabulary, and encode throughput
of SentencePiece vs the exported Hugging Face fast tokenizer (single text and batch, one core).

The corpus is generated (nothing is downloaded): Japanese, English and code lines built from
Zipf-distributed pseudo-words, so that there are enough distinct substrings for ~100k pieces, as in
real web text. Each size is trained with `kumihimo tokenizer train` on configs/tokenizer/llmjp3-100k.yaml
in a child process whose peak RSS is read from getrusage.

    python benchmarks/bench_tokenizer.py --sizes-mb 100 1000 --workdir /tmp/bench-tok
    python benchmarks/bench_tokenizer.py --sizes-mb 10 --vocab-size 32000   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIRAGANA = [chr(c) for c in range(0x3041, 0x3097)]
KATAKANA = [chr(c) for c in range(0x30A1, 0x30FB)]
KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
LATIN = "abcdefghijklmnopqrstuvwxyz"


def make_lexicon(rng: random.Random, size: int, make_word) -> list[str]:
    return [make_word(rng) for _ in range(size)]


def ja_word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return "".join(rng.choice(KANJI) for _ in range(rng.randint(1, 3))) + rng.choice(HIRAGANA)
    if kind < 0.8:
        return "".join(rng.choice(HIRAGANA) for _ in range(rng.randint(1, 4)))
    return "".join(rng.choice(KATAKANA) for _ in range(rng.randint(2, 6)))


def en_word(rng: random.Random) -> str:
    return "".join(rng.choice(LATIN) for _ in range(max(1, int(rng.expovariate(1 / 5)) + 1)))


def zipf_picker(rng: random.Random, words: list[str]):
    # Cumulative weights once: choices(weights=...) would rebuild them on every call.
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    return lambda k: rng.choices(words, cum_weights=cumulative, k=k)


def write_corpus(folder: Path, size_mb: int, seed: int = 0) -> dict[str, Path]:
    """ja / en / code JSONL files totalling size_mb MB (50 / 40 / 10 %), one document per line."""
    rng = random.Random(seed)
    pick_ja = zipf_picker(rng, make_lexicon(rng, 120_000, ja_word))
    pick_en = zipf_picker(rng, make_lexicon(rng, 80_000, en_word))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for lang, share in (("ja", 0.5), ("en", 0.4), ("code", 0.1)):
        path = folder / f"{lang}.jsonl"
        paths[lang] = path
        target = int(size_mb * 1e6 * share)
        written = 0
        with path.open("w", encoding="utf-8") as out:
            while written < target:
                if lang == "ja":
                    text = "\n".join("".join(pick_ja(rng.randint(8, 30))) + "。" for _ in range(8))
                elif lang == "en":
                    text = "\n".join(
                        " ".join(pick_en(rng.randint(6, 20))).capitalize() + "." for _ in range(8)
                    )
                else:
                    names = pick_en(6)
                    text = (
                        f"def {names[0]}_{names[1]}({names[2]}, {names[3]}=None):\n"
                        f"    for {names[4]} in range({rng.randint(1, 999)}):\n"
                        f"        {names[5]} = {names[2]}[{names[4]}] * {rng.randint(2, 64)}\n"
                        f"    return {names[5]}\n"
                    )
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode())
    return paths


def train(corpus: dict[str, Path], output: Path, vocab_size: int, sentences: int) -> dict[str, float]:
    cmd = [
        sys.executable,
        "-m",
        "kumihimo.cli",
        "tokenizer",
        "train",
        "configs/tokenizer/llmjp3-100k.yaml",
        f"output_dir={output}",
        f"vocab_size={vocab_size}",
        f"input_sentence_size={sentences}",
        "num_threads=2",
        "overwrite=true",
    ]
    cmd += [f"sources.{lang}.paths=[{json.dumps(str(path))}]" for lang, path in corpus.items()]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"seconds": seconds, "peak_rss_gb": peak_gb}


def encode_throughput(model_dir: Path, corpus: dict[str, Path], num_texts: int = 3000) -> dict[str, float]:
    """Tokens per second on one core: SentencePiece vs the exported HF tokenizer, single and batch."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch
    from transformers import AutoTokenizer

    from kumihimo.tokenizer.base import load_tokenizer
    from kumihimo.tokenizer.export_hf import export_hf

    torch.set_num_threads(1)
    texts = []
    for path in corpus.values():
        with path.open(encoding="utf-8") as handle:
            texts += [json.loads(next(handle))["text"] for _ in range(num_texts // len(corpus))]
    spm_tok = load_tokenizer(model_dir / "tokenizer.model")
    hf_dir = export_hf(model_dir / "tokenizer.model", model_dir / "hf")
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    num_tokens = sum(len(ids) for ids in spm_tok.encode_batch(texts))
    runs = {
        "sentencepiece single": lambda: [spm_tok.encode(t) for t in texts],
        "sentencepiece batch": lambda: spm_tok.encode_batch(texts, num_threads=1),
        "hf fast single": lambda: [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts],
        "hf fast batch": lambda: hf_tok(texts, add_special_tokens=False)["input_ids"],
    }
    results = {}
    for name, fn in runs.items():
        best = min(_timed(fn) for _ in range(3))
        results[name] = num_tokens / best
    return results


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--vocab-size", type=int, default=99574)
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=2_000_000,
        help="lines SentencePiece samples (bounds memory on large corpora)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-tokenizer"))
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} CPU cores; vocab {args.vocab_size:,}; input_sentence_size {args.input_sentence_size:,}"
    )
    last_model = None
    for size in sorted(args.sizes_mb):  # ascending: RUSAGE_CHILDREN keeps the largest child so far
        corpus = write_corpus(args.workdir / f"corpus-{size}mb", size)
        output = args.workdir / f"tok-{size}mb"
        result = train(corpus, output, args.vocab_size, args.input_sentence_size)
        print(f"train {size:>5} MB: {result['seconds']:8.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
        last_model = (output, corpus)
    output, corpus = last_model
    for name, rate in encode_throughput(output, corpus).items():
        print(f"encode {name:<22} {rate:>12,.0f} tokens/s (1 core)")


if __name__ == "__main__":
    main()
