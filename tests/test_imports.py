"""Imports run one way: optimizers -> base -> executors (issue 25).

The package's import graph is read from the source with `ast`, imports
inside functions included (an import moved into a function to dodge a cycle
is still a cycle), and must have no cycle.
"""

import ast
import pathlib

import keras_adamp

PACKAGE = pathlib.Path(keras_adamp.__file__).parent


def import_graph(root):
    """`{module: set of the package's modules it imports}` for the package
    at `root`, from every import statement of its files."""
    name = root.name
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing package up
                    up = package.rsplit(".", node.level - 1)[0]
                    base = f"{up}.{base}" if base else up
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        # `from keras_adamp import x` names the package itself too: only its
        # submodules count.
        graph[module] = {t for t in targets if t in files and t not in (module, name)}
    return graph


def find_cycle(graph):
    """A list of modules `[a, b, ..., a]` that import each other in a
    circle, or None."""
    state = {}  # module -> "open" while on the path, "done" once explored
    path = []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_the_graph_counts_imports_inside_functions(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg import base\n")
    (package / "base.py").write_text("def f():\n    from pkg import leaf\n")
    (package / "leaf.py").write_text("from . import base\nimport os\n")
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.base"},
        "pkg.base": {"pkg.leaf"},
        "pkg.leaf": {"pkg.base"},
    }
    assert find_cycle(graph) == ["pkg.base", "pkg.leaf", "pkg.base"]


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "keras_adamp._base" in graph and "keras_adamp._torch" in graph
    assert find_cycle(graph) is None


def test_the_optimizers_import_the_base_which_imports_the_executor():
    graph = import_graph(PACKAGE)
    assert "keras_adamp._torch" in graph["keras_adamp._base"]
    assert "keras_adamp._base" in graph["keras_adamp.adamp"]
    # The executor knows no optimizer: each names its step there.
    assert graph["keras_adamp._torch"] == set()
