"""A tiny random Hugging Face Qwen2 model with its own tokenizer, and a small corpus, for trying
docs/continual_pretraining.md on CPU in a few minutes:

    python -m kumihimo.sample.tiny_hf_model models/tiny-qwen2 --corpus corpus/ja.jsonl --tasks tasks

The model folder holds a 2-layer, 64-wide Qwen2ForCausalLM (fp32 safetensors, random weights, seed 0)
and a byte-level BPE tokenizer (tokenizer.json, eos `</s>`, no BOS, as Qwen's) trained on the sample
corpus's Japanese documents; `--corpus` writes those documents as JSONL (`id`, `text`) to curate and
tokenize, `--tasks` a four-choice reading task for `kumihimo eval`. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from kumihimo.sample import sample_paths

VOCAB_SIZE = 1000


def sample_documents() -> list[dict]:
    with gzip.open(sample_paths()["ja"], "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def write_tokenizer(folder: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)


def write_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kumihimo.sample.tiny_hf_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output", help="new folder for the model and its tokenizer")
    parser.add_argument(
        "--corpus", default=None, help="also write the Japanese sample documents here (JSONL)"
    )
    parser.add_argument(
        "--tasks", default=None, help="also write the quickstart's four-choice reading task into this folder"
    )
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        parser.error(f"{output} exists and is not empty; choose a new folder")
    documents = sample_documents()
    output.mkdir(parents=True, exist_ok=True)
    write_tokenizer(output, [d["text"] for d in documents])
    write_model(output)
    print(f"wrote a tiny random Qwen2 model and its tokenizer to {output}")
    if args.corpus:
        corpus = Path(args.corpus)
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text(
            "".join(
                json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False) + "\n" for d in documents
            ),
            encoding="utf-8",
        )
        print(f"wrote {len(documents)} Japanese documents to {corpus}")
    if args.tasks:
        from kumihimo.quickstart import write_reading_task

        print(f"wrote the task {write_reading_task(Path(args.tasks))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
