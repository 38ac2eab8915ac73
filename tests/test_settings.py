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
    s = Settings.from_env()
    assert (s.session_timeout, s.linger_ms, s.commit_interval) == (3.5, 5.0, 0.25)


def test_defaults_match_the_readme():
    s = Settings()
    assert (s.session_timeout, s.linger_ms, s.commit_interval) == (10.0, 0.0, 0.5)


def test_no_other_runtime_module_reads_the_environment():
    offenders = []
    for path in sorted(STREAMS.rglob("*.py")):
        if path in READERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                offenders.append(f"{path.relative_to(STREAMS.parent)}:{node.lineno}")
    assert not offenders, offenders
