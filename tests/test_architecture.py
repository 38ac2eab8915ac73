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
