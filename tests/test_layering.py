"""The import layering of docs/ARCHITECTURE.md, checked on the source: no module imports a module of a higher
layer, and no modules import each other in a cycle. Imports inside functions count (the whole AST is walked)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "data_pipeline", "pretrain", "launch")

# Bottom to top. A module belongs to the layer of its longest matching prefix; it may import from its own
# layer and the ones below. Keep this list and the table in docs/ARCHITECTURE.md the same.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("kernels",)),
    ("data", ("data_pipeline",)),
    (
        "foundation",
        (
            "pretrain",  # the package's __init__
            "pretrain.config",
            "pretrain.runtime",
            "pretrain.distributed",
            "pretrain.logs",
            "pretrain.rng",
            "pretrain.memory",
            "pretrain.progress",
            "pretrain.visualize",
            "pretrain.checkpoint",
            "pretrain.tracking",
            "pretrain.resume_changes",
        ),
    ),
    (
        "models",
        ("pretrain.models", "pretrain.diffusion", "pretrain.optim", "pretrain.flops", "pretrain.activation_memory"),
    ),
    ("methods", ("pretrain.methods",)),
    ("engines", ("pretrain.engines",)),
    ("recipes", ("pretrain.recipes", "pretrain.data")),
    (
        "applications",
        (
            "pretrain.train",
            "pretrain.eval",
            "pretrain.ckpt",
            "pretrain.sample",
            "pretrain.bench",
            "pretrain.demo",
            "pretrain.latent_shards",
            "pretrain.token_shards",
            "pretrain.plan",
        ),
    ),
    ("launch", ("launch",)),
    ("cli", ("pretrain.cli",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports, at any depth of its AST; `from a import b` counts as a.b when that
    is a module, else as a."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where c is an attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in source_modules() if layer_of(name) is None)
    assert not unplaced, f"add these modules to LAYERS (and docs/ARCHITECTURE.md): {unplaced}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from pretrain.train import Trainer\n    import launch.cli\n")
    known = {"pretrain.train", "launch.cli", "launch", "pretrain"}
    assert imported_modules(source, "probe", known) == {"pretrain.train", "launch.cli"}
