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
