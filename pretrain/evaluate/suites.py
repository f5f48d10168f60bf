"""What `evaluation.tasks` and `kumihimo eval --tasks` entries name: task YAMLs, folders of them, or a
suite of published tasks read from a local data root.

    ja_leaderboard=/data/hub            lm-eval's japanese_leaderboard group (8 tasks, ja_leaderboard.py)
    ja_leaderboard_jnli=/data/hub       one task of it
    jaster=/data/llm-jp-eval/evaluation llm-jp-eval's jaster files (jaster.py); jaster_jnli=... one

or a YAML file holding `suite: ja_leaderboard` (or jaster), `data: <root>` and optionally `tasks`
(names), `limit`, `max_new_tokens` (ja_leaderboard) and `fewshot_seed` (ja_leaderboard).
"""

from __future__ import annotations

from pathlib import Path

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.pretrain.evaluate import ja_leaderboard, jaster
from kumihimo.pretrain.evaluate.tasks import Task, load_task, task_paths

SUITE_KEYS = {"suite", "data", "tasks", "limit", "max_new_tokens", "fewshot_seed"}


def _suite(name: str, root: str, settings: dict) -> list[Task]:
    names = settings.get("tasks")
    limit = settings.get("limit")
    if name in (ja_leaderboard.GROUP, "japanese_leaderboard") or name in ja_leaderboard.PRESETS:
        options = ja_leaderboard.Options(
            limit=limit,
            max_new_tokens=settings.get("max_new_tokens", ja_leaderboard.MAX_GEN_TOKS),
            fewshot_seed=settings.get("fewshot_seed", ja_leaderboard.FEWSHOT_SEED),
        )
        return ja_leaderboard.load_suite(
            root, names or ([name] if name in ja_leaderboard.PRESETS else None), options
        )
    if name == "jaster" or name.startswith("jaster_"):
        return jaster.load_suite(
            root, names or ([name.removeprefix("jaster_")] if name != "jaster" else None), limit
        )
    raise UserError(
        f"unknown suite {name!r}; use ja_leaderboard (or one of its tasks: {', '.join(ja_leaderboard.PRESETS)}) "
        "or jaster, as NAME=<data root>"
    )


def _from_yaml(path: Path) -> list[Task] | None:
    data = configtree.read_yaml(path)
    if not isinstance(data, dict) or "suite" not in data:
        return None
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown or "data" not in data:
        raise UserError(
            f"{path}: suite files take {', '.join(sorted(SUITE_KEYS))} (data required); "
            f"found {', '.join(sorted(data))}"
        )
    root = Path(data["data"])
    return _suite(str(data["suite"]), str(root if root.is_absolute() else path.parent / root), data)


def load_entries(entries: list[str]) -> list[Task]:
    """The tasks every entry names, in order; task names must be unique."""
    tasks: list[Task] = []
    for entry in entries:
        name, sep, root = str(entry).partition("=")
        if sep and not Path(entry).exists():
            tasks += _suite(name, root, {})
            continue
        for path in task_paths([entry]):
            suite = _from_yaml(path) if path.is_file() else None
            tasks += suite if suite is not None else [load_task(path)]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"task name(s) {', '.join(duplicates)} appear twice; give every task its own name")
    return tasks
