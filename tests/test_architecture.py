"""Structural rules: the state machine and the wire models import no Kafka; no code runs from data."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE = [*sorted((ROOT / "workflows").rglob("*.py")), ROOT / "topics" / "models.py", ROOT / "topics" / "codec.py"]
FORBIDDEN_IMPORTS = {"faust", "aiokafka", "kafka", "mode", "time", "random", "uuid", "asyncio"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pure_modules_import_no_kafka_clock_or_randomness():
    assert PURE
    for path in PURE:
        bad = _imports(path) & FORBIDDEN_IMPORTS
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_code_runs_from_data():
    offenders = []
    for path in ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
                if name in ("eval", "exec") and not owner:
                    offenders.append(f"{path}:{node.lineno} {name}()")
                if owner == "pickle" or (owner == "yaml" and name in ("load", "unsafe_load", "full_load")):
                    offenders.append(f"{path}:{node.lineno} {owner}.{name}()")
    assert not offenders, offenders


def test_the_contract_imports_nothing_from_the_runtime():
    """``topics/`` (names, records, codec, schemas, client) stands alone: a service that only triggers runs, or a
    worker of its own, needs nothing of ``streams/`` (the coordinator, faust workers, console)."""
    offenders = []
    for path in sorted((ROOT / "topics").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {m}" for m in modules
                          if m.startswith(("legato.streams", "legato.tools", "streams", "tools"))]
    assert not offenders, offenders


def test_importing_the_client_loads_no_runtime_module():
    """The same, at run time: importing the client does not import ``legato.streams`` (a fresh interpreter)."""
    import subprocess
    import sys

    code = "import sys, legato.topics.client; print(sorted(m for m in sys.modules if m.startswith(('legato.streams', 'legato.tools'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert out == "[]", out


DEV_COMMANDS = {("streams/cli.py", "cmd_dev"), ("streams/cli.py", "cmd_demo"), ("streams/cli.py", "cmd_bench"),
                ("streams/cli.py", "cmd_chaos"), ("streams/cli.py", "cmd_kafka")}
"""The only places of the runtime that may import ``legato.tools``: dev commands (local broker, demo, bench, chaos),
each importing it inside its own function, so that ``legato coordinator`` / ``worker`` / ``runs`` never load a tool."""


def _tool_imports(path: Path) -> list[tuple[str | None, int, str]]:
    """(enclosing top-level function or None, line, module) of each import of legato.tools in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, owner: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if owner is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else owner
            if isinstance(child, ast.Import):
                found.extend((owner, child.lineno, a.name) for a in child.names if a.name.startswith("legato.tools"))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("legato.tools"):
                found.append((owner, child.lineno, child.module))
            visit(child, inner)

    visit(tree, None)
    return found


def test_the_runtime_imports_no_tool_except_the_lazy_dev_commands():
    offenders, used = [], set()
    for path in sorted([*(ROOT / "streams").rglob("*.py"), *(ROOT / "topics").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for owner, line, module in _tool_imports(path):
            if (rel, owner) in DEV_COMMANDS:
                used.add((rel, owner))
            else:
                offenders.append(f"{rel}:{line} imports {module}" + (f" in {owner}" if owner else " at module level"))
    assert not offenders, offenders
    assert used == DEV_COMMANDS  # the list names no command that no longer needs it


def test_the_tool_import_check_sees_module_level_and_nested_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from legato.tools import demo\n\ndef cmd_x():\n    if True:\n        import legato.tools.chaos\n", encoding="utf-8")
    assert _tool_imports(sample) == [(None, 1, "legato.tools"), ("cmd_x", 5, "legato.tools.chaos")]
