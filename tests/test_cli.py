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
    assert "172.41B parameters (vocabulary padded to 99,840)" in out
    assert "TP=4 PP=16 CP=1 DP=8" in out and "216 micro-batches" in out
    assert "pipeline bubble: 6.9%" in out and "-> fits" in out
    assert main(["plan", "configs/pretrain/llmjp3-13b.yaml", "--nodes", "1", "--vocab-size", "99574"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
