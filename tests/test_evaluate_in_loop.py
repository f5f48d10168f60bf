"""Evaluation in the training loop: validation loss per blend source, and a stop signal that ends a
slow downstream evaluation at once so the run saves for requeue."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kumihimo.data_prep.indexed import IndexedDatasetWriter
from kumihimo.pretrain.signals import EXIT_REQUEUE
from tests.conftest import read_metrics, run_cli, signal_training

pytestmark = pytest.mark.slow  # trainings on CPU

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = ("model.num_layers=2", "schedule.lr_warmup_iters=0", "logging.log_interval=1")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    from tests.test_convert_to_hf import train_spm

    return train_spm(tmp_path_factory.mktemp("tok") / "tok", seed=4)


def write_dataset(prefix: Path, tokens_of_doc, num_docs: int = 150) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    writer = IndexedDatasetWriter(prefix, vocab_size=1000)
    docs = [tokens_of_doc(i) for i in range(num_docs)]
    writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    writer.finish()


def test_validation_loss_is_logged_per_source(tmp_path, spm_model):
    """ja_cc repeats one short cycle of tokens (learnt within a few steps), code is uniform noise:
    their validation losses must part, with the blend's loss in between."""
    rng = np.random.default_rng(0)
    cycle = np.arange(10, 30)
    write_dataset(tmp_path / "data" / "ja_cc_text_document", lambda i: np.tile(cycle, 8))
    write_dataset(tmp_path / "data" / "code_text_document", lambda i: rng.integers(4, 1000, 160))
    blend = [
        {"prefix": str(tmp_path / "data" / f"{n}_text_document"), "weight": 1.0} for n in ("ja_cc", "code")
    ]
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        TINY,
        *BASE,
        f"data.blend={json.dumps(blend)}",
        "data.mock=false",
        "data.split=80,20,0",
        f"data.tokenizer={spm_model}",
        "schedule.train_iters=8",
        "schedule.eval_interval=4",
        "schedule.eval_iters=1",
        f"output_dir={run_dir}",
        "checkpoint.enabled=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = [m for m in read_metrics(run_dir) if "val_loss" in m]
    assert [m["step"] for m in evaluated] == [4, 8]
    last = evaluated[-1]
    assert last["valid/ja_cc/loss"] < last["valid/code/loss"] - 1.0
    assert last["valid/ja_cc/loss"] < evaluated[0]["valid/ja_cc/loss"]  # the cycle is being learnt
    assert last["valid/ja_cc/loss"] < last["val_loss"] < last["valid/code/loss"]
    for key in ("val", "valid/ja_cc/", "valid/code/"):
        loss, ppl = (
            (last["val_loss"], last["val_ppl"]) if key == "val" else (last[f"{key}loss"], last[f"{key}ppl"])
        )
        assert math.isclose(ppl, math.exp(loss), rel_tol=1e-9)
    assert "validation loss per source: ja_cc" in proc.stderr
    page = (run_dir / "metrics.html").read_text()
    assert "validation loss per source" in page and "ja_cc (last" in page


def test_a_stop_signal_ends_a_slow_task_evaluation_and_the_run_saves(tmp_path, spm_model):
    """2000 four-choice questions at batch size 1 take minutes; the signal must end them in seconds."""
    doc = {"choice0": "a", "choice1": "b", "choice2": "c", "choice3": "d", "label": 0}
    lines = [json.dumps(doc | {"question": f"問{i}"}, ensure_ascii=False) + "\n" for i in range(2000)]
    (tmp_path / "slow.jsonl").write_text("".join(lines), encoding="utf-8")
    spec = {
        "name": "slow",
        "data": "slow.jsonl",
        "format": "jcommonsenseqa",
        "choices": ["choice0", "choice1", "choice2", "choice3"],
    }
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    run_dir = tmp_path / "run"
    started = time.monotonic()
    code, stderr = signal_training(
        run_dir,
        TINY,
        *BASE,
        "data.mock=true",
        f"data.tokenizer={spm_model}",
        "schedule.train_iters=50",
        "schedule.eval_interval=0",
        f"evaluation.tasks=[{tmp_path / 'slow.yaml'}]",
        "evaluation.interval=2",
        "evaluation.batch_size=1",
        f"output_dir={run_dir}",
        after_steps=1,
    )
    assert code == EXIT_REQUEUE, stderr[-3000:]
    assert time.monotonic() - started < 90
    results = json.loads((run_dir / "eval" / "iter_0000002" / "results.json").read_text())
    assert results["tasks"]["slow"]["complete"] is False
    assert "slow: stopped" in stderr
    assert (run_dir / "checkpoints" / "iter_0000002").is_dir()


def test_tasks_that_would_never_run_are_refused(tmp_path, spm_model):
    from tests.eval_tasks import write_tasks

    (task,) = write_tasks(tmp_path / "tasks", ("jcqa",))
    proc = run_cli(
        "train",
        TINY,
        *BASE,
        "data.mock=true",
        f"data.tokenizer={spm_model}",
        "schedule.eval_interval=0",
        f"evaluation.tasks=[{task}]",
        f"output_dir={tmp_path / 'run'}",
        "checkpoint.enabled=false",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "would never run" in proc.stderr and "evaluation.interval=<steps>" in proc.stderr


def test_interleaved_pipeline_scores_in_the_loop_as_one_process_does(tmp_path, spm_model):
    """PP=2 x VPP=2 (the interleaved schedule needs PP micro-batches per call) against `kumihimo eval`
    of the saved checkpoint in one process."""
    from tests.eval_tasks import write_tasks

    write_tasks(tmp_path / "tasks", ("jcqa", "jemhopqa"))
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", TINY, *BASE, "model.num_layers=4", "--nproc-per-node", "2",
        "parallelism.pipeline_model_parallel_size=2", "parallelism.virtual_pipeline_model_parallel_size=2",
        "data.mock=true", f"data.tokenizer={spm_model}", "schedule.train_iters=2", "schedule.eval_interval=2",
        "schedule.eval_iters=1", f"evaluation.tasks=[{tmp_path / 'tasks'}]", "evaluation.batch_size=3",
        f"output_dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        "eval",
        str(run_dir / "checkpoints"),
        "--tasks",
        str(tmp_path / "tasks"),
        "--output",
        str(tmp_path / "one"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("jcqa", "jemhopqa"):
        in_loop, alone = (
            [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]
            for folder in (run_dir / "eval" / "iter_0000002", tmp_path / "one" / "iter_0000002")
        )
        for x, y in zip(in_loop, alone, strict=True):
            if task == "jemhopqa":
                assert x["generated"] == y["generated"]
            else:
                assert max(abs(a - b) for a, b in zip(x["loglikelihoods"], y["loglikelihoods"])) < 1e-4
                assert x["pred"] == y["pred"]
