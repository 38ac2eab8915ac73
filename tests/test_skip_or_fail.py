"""Tests that need a tool from outside Python skip on a developer's machine and fail under CI."""
from __future__ import annotations

import pytest

from tests.conftest import skip_or_fail


def test_skips_without_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="kcat is missing"):
        skip_or_fail("kcat is missing")


@pytest.mark.parametrize("value", ["1", "true"])
def test_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="kcat is missing .CI is set"):
        skip_or_fail("kcat is missing")


def test_no_test_skips_any_other_way():
    """A ``skipif`` mark, ``pytest.skip`` or ``importorskip`` would skip under CI too: every skip goes through
    ``skip_or_fail`` (conftest.py)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name in ("conftest.py", "test_skip_or_fail.py") and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("skip", "skipif", "importorskip") \
                    and isinstance(node.value, (ast.Name, ast.Attribute)) and (getattr(node.value, "id", None) == "pytest" or getattr(node.value, "attr", None) == "mark"):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.attr}")
    assert not found, found
