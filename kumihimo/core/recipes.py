"""Where recipes and batch scripts come from: a path the user gives, or the copies that ship with kumihimo.

The checkout's `configs/` and `slurm/` folders install as the package data `kumihimo.configs` and
`kumihimo.slurm_templates` (pyproject.toml's package-dir mapping), so a wheel install has them too and every verb finds them from any working
directory. A recipe argument is a path when that file exists, otherwise the name of a shipped recipe:
`kumihimo train llmjp3-172b` and `kumihimo train configs/pretrain/llmjp3-172b.yaml` mean the same file
wherever they are typed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kumihimo.core.errors import UserError

RECIPE_SUFFIX = ".yaml"


def _package_folder(package: str) -> Path:
    """The one folder of a data-only package (no __init__.py): `configs/` of the checkout for an editable
    install, the installed copy for a wheel."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package data {package} is missing: reinstall kumihimo (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_root() -> Path:
    """The folder holding the shipped recipes (`configs/` of the checkout, or of the installed package)."""
    return _package_folder("kumihimo.configs")


def templates_root() -> Path:
    """The folder holding the shipped Slurm batch scripts and profiles (`slurm/` of the checkout)."""
    return _package_folder("kumihimo.slurm_templates")


def shipped_recipe(folder: str, name: str) -> Path:
    """The shipped recipe `configs/<folder>/<name>.yaml` (for code that names a recipe itself)."""
    return shipped_root() / folder / f"{name}{RECIPE_SUFFIX}"


def shipped_names(folder: str) -> list[str]:
    root = shipped_root() / folder
    return (
        sorted(p.name.removesuffix(RECIPE_SUFFIX) for p in root.glob(f"*{RECIPE_SUFFIX}"))
        if root.is_dir()
        else []
    )


def resolve_recipe(arg: str | os.PathLike, folder: str | None) -> Path:
    """The file a recipe argument names: an existing path, else a shipped recipe of `folder`.

    `folder` is the stage's folder under configs/ (data_prep, tokenizer, pretrain); None accepts paths only.
    """
    path = Path(arg)
    if path.is_file():
        return path
    if folder is None:
        raise UserError(f"config file {str(path)!r} does not exist; pass the path of a YAML recipe")
    parts = path.parts
    if len(parts) == 1:  # a bare name: tiny-cpu or tiny-cpu.yaml
        candidate = shipped_recipe(folder, parts[0].removesuffix(RECIPE_SUFFIX))
    elif len(parts) >= 2 and parts[0] == "configs" and not path.is_absolute():
        candidate = shipped_root().joinpath(*parts[1:])  # the README's paths, typed outside the checkout
    else:
        candidate = None
    if candidate is not None and candidate.is_file():
        return candidate
    names = ", ".join(shipped_names(folder)) or "none"
    raise UserError(
        f"config file {str(path)!r} does not exist and is not a shipped {folder} recipe; pass the "
        f"path of a YAML recipe or one of: {names}"
    )
