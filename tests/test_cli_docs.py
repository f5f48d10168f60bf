"""The README's CLI table is complete: one row per command the parser knows, naming every option of it.

Also checks that each group verb called bare prints its help with exit code 0, and that every documented
command runs or says why not. (The shape of the package itself is tests/test_packaging.py's.)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from kumihimo.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("kumihimo",)):
    """(command words, its options) for every command that runs something."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        return
    for name, sub in groups[0].choices.items():
        yield from leaf_commands(sub, (*path, name))


FLAG_ACTIONS = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse._StoreConstAction,
    argparse._CountAction,
    argparse._VersionAction,
)


def readme_cli_rows() -> dict[str, str]:
    """First cell of each row of the README's CLI table -> that cell."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*`(kumihimo[^`]*)`\s*\|", line)
        if match:
            rows[match.group(1)] = match.group(1)
    return rows


def test_readme_cli_table_names_every_command_and_option():
    rows = readme_cli_rows()
    commands = dict(leaf_commands(build_parser()))
    for words, actions in commands.items():
        command = " ".join(words)
        matching = [row for row in rows if row == command or row.startswith(command + " ")]
        assert matching, f"README's CLI table has no row for `{command}`"
        row = matching[0]
        for action in actions:
            for option in action.option_strings:
                assert re.search(rf"{re.escape(option)}\b", row), f"README row `{row}` does not name {option}"
                if action.nargs != 0 and not isinstance(action, FLAG_ACTIONS):  # it takes a value: show one
                    assert re.search(rf"{re.escape(option)}[ =][^\s\[\]|-]", row), (
                        f"README row `{row}` shows {option} without the value it takes"
                    )
            if not action.option_strings and action.dest == "config":
                assert "CONFIG" in row, f"README row `{row}` does not name its CONFIG argument"
            if not action.option_strings and action.dest == "overrides":
                assert "key=value" in row, f"README row `{row}` does not show key=value overrides"
    known = {" ".join(words) for words in commands}
    for row in rows:
        words = row.split()
        assert any(" ".join(words[:n]) in known for n in range(2, 4)), f"README row `{row}` is not a command"


@pytest.mark.parametrize("verb", ["data", "tokenizer", "slurm", "pbs", "convert"])
def test_bare_group_verb_prints_its_help(verb, capsys):
    assert main([verb]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kumihimo {verb}")


# ------------------------------------------------------------------ every documented command (issue 30)
#
# Every command block of README.md and docs/*.md carries a marker right above it: either
# `<!-- doc-test: run by tests/FILE.py::TEST -->` (that test runs the block) or
# `<!-- doc-test: not run: REASON -->` (e.g. it needs a GPU cluster). Every `kumihimo ...` command in a
# block, and every inline `kumihimo ...` span of docs/, must parse with the real parser, and its recipe
# with its overrides must load, from a folder outside the checkout.

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
MARKER = re.compile(r"<!-- doc-test: (?:run by (?P<test>\S+)|not run: (?P<reason>.+?)) -->\s*$")
SHELL_START = re.compile(r"^(#|kumihimo |python|pip |[A-Z_]+=|\. |cat |sbatch )")


def command_blocks() -> list[tuple[str, str, re.Match | None]]:
    """(where, body, marker) of every fenced block that holds shell commands."""
    blocks = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for fence in FENCE.finditer(text):
            lang, body = fence.group(1), fence.group(2)
            first = next((line for line in body.splitlines() if line.strip()), "")
            if lang not in ("bash", "sh", "") or not SHELL_START.match(first):
                continue
            above = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
            where = f"{path.relative_to(REPO)}:{text[: fence.start()].count(chr(10)) + 1}"
            blocks.append((where, body, MARKER.search(above)))
    return blocks


def shell_commands(body: str) -> list[list[str]]:
    """The simple commands of a block: continuations joined, heredoc bodies and comments dropped,
    split at && and ;, leading VAR=value assignments removed."""
    import shlex

    lines, heredoc_end = [], None
    for line in body.replace("\\\n", " ").splitlines():
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        match = re.search(r"<<\s*'?(\w+)'?", line)
        if match:
            heredoc_end = match.group(1)
            line = line[: match.start()]
        lines.append(line)
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                while current and re.match(r"^[A-Z_]+=", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def kumihimo_argv(command: list[str]) -> list[str] | None:
    """The arguments after `kumihimo` (or `python -m kumihimo.cli`, `torchrun ... -m kumihimo.cli`)."""
    if command[0] == "kumihimo":
        return command[1:]
    if "kumihimo.cli" in command and command[command.index("kumihimo.cli") - 1] == "-m":
        return command[command.index("kumihimo.cli") + 1 :]
    return None


def inline_commands() -> list[tuple[str, list[str]]]:
    """`kumihimo ...` code spans of docs/ prose that are whole commands (no [optional] or ... parts)."""
    import shlex

    found = []
    for path in DOC_FILES[1:]:
        text = FENCE.sub("", path.read_text(encoding="utf-8"))
        for span in re.findall(r"`(kumihimo [^`\n]+)`", text):
            if any(mark in span for mark in ("[", "...", "|", "<")):
                continue
            found.append((f"{path.relative_to(REPO)}: `{span}`", shlex.split(span)[1:]))
    return found


def unknown_options(argv: list[str]) -> list[str]:
    """Options of a (possibly partial) `kumihimo ARGV` that its command does not have."""
    commands = {" ".join(words[1:]): actions for words, actions in leaf_commands(build_parser())}
    words = [w for w in argv if not w.startswith("-")]
    for n in (2, 1):
        if " ".join(words[:n]) in commands:
            known = {
                "--help",
                *(o for action in commands[" ".join(words[:n])] for o in action.option_strings),
            }
            return [w.split("=")[0] for w in argv if w.startswith("--") and w.split("=")[0] not in known]
    return [f"no command {' '.join(words[:2])!r}"]


def check_kumihimo_command(argv: list[str]) -> str | None:
    """None if `kumihimo ARGV` parses and its recipe loads with its overrides; else what is wrong."""
    import contextlib
    import io

    from kumihimo.cli import _VERBS

    verb = argv[0] if argv and argv[0] in _VERBS else None
    if verb is None:
        return f"`{argv[0] if argv else ''}` is not a verb"
    parser = build_parser([verb])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = parser.parse_known_args(argv)
    except SystemExit:
        return f"does not parse: {err.getvalue().strip().splitlines()[-1]}"
    unknown = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if unknown:
        return f"unknown arguments {unknown}"
    overrides = [*(getattr(args, "overrides", None) or []), *(a for a in extra if a not in unknown)]
    config = getattr(args, "config", None)
    loader = recipe_loader(argv)
    if config is None or loader is None:
        return None
    from kumihimo.core.errors import UserError
    from kumihimo.core.recipes import resolve_recipe

    folder = {"train": "pretrain", "plan": "pretrain", "slurm": "pretrain", "data": "data_prep"}.get(
        verb, "tokenizer"
    )
    try:
        path = resolve_recipe(config, folder)
    except UserError:
        return None  # a file the surrounding block or text creates (checked where the block runs)
    try:
        loader(path, overrides)
    except (UserError, ValueError) as exc:
        return f"recipe {config} with {overrides} does not load: {exc}"
    return None


def recipe_loader(argv: list[str]):
    from kumihimo.core import configtree

    if argv[0] in ("train", "plan") or argv[:2] == ["slurm", "submit"]:
        from kumihimo.pretrain.config import TrainConfig

        return lambda path, overrides: configtree.load(TrainConfig, path, overrides)
    if argv[0] == "data" and argv[1] in ("curate", "tokenize", "run", "refilter"):
        from kumihimo.data_prep.config import load_config

        return load_config
    if argv[:2] == ["tokenizer", "train"]:
        from kumihimo.tokenizer.config import TokenizerTrainConfig

        return lambda path, overrides: configtree.load(TokenizerTrainConfig, path, overrides)
    return None


def test_every_command_block_is_run_by_a_test_or_says_why_not():
    problems = []
    for where, _body, marker in command_blocks():
        if marker is None:
            problems.append(
                f"{where}: no `<!-- doc-test: run by ... -->` or `<!-- doc-test: not run: ... -->`"
            )
        elif marker.group("test"):
            file, _, name = marker.group("test").partition("::")
            source = REPO / file
            if not source.is_file() or f"def {name}(" not in source.read_text(encoding="utf-8"):
                problems.append(f"{where}: the marker names {marker.group('test')}, which does not exist")
    assert not problems, "\n".join(problems)


def test_every_documented_command_parses_and_its_recipe_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "from any working directory": nothing may depend on the checkout
    commands = [
        (where, kumihimo_argv(c)) for where, body, _ in command_blocks() for c in shell_commands(body)
    ]
    commands = [(where, argv) for where, argv in commands if argv is not None]
    assert len(commands) > 10
    problems = [
        f"{where}: kumihimo {' '.join(argv)}: {problem}"
        for where, argv in commands
        for problem in [check_kumihimo_command(argv)]
        if problem
    ]
    # inline spans may be partial (`kumihimo convert to-hf` names the verb): their options must exist
    inline = inline_commands()
    assert len(inline) > 20
    problems += [
        f"{where}: unknown {bad}" for where, argv in inline for bad in [unknown_options(argv)] if bad
    ]
    assert not problems, "\n".join(problems)


def help_examples() -> list[tuple[str, list[str]]]:
    """(command, argv) of every `kumihimo ...` line in the examples of a verb's --help."""
    import shlex

    found = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for line in (parser.epilog or "").replace("\\\n", " ").splitlines():
            match = re.match(r"^\s+kumihimo (.+)$", line)
            if match:
                found.append((path, shlex.split(match.group(1), comments=True)))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(build_parser(), "kumihimo")
    return found


