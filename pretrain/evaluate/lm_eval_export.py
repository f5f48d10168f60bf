"""The same tasks as lm-evaluation-harness task YAMLs, for an independent number from the harness.

Each task is written as `<name>.jsonl` holding the rendered documents (the context with its few-shot
block already in place, the choices and the gold index, or the accepted answers) and `<name>.yaml`
telling the harness to read those columns with zero harness-side few-shot. The harness therefore sees
exactly the prompts kumihimo scores; its own few-shot sampler (which draws differently) is not used.
Run it with `lm_eval --include_path DIR --tasks kumihimo_<name> ...` or `kumihimo eval --harness`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from kumihimo.core.errors import UserError
from kumihimo.pretrain.evaluate.tasks import Task

PREFIX = "kumihimo_"


def harness_name(task: Task) -> str:
    return PREFIX + task.name


def export_tasks(tasks: list[Task], folder: str | Path) -> list[str]:
    """Write one YAML + JSONL per task into `folder`; returns the harness task names."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        name = harness_name(task)
        data = folder / f"{name}.jsonl"
        with data.open("w", encoding="utf-8") as handle:
            for example in task.examples:
                row = {"context": example.context}
                if task.spec.kind == "generation":
                    row["answer"] = list(example.answers)  # lm-eval: a list is "any of these"
                else:
                    row |= {"choices": example.choices, "gold": example.gold}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "doc_to_text": "context",
            "target_delimiter": task.spec.target_delimiter,
            "num_fewshot": 0,
        }
        if task.spec.kind == "generation":
            config |= {
                "output_type": "generate_until",
                "doc_to_target": "answer",
                "generation_kwargs": {
                    "until": list(task.spec.stop),
                    "do_sample": False,
                    "max_gen_toks": task.spec.max_new_tokens,
                },
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        else:
            config |= {
                "output_type": "multiple_choice",
                "doc_to_choice": "choices",
                "doc_to_target": "gold",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        names.append(name)
    return names


def check_harness_installed() -> None:
    """Refuse --harness before any scoring when lm-evaluation-harness is missing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            "--harness needs lm-evaluation-harness, which is not installed; "
            "pip install -e '.[eval]' in the kumihimo checkout"
        )


def run_harness(
    model_folder: str | Path,
    tasks: list[Task],
    export_folder: str | Path,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict:
    """lm-evaluation-harness on a Hugging Face folder (vLLM when installed and on a GPU, else its HF
    backend in float32) over the exported tasks; returns simple_evaluate's dict (with samples)."""
    # the task data are local files: never ask the Hub for them (and never wait on a network)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError(
            f"lm-evaluation-harness is not installed ({exc}); pip install -e '.[eval]' in the kumihimo checkout"
        ) from exc
    names = export_tasks(tasks, export_folder)
    model, args = "hf", {"pretrained": str(model_folder), "dtype": "float32"}
    if device != "cpu":
        try:
            import vllm  # noqa: F401

            model, args = "vllm", {"pretrained": str(model_folder), "dtype": "auto"}
        except ImportError:
            pass
    return lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=names,
        task_manager=TaskManager(include_path=str(Path(export_folder).resolve())),
        device=device if model == "hf" else None,
        batch_size=batch_size,
        log_samples=True,
        bootstrap_iters=0,
    )


def harness_loglikelihoods(output: dict, task: Task) -> list[list[float]]:
    """Per document, per choice log-likelihoods from run_harness's samples, in document order."""
    samples = sorted(output["samples"][harness_name(task)], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
