"""Everything installs under ``legato.*``: every package folder is listed, and no code imports the bare names."""
import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOTS = {"topics", "workflows", "streams", "handlers", "tools"}


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_package_folder_installs_under_legato():
    config = _config()
    assert config["package-dir"] == {f"legato.{r}": r for r in ROOTS}
    folders = {
        "legato." + ".".join(init.parent.relative_to(ROOT).parts)
        for r in ROOTS for init in (ROOT / r).rglob("__init__.py") if "__pycache__" not in init.parts
    }
    assert folders == set(config["packages"]), f"missing from pyproject: {folders - set(config['packages'])}; stale: {set(config['packages']) - folders}"


def test_no_module_imports_the_bare_top_level_names():
    offenders = []
    for r in [*ROOTS, "tests"]:
        for path in (ROOT / r).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in ROOTS]
    assert not offenders, offenders


def test_handler_modules_load_without_shadowing(tmp_path, monkeypatch):
    """A user's project with its own ``handlers`` package next to Legato: theirs loads, Legato's stays Legato's."""
    import sys

    from legato.handlers.registry import load_handler_modules

    pkg = tmp_path / "handlers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mine.py").write_text(
        "from legato.handlers.registry import activity\n\n@activity('user_owned_activity')\nasync def f(data: dict) -> dict:\n    return data\n"
    )
    monkeypatch.chdir(tmp_path)
    # pytest puts the repo root on sys.path (its folders would pass for top-level packages); a user's process has not
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path), str(ROOT))])
    for name in [m for m in sys.modules if m == "handlers" or m.startswith("handlers.")]:
        monkeypatch.delitem(sys.modules, name)
    found = load_handler_modules(["handlers.mine"])
    assert "user_owned_activity" in found
    assert sys.path[-1] == str(tmp_path)  # appended: it shadows nothing installed
    import legato.handlers.registry as ours

    assert Path(ours.__file__).resolve().parent == ROOT / "handlers"
