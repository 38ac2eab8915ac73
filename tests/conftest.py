"""Shared pytest fixtures for Legato.

Async tests run under pytest-asyncio (``asyncio_mode = auto`` is set in
pyproject.toml), so ``async def test_...`` needs no decorator.

Integration tests talk to a real Kafka broker: the one named by the
``LEGATO_BOOTSTRAP`` environment variable, or else a local single-node broker
started on demand on 127.0.0.1:19092 (``LEGATO_TEST_BROKER_PORT`` changes it; never
9092, so a developer's own broker is never touched). That broker has its own
data directory and pid file (``~/.cache/legato/broker-19092``) and is stopped when
the session ends, so the demo and the tests run in either order.
"""

from __future__ import annotations

import os

import pytest

from legato.streams import ast_gc

# CPython 3.11 raises "SystemError: AST constructor recursion depth mismatch" when a garbage collection during
# ast.parse runs a finalizer that parses too (an asyncio Future left over by an earlier test logs its traceback):
# pytest's assertion rewriter and hypothesis parse. test_fuzz failed in CI that way. tests/test_ast_under_gc.py.
ast_gc.install()

# Under pytest-xdist each worker process (gw0, gw1, …) has its own broker, 10 ports above the previous one's.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
TEST_BOOTSTRAP = f"127.0.0.1:{int(os.environ.get('LEGATO_TEST_BROKER_PORT', '19092')) + 10 * _WORKER}"


def skip_or_fail(reason: str) -> None:
    """Skip a test whose tool is missing (Chromium, kcat, the Kafka jars) on a developer's machine; fail it when
    ``CI`` is set, where scripts/test.sh installs those tools and the test must run, not skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this test must run there, not skip)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real Kafka broker (uses the kafka_bootstrap fixture)"
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of a Kafka broker that answers metadata requests.

    The local test broker starts on empty data and stops when the session ends.
    """
    external = os.environ.get("LEGATO_BOOTSTRAP")
    if external:
        return external
    from legato.tools.kafka_local import ensure_broker

    # A new test broker starts on empty data: topics of earlier sessions would only add open files.
    ensure_broker(TEST_BOOTSTRAP, fresh=True)
    _started.append(TEST_BOOTSTRAP)
    return TEST_BOOTSTRAP


_started: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the test broker this session started: it must not outlive the suite (nor block `legato kafka start`)."""
    if _started:
        from legato.tools.kafka_local import stop

        stop(_started.pop())
