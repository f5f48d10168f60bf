"""The README's CLI table is complete: one row per command the parser knows, naming every option of it.

Also checks the import direction of the one import root (kumihimo.core <- stages <- CLI), and that each
group verb called bare prints its help with exit code 0.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from kumihimo.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data_prep", "tokenizer", "pretrain")
ROOF = ("kumihimo.cli", "kumihimo.quickstart", "kumihimo.doctor", "kumihimo.slurm", "kumihimo.sample")


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("kumihimo",)):
    """(command words, its options) for every command that runs something."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        return
    for name, sub in groups[0].choices.items():
        yield from leaf_commands(sub, (*path, name))


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
            if not action.option_strings and action.dest == "config":
                assert "CONFIG" in row, f"README row `{row}` does not name its CONFIG argument"
            if not action.option_strings and action.dest == "overrides":
                assert "key=value" in row, f"README row `{row}` does not show key=value overrides"
    known = {" ".join(words) for words in commands}
    for row in rows:
        words = row.split()
        assert any(" ".join(words[:n]) in known for n in range(2, 4)), f"README row `{row}` is not a command"


@pytest.mark.parametrize("verb", ["data", "tokenizer", "slurm", "convert"])
def test_bare_group_verb_prints_its_help(verb, capsys):
    assert main([verb]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kumihimo {verb}")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def test_one_import_root_and_no_arrow_back_up():
    problems = []
    for path in _python_files(*STAGES, "kumihimo/core", "tests", "benchmarks", "kumihimo"):
        if (
            "kumihimo/data_prep" in str(path)
            or "kumihimo/pretrain" in str(path)
            or "kumihimo/tokenizer" in str(path)
        ):
            continue  # the links to the stage folders, read once through their real paths
        rel = path.relative_to(REPO)
        for name in _imports(path):
            if name.split(".")[0] in STAGES:
                problems.append(f"{rel}: imports {name} (write kumihimo.{name})")
            in_stage = rel.parts[0] in STAGES
            in_core = rel.parts[:2] == ("kumihimo", "core")
            if (in_stage or in_core) and any(name == r or name.startswith(r + ".") for r in ROOF):
                problems.append(f"{rel}: imports {name}, which sits above it (the CLI layer)")
            if in_core and any(name.startswith(f"kumihimo.{stage}") for stage in STAGES):
                problems.append(f"{rel}: kumihimo.core imports the stage {name}")
    assert not problems, "\n".join(problems)


def test_stage_folders_are_the_packages_kumihimo_imports():
    import kumihimo.data_prep
    import kumihimo.pretrain
    import kumihimo.tokenizer

    for module, folder in (
        (kumihimo.data_prep, "data_prep"),
        (kumihimo.pretrain, "pretrain"),
        (kumihimo.tokenizer, "tokenizer"),
    ):
        assert Path(module.__file__).resolve() == REPO / folder / "__init__.py"
