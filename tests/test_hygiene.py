"""House rules: the stdlib ``tokenize`` is never shadowed, and only nextscale/pipelines imports ray."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "nextscale"


def test_stdlib_tokenize_is_not_shadowed_in_the_project():
    import tokenize

    import nextscale.tokenize  # noqa: F401

    assert Path(tokenize.__file__).name == "tokenize.py" and hasattr(tokenize, "open")
    assert "def test_stdlib_tokenize" in inspect.getsource(test_stdlib_tokenize_is_not_shadowed_in_the_project)
    top_level = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
    assert not top_level & set(sys.stdlib_module_names), top_level


def test_stdlib_tokenize_in_a_subprocess_started_in_the_repo_root():
    code = "import tokenize, nextscale.tokenize; print(tokenize.__file__, hasattr(tokenize, 'open'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("tokenize.py True"), out


def test_stdlib_tokenize_in_a_ray_worker(ray_local):
    @ray_local.remote
    def probe():
        import tokenize

        import nextscale.tokenize  # noqa: F401

        return tokenize.__file__, hasattr(tokenize, "open")

    path, has_open = ray_local.get(probe.remote())
    assert path.endswith("tokenize.py") and has_open


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_pipelines_imports_ray():
    offenders = [
        str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
        if "pipelines" not in p.relative_to(PACKAGE).parts and "ray" in _imported_modules(p)
    ]
    assert offenders == []


def test_library_modules_import_without_ray():
    modules = [
        ".".join(p.relative_to(REPO).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
        if "pipelines" not in p.relative_to(PACKAGE).parts and p.name != "__init__.py"
    ]
    code = "import sys; sys.modules['ray'] = None\n" + "\n".join(f"import {m}" for m in modules)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_no_package_imports_rebind_stdlib_or_builtin_names():
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "nextscale":
                assert not {a.name for a in node.names} & {"tokenize", "eval"}, p


def test_the_stage_table_is_complete_and_help_imports_neither_ray_nor_torch():
    from nextscale import stages

    assert list(stages._configs()) == list(stages._drivers()) == list(stages.STAGES)
    assert all(callable(s.run) and dataclasses.is_dataclass(s.config) for s in stages.STAGES.values())
    code = ("import contextlib, io, sys\nfrom nextscale.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
