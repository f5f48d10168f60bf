"""The one CLI: every verb has --help; user errors are one line with exit code 2."""

import pytest

from kumihimo.cli import main
from tests.conftest import run_cli

VERBS = ["data", "tokenizer", "train", "plan", "convert", "quickstart", "doctor"]


def test_top_level_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    assert "usage: kumihimo" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hiden_size=3"], "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
        (
            ["parallelism.tensor_model_parallel_size=3"],
            "parallelism.tensor_model_parallel_size=3 does not divide model.num_attention_heads=4",
        ),
        (
            ["data.mock=false", "data.tokenizer=t.model", "data.blend_file=/nonexistent/blend.yaml"],
            "data.blend_file='/nonexistent/blend.yaml' does not exist",
        ),
        (["data.mock=false"], "data.blend_file is missing"),
    ],
)
def test_bad_train_config_is_one_line_exit_2(overrides, message):
    proc = run_cli("train", "configs/pretrain/tiny-cpu.yaml", *overrides, "--check", timeout=60)
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("kumihimo: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_exit_2():
    proc = run_cli("train", "configs/pretrain/nope.yaml", timeout=60)
    assert proc.returncode == 2
    assert "config file 'configs/pretrain/nope.yaml' does not exist" in proc.stderr


def test_check_prints_the_layout():
    proc = run_cli(
        "train",
        "configs/pretrain/tiny-cpu.yaml",
        "--check",
        "--nproc-per-node",
        "2",
        "parallelism.tensor_model_parallel_size=2",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TP=2 PP=1 CP=1 DP=1" in proc.stdout


def test_unknown_argument_is_rejected():
    proc = run_cli("train", "configs/pretrain/tiny-cpu.yaml", "--bogus", timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_doctor_reports_and_validates_a_config():
    proc = run_cli("doctor", "--config", "configs/pretrain/tiny-cpu.yaml", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[OK  ] megatron.core" in proc.stdout and "[OK  ] config" in proc.stdout
    assert "gloo all-reduce" in proc.stdout
    bad = run_cli("doctor", "--config", "configs/pretrain/tiny-cpu.yaml", "data.mock=false", timeout=120)
    assert bad.returncode == 1 and "[FAIL] config" in bad.stdout


def test_plan_reproduces_the_172b_reference_layout(capsys):
    """LLM-jp-3 172B on 64 x 8 H100: 172B parameters, 216 micro-batches, ~6.9% bubble, fits in 80 GB."""
    assert main(["plan", "configs/pretrain/llmjp3-172b.yaml", "--nodes", "64", "--vocab-size", "99574"]) == 0
    out = capsys.readouterr().out
    # every parameter once (the norms are no longer counted once per TP rank, as until the MoE plan: 172.41B)
    assert "172.40B parameters (vocabulary padded to 99,840)" in out
    assert "TP=4 PP=16 CP=1 DP=8" in out and "216 micro-batches" in out
    assert "pipeline bubble: 6.9%" in out and "-> fits" in out
    assert main(["plan", "configs/pretrain/llmjp3-13b.yaml", "--nodes", "1", "--vocab-size", "99574"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab-size", "0"], "--vocab-size=0 must be >= 1"),
        (["--gpu-memory-gb", "-80"], "--gpu-memory-gb=-80 is not a GPU memory size"),
        (["--gpu-memory-gb", "nan"], "--gpu-memory-gb=nan is not a GPU memory size"),
        (["--gpu-memory-gb", "inf"], "--gpu-memory-gb=inf is not a GPU memory size"),
        (["--gpu-memory-gb", "1e-300"], "--gpu-memory-gb=1e-300 is not a GPU memory size (at least 1 GB)"),
        (["--nodes", "0"], "--nodes=0 and --gpus-per-node=8 must both be >= 1"),
    ],
)
def test_plan_refuses_meaningless_numbers(capsys, args, message):
    """Issue 12 item 10: these printed a plan ending in "fits"."""
    assert main(["plan", "configs/pretrain/tiny-cpu.yaml", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and "fits" not in captured.out


def test_doctor_fails_a_cuda_recipe_without_a_gpu_and_a_full_checkpoint_disk(monkeypatch, tmp_path):
    """Issue 12 item 10: doctor said "all checks passed" for both."""
    import shutil
    from types import SimpleNamespace

    import torch

    from kumihimo import doctor
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig

    config = configtree.load(
        TrainConfig, "configs/pretrain/tiny-cpu.yaml", ["runtime.device=cuda", f"checkpoint.dir={tmp_path}"]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=0))
    report = doctor.Report()
    doctor.check_config_needs(report, config)
    doctor.check_disk(report, config)
    statuses = {check: (status, detail) for status, check, detail in report.lines}
    assert statuses["device"][0] == "FAIL" and "runtime.device=cpu" in statuses["device"][1]
    assert statuses["disk"][0] == "FAIL" and f"0.0 GiB free at {tmp_path}" in statuses["disk"][1]
    assert report.verdict() == "problems found (FAIL above)"
    warned = doctor.Report([("OK", "a", ""), ("WARN", "b", "")])
    assert warned.verdict() == "no failures; 1 warning(s) above"


def test_doctor_does_not_claim_te_is_needed_for_sequence_or_context_parallelism(monkeypatch):
    from kumihimo import doctor

    monkeypatch.setattr(doctor, "_version", lambda module: None)
    report = doctor.Report()
    doctor.check_software(report)
    hint = next(detail for _, check, detail in report.lines if check == "transformer_engine")
    assert "needed for FP8" in hint and "sequence and context parallelism without it" in hint
