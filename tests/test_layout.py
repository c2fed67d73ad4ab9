"""The code's shape as the Layout (README, docs/layout.md) promises it: small functions and classes, the step's
banks owned by coder/step.py alone, and a library that leaves the user's process environment as it found it."""
import ast
import os
import subprocess
import sys
from pathlib import Path

CODER = Path(__file__).resolve().parents[1] / "coder"


def test_no_function_over_60_lines_and_no_class_over_200():
    too_long = []
    for path in sorted(CODER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                limit = 200 if isinstance(node, ast.ClassDef) else 60
                if node.end_lineno - node.lineno + 1 > limit:
                    too_long.append(f"{path.relative_to(CODER)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not too_long


def test_the_training_loop_never_touches_the_banks():
    tree = ast.parse((CODER / "engine.py").read_text())
    names = {n.attr if isinstance(n, ast.Attribute) else n.id
             for n in ast.walk(tree) if isinstance(n, (ast.Attribute, ast.Name))}
    assert not names & {"enqueue", "snapshot", "queue_v", "queue_w", "Bank", "keys"}


def test_importing_coder_leaves_the_environment_alone():
    code = ("import os; before = dict(os.environ); import coder, coder.models.text, coder.report; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TOKENIZERS_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=CODER.parent, env=env)
    assert out.stdout.strip() == "[]"


def test_the_core_does_not_import_the_demo_package():
    for path in sorted(CODER.rglob("*.py")):
        if "demo" in path.relative_to(CODER).parts or path.name == "cli.py":  # the CLI prepares the demo
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "demo" not in (node.module or "").split("."), f"{path} imports {node.module}"


def package_imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported coder module, inside a function)] for every module of the package, as written."""
    modules = {".".join(p.relative_to(CODER.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in CODER.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree, edges = ast.parse(path.read_text()), []
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges += [(t, id(node) in inner) for t in targets if t in modules and t != name]
        graph[name] = edges
    return graph


def test_the_package_imports_form_no_circle():
    """Every import of coder/ (inside functions too) runs down the layers: no module reaches itself again."""
    graph = {name: {t for t, _ in edges} for name, edges in package_imports().items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(trail + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_at_most_three_package_imports_inside_functions():
    inner = [(name, t) for name, edges in package_imports().items() for t, inside in edges if inside]
    assert len(inner) <= 3, inner


def test_every_error_class_lives_in_coder_errors():
    for path in sorted(CODER.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert not node.name.endswith("Error"), f"{path.relative_to(CODER)} defines {node.name}"
