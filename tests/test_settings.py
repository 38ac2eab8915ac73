"""Settings is the one place the runtime reads its environment (security variables: streams/security.py)."""
import ast
from pathlib import Path

from legato.streams.config import Settings

STREAMS = Path(__file__).resolve().parent.parent / "streams"
READERS = {STREAMS / "config.py", STREAMS / "security.py"}


def test_settings_read_the_tuning_variables(monkeypatch):
    monkeypatch.setenv("LEGATO_SESSION_TIMEOUT", "3.5")
    monkeypatch.setenv("LEGATO_LINGER_MS", "5")
    monkeypatch.setenv("LEGATO_COMMIT_INTERVAL", "0.25")
    monkeypatch.setenv("LEGATO_STATE_COMMIT_MS", "0")
    monkeypatch.setenv("LEGATO_EARLY_REQUESTS", "0")
    s = Settings.from_env()
    assert (s.session_timeout, s.linger_ms, s.commit_interval) == (3.5, 5.0, 0.25)
    assert (s.state_commit_ms, s.early_requests) == (0.0, False)


def test_defaults_match_the_readme():
    from legato.streams.coordinator.partition import STATE_COMMIT_S

    s = Settings()
    assert (s.session_timeout, s.linger_ms, s.commit_interval) == (6.0, 0.0, 0.5)  # docs/operations/deploy.md: `6`
    assert s.state_commit_ms == Settings.from_env().state_commit_ms == STATE_COMMIT_S * 1000 == 50.0  # docs/operations/deploy.md: `50`
    assert s.early_requests is True


def test_no_other_runtime_module_reads_the_environment():
    offenders = []
    for path in sorted(STREAMS.rglob("*.py")):
        if path in READERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                offenders.append(f"{path.relative_to(STREAMS.parent)}:{node.lineno}")
    assert not offenders, offenders


def test_every_variable_the_runtime_reads_is_documented():
    """The settings section of docs/operations/deploy.md (the variables table and the paragraph on
    --workflows/--handlers above it) names every LEGATO_* variable config.py and security.py read."""
    import re

    page = (STREAMS.parent / "docs" / "operations" / "deploy.md").read_text(encoding="utf-8")
    start = page.index("\n## Settings\n")
    end = page.find("\n## ", start + 1)
    settings = page[start:end if end > 0 else None]
    assert "`--workflows DIR` (repeatable)" in settings
    read = set()
    for path in READERS:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"LEGATO_[A-Z_]*[A-Z]", node.value):
                read.add(node.value)
    assert "LEGATO_RETENTION" in read
    missing = sorted(name for name in read if f"`{name}`" not in settings)
    assert not missing, f"docs/operations/deploy.md's settings do not name {missing}"


def test_retention_defaults_to_seven_days_and_reads_a_duration(monkeypatch):
    assert Settings().retention_s == Settings.from_env().retention_s == 7 * 24 * 3600
    monkeypatch.setenv("LEGATO_RETENTION", "2s")
    assert Settings.from_env().retention_s == 2.0
