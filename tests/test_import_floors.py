"""The import floors of the code (issue #12): kernels at the bottom, each layer importing only from below itself,
no cycles, and no project import hidden inside a function to dodge one.

Read from the source with ast (nothing is imported), so a new upward import or cycle fails here at once, with the
file and line. LAYERS is the order, lowest first; modules of one layer may import each other, and a module may
import any lower layer. Imports under `if TYPE_CHECKING:` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("plugins", "builder")

# lowest first: a module may import its own layer and the ones before it. "=name" holds that module only (not the
# modules under it): the model registry is the package builder.models, its family files sit higher.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("plugins",),                                           # the floor: reference ops, GPU kernels, number formats
    ("builder.errors", "builder"),                          # (the package itself holds only __version__)
    ("=builder.models",),                                   # the registry (data); it imports family files on demand
    ("builder.config",),
    ("builder.quantize",),                                  # quantization arithmetic and the CLI modes
    ("builder.layers",),                                    # layers shared by the model families, the decoder
    ("builder.models",),                                    # family files: config translation, weight table, model
    ("builder.checkpoint",),                                # HF reading, conversion to the engine layout, calibration
    ("builder.runtime",),                                   # the engine
    ("builder.accuracy",),                                  # accuracy of a build: converts and runs engines
    ("builder.triton", "builder.client", "builder.workload"),
    ("builder.repo", "builder.trtllm_build", "builder.serve", "builder.bench", "builder.soak"),
    ("builder.build",),
    ("builder.cli",),
)

# layers that must not import each other although the order would allow it: (importer, imported) -> why
SEPARATE: dict[tuple[str, str], str] = {
    ("builder.runtime", "builder.checkpoint"): "the runtime reads the engine files, it does not ask the converter "
                                               "what it wrote",
}

# (importing module, imported module) -> reason: known debts of SEPARATE (none left: the runtime reads the weight
# table and the rank layout from builder.models, as the converter does)
DEBTS: dict[tuple[str, str], str] = {}

# function-level project imports kept lazy on purpose (never to dodge a cycle: lazy imports count in the cycle
# and layer checks too). A module listed alone may import lazily anywhere in it.
LAZY_MODULES: dict[str, str] = {
    "builder.cli": "each subcommand imports what it runs: `builder serve` and `builder generate` start without torch",
}
LAZY_ALLOWED: dict[tuple[str, str], str] = {
    ("plugins", "plugins.gpu"): "Triton kernels: triton is a GPU-only dependency",
    ("plugins.linear", "plugins.gpu.linear"): "Triton kernels: triton is a GPU-only dependency",
    ("builder.build", "builder.checkpoint.tiny"): "transformers' model classes, needed only to make a tiny model",
    ("builder.bench", "builder.triton.detokenizer"): "transformers' tokenizers, needed only with --repo",
    ("builder.runtime.distributed", "builder.runtime.model_runner"):
        "the worker's entry point: imported in the spawned process, where it is the first import",
}


@dataclass(frozen=True)
class Import:
    """One project import: where it is and what it names."""

    module: str    # importing module
    target: str    # imported module (the longest project module the statement names)
    line: int
    lazy: bool     # inside a function


def module_name(path: Path) -> str:
    """builder/runtime/engine.py -> builder.runtime.engine; a package's __init__ -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project packages."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (from a.b import c: a.b.c when that is a module, else a.b)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The project imports of one file (TYPE_CHECKING blocks skipped)."""
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub, lazy)
                continue
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != module:
                    found.append(Import(module, target, child.lineno, lazy))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that holds module."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.startswith("="):
                if module == prefix[1:]:
                    return index
            elif (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS; add it"
    return best


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]


def where(imp: Import) -> str:
    return f"{project_modules()[imp.module].relative_to(ROOT)}:{imp.line}: {imp.module} imports {imp.target}"


def test_every_module_has_a_layer():
    for module in project_modules():
        layer_of(module)


def test_plugins_import_nothing_from_builder():
    bad = [where(i) for i in all_imports() if i.module.startswith("plugins") and i.target.startswith("builder")]
    assert not bad, "\n".join(bad)


def _prefix_pair(imp: Import, pair: tuple[str, str]) -> bool:
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")
    return under(imp.module, pair[0]) and under(imp.target, pair[1])


def test_no_upward_import():
    bad = [where(i) for i in all_imports() if layer_of(i.target) > layer_of(i.module)]
    assert not bad, "imports from a higher layer (LAYERS):\n" + "\n".join(bad)


def test_separate_layers_stay_apart():
    bad = [f"{where(i)} ({why})" for i in all_imports() for pair, why in SEPARATE.items()
           if _prefix_pair(i, pair) and (i.module, i.target) not in DEBTS]
    assert not bad, "\n".join(bad)


def test_no_project_import_inside_a_function():
    bad = [where(i) for i in all_imports() if i.lazy and (i.module, i.target) not in LAZY_ALLOWED
           and i.module not in LAZY_MODULES]
    assert not bad, "project imports inside a function (move them to the top, or break the cycle):\n" + \
        "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for imp in all_imports():  # lazy imports too: a cycle is a cycle wherever its import sits
        graph.setdefault(imp.module, set()).add(imp.target)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_allowlists_hold_only_what_is_still_there():
    """An entry whose import is gone must leave its list (so the lists only shrink)."""
    seen = {(i.module, i.target) for i in all_imports()}
    lazy = {(i.module, i.target) for i in all_imports() if i.lazy}
    assert not set(DEBTS) - seen, set(DEBTS) - seen
    assert not set(LAZY_ALLOWED) - lazy, set(LAZY_ALLOWED) - lazy


def test_one_dtype_map():
    """The model dtype names the config accepts are exactly those plugins.formats maps to torch dtypes."""
    from builder.config import DTYPES
    from plugins.formats import TORCH_DTYPES

    assert DTYPES == tuple(TORCH_DTYPES)