def test_every_help_example_parses_and_plan_examples_run(tmp_path, monkeypatch, capsys):
    """The examples under each verb's --help are documentation too; `plan` is cheap, so its run."""
    monkeypatch.chdir(tmp_path)
    examples = help_examples()
    assert len(examples) > 15
    problems = [
        f"{where}: kumihimo {' '.join(argv)}: {problem}"
        for where, argv in examples
        for problem in [check_kumihimo_command(argv)]
        if problem
    ]
    assert not problems, "\n".join(problems)
    plans = [argv for _, argv in examples if argv[0] == "plan"]
    assert plans
    for argv in plans:
        assert main(argv) == 0, capsys.readouterr().err


def documented_block(test_name: str) -> str:
    """The body of the one command block whose marker names `test_name`."""
    bodies = [
        body
        for _, body, marker in command_blocks()
        if marker and (marker.group("test") or "").endswith(f"::{test_name}")
    ]
    assert len(bodies) == 1, f"{len(bodies)} blocks are marked as run by {test_name}"
    return bodies[0]


def reader_shell(tmp_path: Path) -> dict[str, str]:
    """The environment of a reader with kumihimo installed: `kumihimo` and `python` on PATH (this
    checkout's code), working in a folder outside the checkout."""
    import os
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scripts, not symlinks: a symlinked interpreter would not find its virtual environment
    for name, command in (("python", ""), ("kumihimo", " -m kumihimo.cli")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
    )


