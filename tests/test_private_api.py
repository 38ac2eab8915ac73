"""The private aiokafka and faust API Legato uses (``PRIVATE_API`` in topics/kafka_io.py) is still there, in a version
it was checked against: an upgrade that moves or removes one fails here, not in production."""
import importlib
import importlib.metadata
import inspect

import pytest

from legato.topics.kafka_io import CHECKED_VERSIONS, PRIVATE_API


def _version(package: str) -> tuple[int, ...]:
    return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:3] if part.isdigit())


@pytest.mark.parametrize("package", sorted(CHECKED_VERSIONS))
def test_the_installed_version_is_one_the_private_api_was_checked_against(package: str) -> None:
    low, above = CHECKED_VERSIONS[package]
    assert low <= _version(package) < above, f"{package} {importlib.metadata.version(package)} is outside {low}..{above}"


def _has(cls: type, attribute: str) -> bool:
    if hasattr(cls, attribute):
        return True
    # instance attributes: set in __init__ of the class or a base
    return any(f"self.{attribute} =" in inspect.getsource(k.__init__) for k in cls.__mro__ if "__init__" in vars(k) and k is not object)


@pytest.mark.parametrize("package,owner,attribute,where", PRIVATE_API, ids=[f"{o.rsplit('.', 1)[1]}.{a}" for _, o, a, _ in PRIVATE_API])
def test_each_private_attribute_still_exists(package: str, owner: str, attribute: str, where: str) -> None:
    module, _, name = owner.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert package in CHECKED_VERSIONS
    assert _has(cls, attribute), f"{owner}.{attribute} is gone (used in {where})"


def test_the_check_notices_a_missing_attribute() -> None:
    from aiokafka import AIOKafkaConsumer

    assert not _has(AIOKafkaConsumer, "_no_such_attribute")
    assert _has(AIOKafkaConsumer, "_client")


_MODULES = ("topics/kafka_io.py", "streams/kafka_io.py")


def test_no_other_module_reaches_for_the_private_api() -> None:
    """Outside the two kafka_io modules, no code (comments and docstrings aside) uses a private name of PRIVATE_API on
    an object other than its own (``self._client`` of Legato's own class is Legato's)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    private = {attribute for _, _, attribute, _ in PRIVATE_API if attribute.startswith("_")}
    found = []
    for path in sorted(root.glob("*/**/*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith((".venv", "tests/", "build/")) or rel in _MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{rel}:{node.lineno} .{node.attr}")
    assert not found, f"private aiokafka/faust API outside {_MODULES}: {found}"
