"""Four routes to a downstream score agree on a tiny model and tiny tasks made for the test:

1. the trainer's in-loop evaluation (evaluation.tasks, on the Megatron model as laid out),
2. `kumihimo eval` on the Megatron checkpoint (loaded at the training layout),
3. `kumihimo eval` on the folder `kumihimo convert to-hf` writes,
4. lm-evaluation-harness (HF backend, CPU, float32) on the exported task YAMLs,

with per-choice log-likelihoods within 1e-4 (fp32) and identical accuracies and generations, for
models trained at TP=1, TP=2 and PP=2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kumihimo.pretrain.convert.to_hf import convert_to_hf
from kumihimo.pretrain.evaluate.ja_leaderboard import PRESETS
from kumihimo.pretrain.evaluate.tasks import load_tasks
from tests.eval_tasks import write_tasks
from tests.ja_leaderboard_fixtures import write_hub_files
from tests.test_convert_to_hf import _launch, train_spm

pytestmark = pytest.mark.slow  # three small trainings, Megatron and HF evaluations, the harness

TINY = "configs/pretrain/tiny-cpu.yaml"
LAYOUTS = {
    "tp1": ([], 1),
    "tp2": (["--tp", "2"], 2),
    "pp2": (["--pp", "2"], 2),
}
TRAIN_LAYOUT = {
    "tp1": [],
    "tp2": ["parallelism.tensor_model_parallel_size=2"],
    "pp2": ["parallelism.pipeline_model_parallel_size=2"],
}
TOLERANCE = 1e-4
JA_TASKS = list(PRESETS)  # XL-Sum's ROUGE-2 too: fugashi, neologdn and emoji come with the test extra


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-agreement")


@pytest.fixture(scope="module")
def task_files(work) -> list[Path]:
    return write_tasks(work / "tasks")


@pytest.fixture(scope="module")
def ja_suite(work, task_files) -> Path:
    """lm-eval's japanese_leaderboard presets on the local hub-layout fixtures, short generations (the
    harness's own prompts and scores are checked in test_evaluate_ja_leaderboard.py)."""
    root = work / "hub"
    write_hub_files(root)
    path = work / "tasks" / "ja_leaderboard.yaml"
    path.write_text(
        yaml.safe_dump(
            {"suite": "ja_leaderboard", "data": str(root), "tasks": JA_TASKS, "limit": 2, "max_new_tokens": 4}
        )
    )
    return path


def _torchrun(nproc: int) -> list[str]:
    if nproc == 1:
        return []
    return [
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        "--standalone",
    ]


def _wait(procs: dict) -> None:
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=500)
        assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"


@pytest.fixture(scope="module")
def runs(work, task_files, ja_suite) -> dict[str, dict[str, Path]]:
    """Per layout: the training run folder, its checkpoint root, the Megatron eval and HF eval results."""
    spm_model = train_spm(work / "tok", seed=2)
    paths = {name: {"run": work / name / "run", "ckpt": work / name / "ckpt"} for name in LAYOUTS}
    _wait(
        {
            name: _launch(
                [
                    *_torchrun(LAYOUTS[name][1]),
                    "-m",
                    "kumihimo.cli",
                    "train",
                    TINY,
                    "model.num_layers=2",
                    "schedule.train_iters=4",
                    "schedule.lr_warmup_iters=0",
                    "schedule.eval_interval=4",
                    "schedule.eval_iters=1",
                    "data.mock=true",
                    f"data.tokenizer={spm_model}",
                    f"output_dir={paths[name]['run']}",
                    f"checkpoint.dir={paths[name]['ckpt']}",
                    f"evaluation.tasks=[{','.join(str(p) for p in [*task_files, ja_suite])}]",
                    "evaluation.batch_size=4",
                    *TRAIN_LAYOUT[name],
                ]
            )
            for name in LAYOUTS
        }
    )
    procs = {}
    for name, (flags, nproc) in LAYOUTS.items():
        paths[name]["megatron"] = work / name / "eval-megatron"
        procs[name] = _launch(
            [
                "-m",
                "kumihimo.cli",
                "eval",
                str(paths[name]["ckpt"]),
                "--tasks",
                str(work / "tasks"),
                "--output",
                str(paths[name]["megatron"]),
                "--batch-size",
                "3",
                "--nproc-per-node",
                str(nproc),
                *flags,
            ]
        )
    _wait(procs)
    procs = {}
    for name in LAYOUTS:
        paths[name]["hf_model"] = convert_to_hf(paths[name]["ckpt"], work / name / "hf", dtype="fp32")
        paths[name]["hf"] = work / name / "eval-hf"
        procs[name] = _launch(
            [
                "-m",
                "kumihimo.cli",
                "eval",
                str(paths[name]["hf_model"]),
                "--tasks",
                str(work / "tasks"),
                "--output",
                str(paths[name]["hf"]),
                "--device",
                "cpu",
            ]
        )
    _wait(procs)
    return paths


def samples(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]


def only_iteration(folder: Path) -> Path:
    (found,) = sorted(folder.glob("iter_*"))
    return found


def assert_same_scores(a: Path, b: Path, task: str) -> None:
    left, right = samples(a, task), samples(b, task)
    assert len(left) == len(right) > 0
    for x, y in zip(left, right):
        if "loglikelihoods" in x:
            diffs = [abs(p - q) for p, q in zip(x["loglikelihoods"], y["loglikelihoods"], strict=True)]
            assert max(diffs) < TOLERANCE, (task, x, y)
            assert (x["pred"], x["pred_norm"]) == (y["pred"], y["pred_norm"])
        else:
            assert x["generated"] == y["generated"]


