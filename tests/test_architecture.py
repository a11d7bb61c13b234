"""The package's shape: imports point one way, with no cycle between modules or packages, and
library code leaves flag names to the CLI (docs/architecture.md)."""

import ast
import re
from pathlib import Path

import zsq

SOURCE = Path(zsq.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the zsq modules it imports, anywhere in its code (function-level imports
    count: they still run), each import resolved to the most specific module it names."""
    modules = {module_name(p): p for p in SOURCE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("zsq")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                if base.startswith("zsq"):
                    targets |= {resolve(f"{base}.{a.name}") or resolve(base) for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between zsq's top-level modules and subpackages."""

    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    collapsed: dict[str, set[str]] = {}
    for name, targets in graph.items():
        collapsed.setdefault(top(name), set()).update(
            top(t) for t in targets if top(t) != top(name)
        )
    return collapsed


def test_the_import_graph_is_found():
    graph = import_graph()
    assert "zsq.run.quantize" in graph["zsq.cli.quantize"]
    assert "zsq.numerics.losses" in graph["zsq.distill.trainer"]


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph()) == []


def test_no_package_imports_itself_through_others():
    assert cycles(packages(import_graph())) == []


def test_a_cycle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_point_down():
    """The numerics and the models' introspection sit below what trains, searches and measures;
    the methods below the run; the run below the CLI."""
    graph = packages(import_graph())
    below = {
        "zsq.numerics": {"zsq.distill", "zsq.mixed", "zsq.analysis", "zsq.methods", "zsq.run"},
        "zsq.methods": {"zsq.run", "zsq.cli", "zsq.analysis"},
        "zsq.run": {"zsq.cli", "zsq.analysis"},
    }
    for low, highs in below.items():
        for high in highs:
            assert high not in graph.get(low, set()), f"{low} imports {high}"


# a library message may name torchrun's flags, and a whole `zsq ...` command (the advice for a run
# folder another command made)
TORCHRUN_FLAGS = {"--nproc-per-node"}
COMMAND = re.compile(r"`zsq [a-z-]+ [^`]*`")


def raised_messages(path: Path) -> list[tuple[int, str]]:
    """The string parts of every ``raise ...(...)`` in a module (f-string parts included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for arg in node.exc.args:
                parts = [n.value for n in ast.walk(arg) if isinstance(n, ast.Constant)]
                text = "".join(p for p in parts if isinstance(p, str))
                found.append((node.lineno, text))
    return found


def test_library_errors_leave_flag_names_to_the_cli():
    """Outside ``zsq/cli`` an error names options as the library does («field» markers the CLI
    rewords); a flag appears only inside a whole command (`zsq quantize ... --resume DIR`)."""
    offenders = []
    for path in SOURCE.rglob("*.py"):
        if "cli" in path.relative_to(SOURCE).parts:
            continue
        for line, text in raised_messages(path):
            flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", COMMAND.sub("", text)))
            if flags - TORCHRUN_FLAGS:
                offenders.append(f"{path.relative_to(SOURCE)}:{line}: {sorted(flags)}")
    assert offenders == []
