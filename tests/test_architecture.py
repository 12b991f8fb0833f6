"""The README's "who may import whom", checked on the source: every import statement,
at module level or inside a function, of the package and of `kernels/` (installed as
`transnormer_kernels`)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_transnormer"
KERNELS = "transnormer_kernels"  # the import name of the top-level kernels/ folder

# package -> the project packages its modules may import (besides their own), and third-party
# packages they must not import.
RULES = {
    KERNELS: ((), ("megatron", "deepspeed")),
    f"{PACKAGE}.config": ((), ("torch", "deepspeed", "megatron")),
    f"{PACKAGE}.data": ((f"{PACKAGE}.config",), ("deepspeed", "megatron")),  # data.blend's entries
    f"{PACKAGE}.evaluation": ((), ("deepspeed", "megatron")),
    f"{PACKAGE}.parallel": ((KERNELS,), ()),  # the context-parallel form of the attention kernels
    f"{PACKAGE}.model": ((KERNELS, f"{PACKAGE}.parallel"), ("deepspeed",)),
    f"{PACKAGE}.training": ((KERNELS, f"{PACKAGE}.config", f"{PACKAGE}.data", f"{PACKAGE}.evaluation",
                             f"{PACKAGE}.parallel", f"{PACKAGE}.model"), ()),
    f"{PACKAGE}.generation": ((KERNELS, f"{PACKAGE}.parallel", f"{PACKAGE}.model", f"{PACKAGE}.data"),
                              ("deepspeed",)),
    # The Hugging Face modeling code is copied into every export: it stands alone.
    f"{PACKAGE}.hf": ((), ("deepspeed", "megatron")),
    # The planner's formulas, and the measurements that check them on real training steps.
    f"{PACKAGE}.planning": ((KERNELS, f"{PACKAGE}.config", f"{PACKAGE}.data", f"{PACKAGE}.parallel",
                             f"{PACKAGE}.model", f"{PACKAGE}.training"), ()),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":
        parts[0] = KERNELS
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module or ""
            target = (f"{base}.{module}" if module else base) if node.level else module
            # `from pkg import name` may import the submodule pkg.name
            found.update(f"{target}.{alias.name}" for alias in node.names)
            found.add(target)
    return found


def _sources() -> dict[str, Path]:
    files = list((REPO / PACKAGE).rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))
    return {_module_name(p): p for p in files}


def _owner(module: str) -> str | None:
    return next((pkg for pkg in RULES if module == pkg or module.startswith(pkg + ".")), None)


def test_each_package_imports_only_what_the_architecture_allows():
    sources = _sources()
    violations = []
    for module, path in sources.items():
        owner = _owner(module)
        if owner is None:
            continue
        allowed, forbidden_external = RULES[owner]
        for target in _imports(path):
            top = target.split(".")[0]
            if top in forbidden_external:
                violations.append(f"{module} imports {target}")
            target_owner = _owner(target)
            if target_owner and target_owner != owner and target_owner not in allowed:
                violations.append(f"{module} imports {target} ({target_owner} is not among {allowed or 'none'})")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycles():
    """Between modules; lazy imports inside functions count (they are how cycles hide). A
    module importing its own package is not an edge: Python runs the package's __init__
    first anyway, and an __init__ re-exports its submodules."""
    sources = _sources()
    graph = {m: {t for t in _imports(p) if t in sources and t != m and not m.startswith(t + ".")}
             for m, p in sources.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)
