"""House rules: the stdlib ``tokenize`` is never shadowed, only nextscale/pipelines imports ray, and imports follow
the layers of docs/architecture.md."""

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

    assert all(callable(s.run) and dataclasses.is_dataclass(s.config) for s in stages.STAGES.values())
    code = ("import contextlib, io, sys\nfrom nextscale.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# The import layers of docs/architecture.md: a module imports its own layer and the layers below, never above;
# no two files import each other, even lazily; function-local imports only where ALLOWED_LOCAL says why.

LAYERS = ("core", "tokenize", "prior", "eval", "front", "pipelines", "entry")
FRONT, ENTRY = {"nextscale.api", "nextscale.levers"}, {"nextscale.cli"}

# (module, imported module): why the import waits until the function runs
ALLOWED_LOCAL = {
    ("nextscale.checkpoint", "torch.distributed.checkpoint"): "FSDP paths only; pulls in torch.distributed's DCP stack",
    ("nextscale.checkpoint", "torch.distributed.checkpoint.state_dict"): "FSDP paths only (as above)",
    ("nextscale.checkpoint", "torch.distributed.tensor"): "FSDP paths only (as above)",
    ("nextscale.prior.parallelize", "torch.distributed.fsdp"): "FSDP paths only (as above)",
    ("nextscale.cli", "nextscale.pipelines.submit"): "`nextscale --help` must not import Ray",
    ("nextscale.codes", "pyarrow"): "`nextscale --help` (cli -> preflight -> codes) must not load pyarrow",
    ("nextscale.codes", "pyarrow.parquet"): "as above",
    ("nextscale.codes", "webdataset.tariterators"): "as above: webdataset only where shards are read",
    ("nextscale.tokenize.inputs", "pyarrow.parquet"): "parquet inputs only",
    ("nextscale.storage", "pyarrow.fs"): "`import nextscale.storage` (every CLI command) stays light",
    ("nextscale.storage", "filelock"): "only for the local-cache lock",
    ("nextscale.logs", "wandb"): "optional dependency (nextscale[wandb]), only with wandb.mode on",
    ("nextscale.logs", "torch.utils.tensorboard"): "imports tensorboard: only where event files are written",
    ("nextscale.eval.features", "torch_fidelity.feature_extractor_inceptionv3"): "heavy; FID extraction only",
    ("nextscale.eval.plots", "matplotlib"): "heavy; only where curves are drawn",
    ("nextscale.eval.plots", "matplotlib.backends.backend_agg"): "as above",
    ("nextscale.eval.plots", "matplotlib.figure"): "as above",
    ("nextscale.tokenize.losses", "torchvision.models"): "optional perceptual loss only",
    ("nextscale.datasets", "torchvision"): "optional: MNIST import only",
    ("nextscale.datasets", "torchvision.datasets.mnist"): "as above",
    ("nextscale.prior.mamba2", "mamba_ssm.ops.triton.ssd_combined"): "optional CUDA kernel, absent on CPU machines",
    ("nextscale.prior.model", "torch.nn.attention.flex_attention"): "imports torch._dynamo: only with attn_impl=flex",
    ("nextscale.progress", "tqdm.auto"): "only when a bar is drawn on a terminal",
    ("nextscale.pipelines.submit", "ray.job_submission"): "only when a job is submitted",
    ("nextscale.pipelines.tokenize", "braceexpand"): "only for {a..b} input patterns",
    ("nextscale.pipelines.tokenize", "torch"): "the driver plans without torch; only actors load it",
    ("nextscale.pipelines.tokenize", "nextscale.tokenize.encode"): "as above: the encoder imports torch",
    ("nextscale.pipelines.bench.data_path", "nextscale.pipelines.tokenize"): "imports Ray: not for `nextscale bench --help`",
    ("nextscale.pipelines.demo", "nextscale.pipelines.common"): "imports Ray: not for `nextscale demo --help`",
    ("nextscale.pipelines.common", "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"):
        "imports Ray Data: only when a local instance starts",
    ("nextscale.pipelines.rehearse.measure", "ray"):
        "the parent process of the rehearsal runs stages in children, no Ray",
    ("nextscale.pipelines.rehearse.measure", "ray._private.internal_api"): "as above",
    ("nextscale.pipelines.rehearse.measure", "moto.server"): "the S3 part only (a development dependency)",
    ("nextscale.pipelines.rehearse.size", "boto3"): "the S3 part only",
    ("nextscale.pipelines.rehearse.report", "matplotlib"): "heavy; only where the pictures are drawn",
    ("nextscale.pipelines.rehearse.report", "matplotlib.pyplot"): "as above",
    ("nextscale.synthetic_imagenet", "pyarrow"): "the parquet format only",
    ("nextscale.synthetic_imagenet", "pyarrow.parquet"): "as above",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module in FRONT:
        return "front"
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) of every import in ``path`` (TYPE_CHECKING blocks aside)."""
    out = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, local, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
                out.extend((n if n in _MODULES else child.module, local, child.lineno) for n in names)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


_MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_imports_follow_the_layers_of_docs_architecture():
    against = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)}) at line {line}"
               for m, p in _MODULES.items() for t, _, line in _imports(p)
               if t in _MODULES and LAYERS.index(_layer(t)) > LAYERS.index(_layer(m))]
    assert against == []
    doc = (REPO / "docs" / "architecture.md").read_text()
    assert " → ".join(reversed(LAYERS)) in doc  # the doc states the same order


def test_no_two_files_import_each_other_even_lazily():
    graph = {m: {t for t, _, _ in _imports(p) if t in _MODULES and t != m} for m, p in _MODULES.items()}
    cycles = []
    for start in graph:  # a path from one of start's imports back to start
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == start:
                cycles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
    assert cycles == []


def test_function_local_imports_are_only_the_allowed_deferred_ones():
    local = {(m, t) for m, p in _MODULES.items() for t, is_local, _ in _imports(p) if is_local}
    assert sorted(local - set(ALLOWED_LOCAL)) == []
    assert sorted(set(ALLOWED_LOCAL) - local) == []  # no stale entries
