"""Shared pytest fixtures for Legato.

Async tests run under pytest-asyncio (``asyncio_mode = auto`` is set in
pyproject.toml), so ``async def test_...`` needs no decorator.

Integration tests talk to a real Kafka broker: the one named by the
``LEGATO_BOOTSTRAP`` environment variable, or else a local single-node broker
started on demand on 127.0.0.1:19092 (not 9092, so a developer's own broker
is never touched).
"""

from __future__ import annotations

import os

import pytest

TEST_BOOTSTRAP = "127.0.0.1:19092"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real Kafka broker (uses the kafka_bootstrap fixture)"
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of a Kafka broker that answers metadata requests.

    The local broker is deliberately left running after the session: the next
    run reuses it (start-up costs a few seconds; `legato kafka stop` ends it).
    """
    external = os.environ.get("LEGATO_BOOTSTRAP")
    if external:
        return external
    from streams.kafka_local import ensure_broker

    # A new test broker starts on empty data: topics of earlier sessions would only add open files.
    ensure_broker(TEST_BOOTSTRAP, fresh=True)
    return TEST_BOOTSTRAP
