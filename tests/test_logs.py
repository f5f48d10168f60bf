"""kumihimo.core.logs, the one console channel: loggers named kumihimo.<stage>, one handler that prefixes
each line with the stage from the logger's name, rank 0 only."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

from kumihimo.core import logs
from kumihimo.core.progress import Progress

REPO = Path(__file__).resolve().parents[1]
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def test_the_stage_comes_from_the_logger_name(capsys):
    logs.stage_logger("data_prep").info("kept 3 of 4 input lines")
    logs.stage_logger("tokenizer.merge").info("wrote m.model")
    logs.stage_logger(None).info("step 1 | loss 2.0")
    logs.stage_logger("train").info("resolved config:\nmodel: {}")
    Progress("curate", 2, "shards").close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[:5] == [
        "[data_prep] kept 3 of 4 input lines",
        "[tokenizer merge] wrote m.model",
        "step 1 | loss 2.0",
        "[train] resolved config:",
        "model: {}",
    ]
    assert re.fullmatch(r"\[curate\] 0/2 shards \(0\.0/s\)", lines[5])


def test_only_rank_zero_speaks_unless_a_record_is_for_all_ranks(capsys):
    log = logs.stage_logger("eval")
    try:
        logs.log_to_stderr(rank=1)
        log.info("hidden on rank 1")
        log.info("shown on every rank", extra={"all_ranks": True})
    finally:
        logs.log_to_stderr(rank=0)
    log.info("rank 0 again")
    assert capsys.readouterr().err.splitlines() == ["[eval] shown on every rank", "[eval] rank 0 again"]
    ours = [h for h in logging.getLogger(logs.ROOT).handlers if isinstance(h.formatter, logs.StageFormatter)]
    assert len(ours) == 1 and not logging.getLogger(logs.ROOT).propagate  # one handler, set up once


def _leading_text(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    if isinstance(node, ast.BinOp):
        return _leading_text(node.left)
    return ""


def test_messages_do_not_type_their_stage():
    """Every console line goes through a logger (no `say`), and no message starts with a typed
    `[stage] ` prefix: the handler adds it from the logger's name."""
    typed = []
    for folder in ("data_prep", "tokenizer", "pretrain", "kumihimo"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if folder == "kumihimo" and path.relative_to(REPO / folder).parts[0] in (
                "pretrain",
                "data_prep",
                "tokenizer",
                "configs",
                "slurm_templates",
            ):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else ""
                )
                if name == "say" or (
                    name in LOG_METHODS and re.match(r"\[[a-z_ ]+\] ", _leading_text(node.args[0]))
                ):
                    typed.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert typed == []
