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
