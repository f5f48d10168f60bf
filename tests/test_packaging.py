"""The shape of the house: one import root, one path per file, no import circles.

- The user's top-level folders (pretrain/, data_prep/, tokenizer/, configs/, slurm/) install as parts of
  `kumihimo` through pyproject.toml's package-dir mapping, with no links in the repository, and every
  folder holding Python is listed there (a forgotten one would be missing from the wheel).
- Imports point one way: kumihimo.core <- stages <- the CLI layer, and nothing imports a stage folder by
  its bare name.
- No module imports itself through others: the import graph of the project's modules, counting imports
  inside functions too (an import moved into a function "to avoid a cycle" is still an arrow), has no
  cycle.
"""

from __future__ import annotations

import ast
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data_prep", "tokenizer", "pretrain")
ROOF = (
    "kumihimo.cli",
    "kumihimo.quickstart",
    "kumihimo.doctor",
    "kumihimo.slurm",
    "kumihimo.pbs",
    "kumihimo.sample",
)


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Each installed package of kumihimo -> its folder in the checkout, from pyproject's mapping."""
    table = _setuptools()
    mapping = table["package-dir"]
    folders = {}
    for package in table["packages"]:
        root = max((name for name in mapping if package == name or package.startswith(name + ".")), key=len)
        rest = package[len(root) :].lstrip(".")
        folders[package] = REPO / mapping[root] / Path(*rest.split(".")) if rest else REPO / mapping[root]
    return folders


def _modules() -> dict[str, Path]:
    """Every module of the project by its import name."""
    modules = {}
    for package, folder in _package_folders().items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.name == "__init__.py" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _imported_names(path: Path, module: str) -> list[str]:
    """Every module name an import statement anywhere in the file names (relative imports resolved)."""
    names = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_no_links_in_the_repository():
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True)
    links = [line.split("\t", 1)[1] for line in staged.stdout.splitlines() if line.startswith("120000")]
    assert not links, f"links give files two names; install the folder through package-dir instead: {links}"


def test_every_folder_with_python_is_an_installed_package():
    listed = {folder.resolve() for folder in _package_folders().values()}
    roots = [REPO / "kumihimo", *(REPO / stage for stage in STAGES)]
    missing = sorted(
        str(path.parent.relative_to(REPO))
        for root in roots
        for path in root.rglob("*.py")
        if "__pycache__" not in path.parts and path.parent.resolve() not in listed
    )
    assert not missing, f"add these to pyproject.toml's [tool.setuptools] packages: {missing}"
    for package in ("kumihimo.configs", "kumihimo.slurm_templates"):
        assert package in _setuptools()["packages"], (
            f"{package} (the shipped recipes and scripts) is not shipped"
        )


def test_stage_folders_are_the_packages_kumihimo_imports():
    import kumihimo.data_prep
    import kumihimo.pretrain
    import kumihimo.tokenizer

    for module, folder in (
        (kumihimo.data_prep, "data_prep"),
        (kumihimo.pretrain, "pretrain"),
        (kumihimo.tokenizer, "tokenizer"),
    ):
        assert Path(module.__file__) == REPO / folder / "__init__.py"


def test_one_import_root_and_no_arrow_back_up():
    problems = []
    folders = [*STAGES, "kumihimo", "tests", "benchmarks"]
    for path in (p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))):
        rel = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] in STAGES:
                    problems.append(f"{rel}: imports {name} (write kumihimo.{name})")
                in_stage = rel.parts[0] in STAGES
                in_core = rel.parts[:2] == ("kumihimo", "core")
                if (in_stage or in_core) and any(name == r or name.startswith(r + ".") for r in ROOF):
                    problems.append(f"{rel}: imports {name}, which sits above it (the CLI layer)")
                if in_core and any(name.startswith(f"kumihimo.{stage}") for stage in STAGES):
                    problems.append(f"{rel}: kumihimo.core imports the stage {name}")
    assert not problems, "\n".join(problems)


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    graph = {}
    for module, path in modules.items():
        targets = {name for name in _imported_names(path, module) if name in modules}
        # Importing kumihimo.a.b runs kumihimo.a's __init__ first; that arrow up to a parent is no cycle.
        graph[module] = sorted(t for t in targets if t != module and not module.startswith(t + "."))
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(graph[target])))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_import_cycles_are_found(tmp_path):
    """The checker itself: a three-module circle through an import inside a function is reported."""
    files = {
        "pkg.a": "import pkg.b\n",
        "pkg.b": "def f():\n    from pkg import c\n",
        "pkg.c": "from . import a\n",
        "pkg.d": "import pkg.a\n",
    }
    modules = {}
    for name, text in files.items():
        modules[name] = tmp_path / f"{name.split('.')[1]}.py"
        modules[name].write_text(text)
    assert import_cycles(modules) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_cycles():
    cycles = import_cycles(_modules())
    assert not cycles, "import circles (give the shared concern one home below both):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )
