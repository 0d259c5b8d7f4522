"""The layout's rules, checked on the source: imports point one way and packages import no cycle.

Order (a package may import only those before it): latent <- autoencoders <- modalities <- pipelines <- train.py.
Every import statement counts, also the ones inside functions (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ["latent", "autoencoders", "modalities", "pipelines", "train"]
LIBRARY = ORDER[:-1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file; relative imports stay in their package."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def package_files(pkg: str) -> list[Path]:
    return [REPO / "train.py"] if pkg == "train" else sorted((REPO / pkg).rglob("*.py"))


def edges() -> list[tuple[str, str, str]]:
    """(importing module, imported module, where) for imports between the project's packages."""
    out = []
    for pkg in ORDER:
        for f in package_files(pkg):
            mod = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for line, name in imports_of(f):
                if name.split(".")[0] in ORDER:
                    out.append((mod, name, f"{f.relative_to(REPO)}:{line}"))
    return out


def test_imports_point_one_way():
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in edges()
           if ORDER.index(dst.split(".")[0]) > ORDER.index(src.split(".")[0])]
    assert not bad, "imports against latent <- autoencoders <- modalities <- pipelines <- train.py:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    mods = {src for src, _, _ in edges()}
    for src, dst, _ in edges():
        # `from latent.training import trainer` names a package; its module is dst or dst's submodule
        target = dst if dst in mods else next((m for m in mods if m.startswith(dst + ".")), dst)
        if target != src and target in mods:
            graph.setdefault(src, set()).add(target)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [nxt]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, [node]):
            break
    # package __init__ re-exports are not cycles of logic; only module-to-module cycles fail
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_check_can_fail(tmp_path):
    """The walker sees an import inside a function (the kind a lower layer uses to reach up)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from pipelines.text import TextDiffusionPipeline\n")
    assert imports_of(f) == [(2, "pipelines.text")]


def test_tests_and_library_never_import_experiments():
    bad = []
    for f in [*sorted((REPO / "tests").glob("*.py")), *(p for pkg in LIBRARY for p in package_files(pkg))]:
        bad += [f"{f.relative_to(REPO)}:{line}" for line, name in imports_of(f) if name.split(".")[0] == "experiments"]
    assert not bad, "experiments/ holds thin drivers; move what these need into the library: " + ", ".join(bad)
