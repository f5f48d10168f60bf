"""`kumihimo quickstart`: the whole pipeline on the bundled sample corpus, on CPU, in a few minutes.

    curate (data_prep) -> train a tokenizer -> tokenize to .bin/.idx + blend -> train a tiny Llama with
    Megatron-Core (validation loss per source, a small downstream task scored in the loop, TensorBoard,
    metrics.html) -> save a checkpoint -> convert to Hugging Face -> load with transformers and generate

Every stage uses the same code and recipes as the real commands (configs/data_prep/quickstart.yaml,
configs/tokenizer/tiny.yaml, configs/pretrain/quickstart.yaml); training runs as `kumihimo train` in a
child process, exactly as a user would start it. A finished stage records a fingerprint of its inputs
in <workdir>/stages/; a re-run reuses it unless the inputs changed or --force / --redo asks otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.core.recipes import shipped_root

log = stage_logger(None)

CONFIGS = shipped_root()
STAGES = ("curate", "tokenizer", "datasets", "train", "convert", "generate")
PROMPTS = ("今日は天気が良いので、", "駅前の図書館では、")


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the whole pipeline on the bundled ja/en sample corpus on CPU: curate, train a "
        "tokenizer, build Megatron datasets, train a tiny Llama with Megatron-Core, convert "
        "it to Hugging Face and generate Japanese text. Takes a few minutes on 2 cores."
    )
    parser.epilog = (
        "examples:\n  kumihimo quickstart\n  kumihimo quickstart --redo train --train-iters 600\n"
        "  kumihimo quickstart --workdir /tmp/qs --force"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--workdir", default="runs/quickstart", help="where every stage writes (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="redo every stage even if it finished before")
    parser.add_argument(
        "--redo", nargs="+", choices=STAGES, default=[], help="redo these stages (and the ones after them)"
    )
    parser.add_argument(
        "--train-iters", type=int, default=None, help="training steps (default: the recipe's)"
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="training processes; 2 with --tp 2 shows tensor parallelism on CPU",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size for training")
    parser.set_defaults(handler=run)


class StageCache:
    """Skip a stage whose recorded fingerprint matches; record fingerprint and results when it ends."""

    def __init__(self, workdir: Path, force: bool, redo: list[str]):
        self.dir = workdir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        first_redo = min((STAGES.index(s) for s in redo), default=len(STAGES))
        self.redo = set(STAGES) if force else set(STAGES[first_redo:])
        self.fingerprints: dict[str, str] = {}

    def run(self, stage: str, inputs: dict[str, Any], fn) -> dict[str, Any]:
        upstream = [self.fingerprints[s] for s in STAGES[: STAGES.index(stage)] if s in self.fingerprints]
        blob = json.dumps({"inputs": inputs, "upstream": upstream}, sort_keys=True, default=str)
        fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        self.fingerprints[stage] = fingerprint
        record = self.dir / f"{stage}.json"
        number = f"[{STAGES.index(stage) + 1}/{len(STAGES)}]"
        if stage not in self.redo and record.is_file():
            saved = json.loads(record.read_text(encoding="utf-8"))
            if saved.get("fingerprint") == fingerprint:
                log.info(f"{number} {stage}: reusing the finished stage (use --redo {stage} to run it again)")
                return saved["result"]
        log.info(f"{number} {stage} ...")
        start = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 1)
        configtree.write_text_atomic(
            record,
            json.dumps(
                {"fingerprint": fingerprint, "result": result}, ensure_ascii=False, indent=2, default=str
            ),
        )
        log.info(f"{number} {stage} done in {result['seconds']} s")
        return result


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1 or args.tp < 1:  # checked before hours of curation, not at the training stage
        raise UserError(f"--nproc={args.nproc} and --tp={args.tp} must both be >= 1 (e.g. --nproc 2 --tp 2)")
    if not CONFIGS.is_dir():
        raise UserError(
            f"recipes not found at {CONFIGS}; install kumihimo from a checkout with `pip install -e .`"
        )
    if args.train_iters is not None and args.train_iters < 1:
        raise UserError(f"--train-iters={args.train_iters} must be >= 1 (leave it out for the recipe's 300)")
    if args.nproc < 1 or args.tp < 1:
        raise UserError(f"--nproc={args.nproc} and --tp={args.tp} must be >= 1")
    workdir = Path(args.workdir).resolve()
    cache = StageCache(workdir, args.force, args.redo)
    data_cfg = _data_config(workdir)
    curated = cache.run("curate", {"config": configtree.to_dict(data_cfg)}, lambda: _curate(data_cfg))
    tok_cfg = _tokenizer_config(workdir, curated)
    tokenizer = cache.run(
        "tokenizer", {"config": configtree.to_dict(tok_cfg)}, lambda: _train_tokenizer(tok_cfg)
    )
    datasets = cache.run(
        "datasets", {"tokenizer": tokenizer["sha256"]}, lambda: _build_datasets(data_cfg, tokenizer["model"])
    )
    train_args = _train_args(workdir, tokenizer, datasets, args)
    trained = cache.run(
        "train", {"args": train_args, "nproc": args.nproc}, lambda: _train(workdir, train_args, args.nproc)
    )
    hf = cache.run("convert", {"checkpoint": trained["checkpoint"]}, lambda: _convert(workdir, trained))
    generated = cache.run("generate", {"prompts": PROMPTS}, lambda: _generate(hf["output"]))
    print(_summary(curated, tokenizer, datasets, trained, hf, generated))
    return 0


# ------------------------------------------------------------------------------------------- stages


def _data_config(workdir: Path):
    from kumihimo.data_prep.config import DataPrepConfig
    from kumihimo.sample import sample_paths
    from kumihimo.sample.web_pages import write_sample_warc

    paths = sample_paths()
    # a small Common Crawl-like source, so WARC reading, the Japanese pre-check and extraction run too
    (workdir / "sample").mkdir(parents=True, exist_ok=True)
    web = write_sample_warc(workdir / "sample" / "web.warc.gz")
    sources = [
        {"name": "ja", "paths": [str(paths["ja"])]},
        {"name": "en", "paths": [str(paths["en"])]},
        {"name": "web", "paths": [str(web)]},
    ]
    overrides = [
        f"output_dir={workdir / 'data_prep'}",
        f"input.sources={json.dumps(sources)}",
        f"decontam.eval_paths=[{json.dumps(str(paths['eval']))}]",
    ]
    return configtree.load(DataPrepConfig, CONFIGS / "data_prep" / "quickstart.yaml", overrides)


def _curate(config) -> dict[str, Any]:
    from kumihimo.data_prep.pipeline import curate

    result = curate(config)
    return {
        "input": result.num_input_lines,
        "kept": result.num_kept,
        "dropped": result.dropped,
        "quarantined": result.num_quarantined,
        "pii": result.pii,
        "report": str(result.report_path),
        "curated": {name: str(path) for name, path in result.curated_paths.items()},
    }


def _tokenizer_config(workdir: Path, curated: dict[str, Any]):
    from kumihimo.tokenizer.config import TokenizerTrainConfig

    overrides = [f"output_dir={workdir / 'tokenizer'}"]
    for lang in ("ja", "en"):
        overrides.append(f"input.sources.{lang}.paths={json.dumps(list(curated['curated'].values()))}")
    return configtree.load(TokenizerTrainConfig, CONFIGS / "tokenizer" / "tiny.yaml", overrides)


def _train_tokenizer(config) -> dict[str, Any]:
    from kumihimo.tokenizer.base import load_tokenizer
    from kumihimo.tokenizer.train import train_tokenizer

    model = train_tokenizer(config)
    tok = load_tokenizer(model)
    return {"model": str(tok.path), "vocab_size": tok.vocab_size, "sha256": tok.sha256}


def _build_datasets(config, tokenizer_model: str) -> dict[str, Any]:
    from kumihimo.data_prep.pipeline import build_datasets

    result = build_datasets(config, tokenizer_model)
    return _plain(result)


def _plain(result) -> dict[str, Any]:
    """A dataclass result as JSON-able data (paths as strings)."""
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(result), default=str))


def write_reading_task(folder: Path) -> Path:
    """A four-choice reading task from the sample's Japanese eval records (which decontamination kept
    out of the training data): passage + question, the right answer among three other questions'
    answers, in a fixed order. Returns the task YAML."""
    import random

    from kumihimo.sample import sample_paths

    records = [json.loads(line) for line in sample_paths()["eval"].read_text(encoding="utf-8").splitlines()]
    records = [r for r in records if r["lang"] == "ja"]
    rng = random.Random(0)
    lines = []
    for i, record in enumerate(records):
        others = [r["answer"] for j, r in enumerate(records) if j != i and r["answer"] != record["answer"]]
        choices = [record["answer"], *rng.sample(others, 3)]
        rng.shuffle(choices)
        doc = {"passage": record["passage"], "question": record["question"], "choices": choices}
        lines.append(json.dumps(doc | {"label": choices.index(record["answer"])}, ensure_ascii=False))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reading_ja.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = {
        "name": "reading_ja",
        "data": "reading_ja.jsonl",
        "kind": "multiple_choice",
        "prompt": "{passage}\n質問: {question}\n答え:",
        "choices": ["choices"],
        "label": "label",
    }
    path = folder / "reading_ja.yaml"
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return path


def _train_args(workdir: Path, tokenizer: dict, datasets: dict, args: argparse.Namespace) -> list[str]:
    train_dir = workdir / "train"
    task = write_reading_task(workdir / "tasks")
    overrides = [
        f"data.blend_file={datasets['blend_path']}",
        f"data.tokenizer={tokenizer['model']}",
        f"output_dir={train_dir}",  # checkpoints go to its checkpoints/ folder
        f"parallelism.tensor_model_parallel_size={args.tp}",
        f"evaluation.tasks=[{task}]",
        f"logging.tensorboard_dir={train_dir / 'tensorboard'}",
    ]
    if args.train_iters is not None:
        overrides.append(f"schedule.train_iters={args.train_iters}")
        from kumihimo.pretrain.config import TrainConfig

        # the recipe warms up for 20 steps; a shorter run warms up for a tenth of its steps
        warmup = configtree.load(
            TrainConfig, CONFIGS / "pretrain" / "quickstart.yaml"
        ).schedule.lr_warmup_iters
        if args.train_iters <= warmup:
            overrides.append(f"schedule.lr_warmup_iters={args.train_iters // 10}")
    return [str(CONFIGS / "pretrain" / "quickstart.yaml"), *overrides]


def _train(workdir: Path, train_args: list[str], nproc: int) -> dict[str, Any]:
    import shutil

    train_dir = workdir / "train"
    shutil.rmtree(train_dir, ignore_errors=True)  # a redo starts from scratch, not from the old checkpoint
    cmd = [sys.executable, "-m", "kumihimo.cli", "train", *train_args, "--nproc-per-node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // nproc))))
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise UserError(f"training failed (exit code {code}); its log is above. Rerun with --redo train")
    metrics = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    evaluated = [m for m in metrics if any(k.startswith(("tasks/", "valid/")) for k in m)]
    last_eval = evaluated[-1] if evaluated else {}
    return {
        "evaluation_step": last_eval.get("step"),
        "scores": {
            k: v
            for k, v in last_eval.items()
            if k.startswith(("tasks/", "valid/")) and k.endswith(("acc", "acc_norm", "loss"))
        },
        "plot": str(train_dir / "metrics.html"),
        "tensorboard": str(train_dir / "tensorboard"),
        "checkpoint": str(train_dir / "checkpoints"),
        "steps": metrics[-1]["step"],
        "loss_first": metrics[0]["loss"],
        "loss_last": metrics[-1]["loss"],
        "val_loss_last": val[-1] if val else None,
        "tokens": metrics[-1]["consumed_tokens"],
        "tokens_per_s": sum(m["tokens_per_s"] for m in metrics[1:]) / max(1, len(metrics) - 1),
    }


def _convert(workdir: Path, trained: dict[str, Any]) -> dict[str, Any]:
    from kumihimo.pretrain.convert.to_hf import convert_to_hf

    output = convert_to_hf(trained["checkpoint"], workdir / "hf", dtype="fp32")
    return {"output": str(output)}


def _generate(hf_dir: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    samples = {}
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=40,
                do_sample=False,
                repetition_penalty=1.3,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        samples[prompt] = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return {"samples": samples, "model_class": type(model).__name__}


# ------------------------------------------------------------------------------------------- summary


def _summary(curated, tokenizer, datasets, trained, hf, generated) -> str:
    lines = ["", "=" * 72, "kumihimo quickstart: summary", "=" * 72, "Documents per stage:"]
    remaining = curated["input"]
    lines.append(f"  {'input lines':<28}{remaining:>8}")
    if curated["quarantined"]:
        remaining -= curated["quarantined"]
        lines.append(f"  {'after quarantine':<28}{remaining:>8}   (malformed input)")
    for stage, reasons in curated["dropped"].items():
        dropped = sum(reasons.values())
        remaining -= dropped
        detail = ", ".join(
            f"{reason} {count}" for reason, count in sorted(reasons.items(), key=lambda x: -x[1])
        )
        lines.append(f"  {'after ' + stage:<28}{remaining:>8}   (-{dropped}: {detail})")
    lines.append(f"  {'kept':<28}{curated['kept']:>8}")
    if curated["pii"]:
        lines.append("  PII redacted: " + ", ".join(f"{k} {v}" for k, v in curated["pii"].items() if v))
    lines.append(f"Tokenizer: {tokenizer['vocab_size']} pieces -> {tokenizer['model']}")
    for name, count in datasets.get("num_tokens", {}).items():
        lines.append(f"Tokens: {name} {count:,}")
    lines.append(
        f"Training: {trained['steps']} steps, {trained['tokens']:,} tokens, loss "
        f"{trained['loss_first']:.3f} -> {trained['loss_last']:.3f}"
        + (f" (validation {trained['val_loss_last']:.3f})" if trained["val_loss_last"] else "")
        + f", ~{trained['tokens_per_s']:,.0f} tokens/s"
    )
    if trained.get("scores"):
        scores = trained["scores"]
        sources = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in scores.items() if k.startswith("valid/"))
        tasks = ", ".join(
            f"{k.removeprefix('tasks/')} {v:.3f}" for k, v in scores.items() if k.startswith("tasks/")
        )
        lines.append(f"Evaluation at step {trained['evaluation_step']}:")
        if sources:
            lines.append(f"  validation loss per source: {sources}")
        if tasks:
            lines.append(f"  downstream (reading_ja, 4 choices, chance 0.25): {tasks}")
    lines += [
        f"Plot: {trained['plot']}   TensorBoard: tensorboard --logdir {trained['tensorboard']}",
        f"Checkpoint: {trained['checkpoint']}",
        f"Hugging Face model: {hf['output']}",
        f"Report: {curated['report']}",
        "Generated by the converted model with transformers (greedy; [continuation], ⏎ = newline):",
    ]
    for prompt, text in generated["samples"].items():
        lines.append(f"  {prompt}[{text.replace(chr(10), ' ⏎ ')}]")
    return "\n".join(lines)