TASKS = ("jcqa", "jnli", "arc", "hellaswag", "jemhopqa", *JA_TASKS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_checkpoint_and_hf_folder_agree(runs, layout):
    megatron = only_iteration(runs[layout]["megatron"])
    for task in TASKS:
        assert_same_scores(megatron, runs[layout]["hf"], task)
    ours = json.loads((megatron / "results.json").read_text())["tasks"]
    hf = json.loads((runs[layout]["hf"] / "results.json").read_text())["tasks"]
    for task in TASKS:
        assert {k: v for k, v in ours[task].items() if k != "seconds"} == {
            k: v for k, v in hf[task].items() if k != "seconds"
        }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_in_loop_scores_agree_with_the_checkpoint(runs, layout):
    in_loop = runs[layout]["run"] / "eval" / "iter_0000004"
    megatron = only_iteration(runs[layout]["megatron"])
    for task in TASKS:
        assert_same_scores(in_loop, megatron, task)
    metrics = [json.loads(line) for line in (runs[layout]["run"] / "metrics.jsonl").read_text().splitlines()]
    logged = next(m for m in metrics if "tasks/jcqa/acc" in m)
    ours = json.loads((megatron / "results.json").read_text())["tasks"]
    assert logged["tasks/jcqa/acc"] == ours["jcqa"]["acc"]
    assert logged["tasks/jemhopqa/exact_match"] == ours["jemhopqa"]["exact_match"]
    for task, metric in (
        ("ja_leaderboard_jnli", "acc"),
        ("ja_leaderboard_mgsm", "acc"),
        ("ja_leaderboard_jsquad", "exact_match"),
        ("ja_leaderboard_xlsum", "rouge2"),
    ):
        assert logged[f"tasks/{task}/{metric}"] == ours[task][metric]
    page = (runs[layout]["run"] / "metrics.html").read_text()
    assert all(f"{task}/" in page for task in JA_TASKS)  # one curve per task in the run's plot


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_lm_evaluation_harness_agrees(runs, layout, work, task_files):
    pytest.importorskip(
        "lm_eval",
        reason="lm-evaluation-harness is not installed (pip install -e '.[eval]' from the checkout)",
    )
    from kumihimo.pretrain.evaluate.lm_eval_export import harness_loglikelihoods, harness_name, run_harness

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = load_tasks(task_files)
    output = run_harness(runs[layout]["hf_model"], tasks, work / layout / "harness", "cpu", batch_size=4)
    for task in tasks:
        result = output["results"][harness_name(task)]
        ours = samples(runs[layout]["hf"], task.name)
        if task.spec.kind == "generation":
            harness = sorted(output["samples"][harness_name(task)], key=lambda s: s["doc_id"])
            assert [s["filtered_resps"][0] for s in harness] == [s["generated"] for s in ours]
            continue
        for lls, sample in zip(harness_loglikelihoods(output, task), ours, strict=True):
            assert max(abs(a - b) for a, b in zip(lls, sample["loglikelihoods"], strict=True)) < TOLERANCE
        summary = json.loads((runs[layout]["hf"] / "results.json").read_text())["tasks"][task.name]
        assert result["acc,none"] == summary["acc"] and result["acc_norm,none"] == summary["acc_norm"]


def test_watch_evaluates_each_new_checkpoint(runs, work, tmp_path):
    import shutil
    import time

    root = tmp_path / "ckpt"
    shutil.copytree(runs["tp1"]["ckpt"], root)
    output = tmp_path / "eval"
    proc = _launch(
        [
            "-m",
            "kumihimo.cli",
            "eval",
            str(root),
            "--tasks",
            str(work / "tasks" / "jcqa.yaml"),
            "--output",
            str(output),
            "--watch",
            "--poll-seconds",
            "0.5",
        ]
    )
    try:
        deadline = time.monotonic() + 120
        while not (output / "iter_0000004" / "results.json").is_file():
            assert time.monotonic() < deadline and proc.poll() is None, (
                "the first checkpoint was not evaluated"
            )
            time.sleep(0.2)
        shutil.copytree(root / "iter_0000004", root / "iter_0000008")  # a job saving its next checkpoint
        (root / "latest_checkpointed_iteration.txt").write_text("8")
        while not (output / "iter_0000008" / "results.json").is_file():
            assert time.monotonic() < deadline and proc.poll() is None, "the new checkpoint was not evaluated"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    first, second = (samples(output / f"iter_000000{i}", "jcqa") for i in (4, 8))
    assert first == second  # the same weights give the same scores


def test_another_tokenizer_is_refused(runs, work, tmp_path):
    from tests.conftest import run_cli

    other = train_spm(tmp_path / "other", seed=7)
    proc = run_cli(
        "eval", str(runs["tp1"]["ckpt"]), "--tasks", str(work / "tasks"), "--tokenizer", str(other)
    )
    assert proc.returncode == 2
    assert "is not the one" in proc.stderr and "--tokenizer" in proc.stderr


@pytest.mark.parametrize("flags", [[], ["--cp", "2"]], ids=["dp2", "cp2"])
def test_data_and_context_parallel_evaluation_agrees(runs, work, tmp_path, flags):
    """The TP=1 checkpoint evaluated by two processes as DP=2 (rows split) or CP=2 (sequences split)."""
    output = tmp_path / "eval"
    proc = _launch(
        [
            "-m",
            "kumihimo.cli",
            "eval",
            str(runs["tp1"]["ckpt"]),
            "--tasks",
            str(work / "tasks"),
            "--output",
            str(output),
            "--batch-size",
            "3",
            "--nproc-per-node",
            "2",
            *flags,
        ]
    )
    _wait({"eval": proc})
    for task in TASKS:
        assert_same_scores(only_iteration(output), only_iteration(runs["tp1"]["megatron"]), task)