@pytest.mark.slow  # the whole documented path: make a model, import, curate+tokenize, train 5 steps, export, eval x2
def test_continual_pretraining_path_runs_as_printed(tmp_path):
    """docs/continual_pretraining.md's block, word for word, in an empty folder outside the checkout."""
    import json
    import subprocess

    body = documented_block("test_continual_pretraining_path_runs_as_printed")
    work = tmp_path / "reader"
    work.mkdir()
    (work / "path.sh").write_text("set -euo pipefail\n" + body)
    proc = subprocess.run(
        ["bash", "path.sh"],
        cwd=work,
        env=reader_shell(tmp_path),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr
    # the export is in the checkpoint's precision (fp32), so it scores as the checkpoint does
    config = json.loads((work / "models/tiny-qwen2-ja/config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert not (work / "models/tiny-qwen2-ja/eval").exists()  # the export folder holds the export alone
    assert (work / "runs/tiny-qwen2-ja/metrics.html").is_file()  # every run folder, evaluated or not
    ours = json.loads(next((work / "runs/tiny-qwen2-ja/checkpoints/eval").rglob("results.json")).read_text())
    theirs = json.loads(next((work / "models/tiny-qwen2-ja-eval").rglob("results.json")).read_text())
    for task in ("reading_ja",):
        for metric in ("acc", "acc_norm"):
            assert ours["tasks"][task][metric] == theirs["tasks"][task][metric], (task, metric)
