"""The documentation: the site builds without a broken link, the generated references match the code, the workflow
JSON Schema matches the models, every key of the language is in its reference, README stays short, and no document
or comment speaks of work sessions."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from legato.streams.cli import main
from legato.tools import docs_gen
from legato.workflows import model
from legato.workflows.schema import workflow_schema

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "run `python -m legato.tools.docs_gen`"


def test_mkdocs_builds_strict(tmp_path):
    """A broken link, a missing anchor or a page left out of the nav fails the build (``strict: true``)."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is not installed: ./scripts/setup.sh installs it (the test extra)"
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "language" / "reference" / "index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path):
    """The check above can fail: the same build over a copy of docs/ with one dead link is refused."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text(encoding="utf-8") + "\n[gone](concepts/no-such-page.md)\n", encoding="utf-8")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)})
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stdout + proc.stderr


def test_generated_references_are_current(tmp_path):
    written = docs_gen.write(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "docs/reference/metrics.md", "docs/reference/cli.md", "topics/schemas/workflow.json"}
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.exists(), f"{rel} missing: {REGENERATE}"
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), f"{rel} is stale: {REGENERATE}"


def test_the_cli_reference_lists_every_option():
    page = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    for words, option in ((("trigger",), "--wait"), (("fork",), "--from STEP"), (("runs", "list"), "--since SINCE"),
                          (("schema",), "what")):
        section = page.split(f"\n## legato {' '.join(words)}\n")[1].split("\n## ")[0]
        assert f"| `{option}` |" in section, (words, option)


def test_legato_schema_workflow_prints_the_published_schema(capsys):
    assert main(["schema", "workflow"]) == 0
    printed = capsys.readouterr().out
    assert printed == (ROOT / "topics" / "schemas" / "workflow.json").read_text(encoding="utf-8")
    assert json.loads(printed)["title"] == "Legato workflow"


def test_the_workflow_schema_accepts_every_example_and_refuses_what_the_models_refuse():
    schema = workflow_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    examples = sorted((ROOT / "workflows" / "examples").glob("*.yaml"))
    assert len(examples) > 10
    for path in examples:
        jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), schema)
    good = {"name": "w", "steps": [{"id": "a", "activity": "x", "timeout": "5s", "retry": {"max_attempts": 2, "backoff": 0.5}}]}
    jsonschema.validate(good, schema)
    model.Workflow.model_validate(good)
    bad = [
        {"name": "w", "steps": []},                                                   # no step
        {"name": "w", "steps": [{"id": "a", "activity": "x", "timeout": "5 parsecs"}]},  # not a duration
        {"name": "w", "steps": [{"id": "a", "activity": "x", "retries": 3}]},          # unknown key
        {"name": "w", "steps": [{"id": "a", "activity": "x", "retry": {"max_attempts": 0}}]},  # out of bounds
        {"name": "w", "steps": [{"id": "a", "wait": {"signal": "s"}, "sleep": "1s"}]},  # two kinds
        {"name": "w", "version": 0, "steps": [{"id": "a", "activity": "x"}]},
    ]
    for doc in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)
        with pytest.raises(Exception):
            model.Workflow.model_validate(doc)


def _models() -> list[type[BaseModel]]:
    """Every pydantic model a workflow file can contain, reached from ``Workflow``."""
    seen: list[type[BaseModel]] = []

    def walk(tp: typing.Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for field in tp.model_fields.values():
                walk(field.annotation)
        for arg in typing.get_args(tp):
            walk(arg)

    walk(model.Workflow)
    return seen


def _reference_sections() -> dict[str, str]:
    """Model name -> the text of the reference section whose heading names it, e.g. ``## loop (`LoopStep`, `LoopSpec`)``."""
    page = (ROOT / "docs" / "language" / "reference.md").read_text(encoding="utf-8")
    sections: dict[str, str] = {}
    for chunk in re.split(r"\n(?=#{2,3} )", page):
        heading = chunk.split("\n", 1)[0]
        for name in re.findall(r"`([A-Z][A-Za-z]+)`", heading):
            sections[name] = chunk
    return sections


def test_the_language_reference_has_every_key_of_every_model_with_its_default():
    models = _models()
    assert {m.__name__ for m in models} >= {"Workflow", "ActivityStep", "Retry", "LoopSpec", "WaitSpec", "SleepUntil", "NOf", "Fallback"}
    sections = _reference_sections()
    for m in models:
        assert m.__name__ in sections, f"docs/language/reference.md has no section naming `{m.__name__}`"
        text = sections[m.__name__]
        for name, field in m.model_fields.items():
            documented = f"| `{name}` |" in text or (m.__name__ == "NOf" and f"`{name}`" in text)
            assert documented, f"docs/language/reference.md, `{m.__name__}`: no row for `{name}`"
            if m.__name__ == "NOf":
                continue
            row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
            default = row.split(" | ")[2]
            if field.is_required():
                assert default.startswith("required"), f"{m.__name__}.{name} is required, the reference says {default!r}"
            elif isinstance(field.default, (bool, int, str)) and not isinstance(field.default, float):
                shown = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
                assert f"`{shown}`" in default, f"{m.__name__}.{name} defaults to {field.default!r}, the reference says {default!r}"
            else:
                assert default and default != "required", f"{m.__name__}.{name}: no default given"


def test_every_yaml_example_of_the_reference_is_valid():
    page = (ROOT / "docs" / "language" / "reference.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.S)
    assert len(blocks) >= 10
    for block in blocks:
        doc = yaml.safe_load(block)
        doc = doc if isinstance(doc, dict) else {"name": "example", "steps": doc}
        model.Workflow.model_validate(doc)
        jsonschema.validate(doc, workflow_schema())


def test_the_getting_started_workflow_loads(tmp_path):
    page = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    source = re.findall(r"```yaml\n(.*?)```", page, re.S)[0]
    path = tmp_path / "greet.yaml"
    path.write_text(source, encoding="utf-8")
    wf = model.load_workflow(path)
    assert wf.definition.name == "greet" and wf.activities == {"say_hello", "shout"}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert source in readme, "README's five-minute workflow and docs/getting-started.md's differ"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    head = "\n".join(lines[:6])
    assert "./scripts/demo.sh" in head and "./scripts/test.sh" in head
    assert (ROOT / "scripts" / "demo.sh").exists() and (ROOT / "scripts" / "test.sh").exists()


# "session" is allowed only in these senses: Kafka's consumer-group session timeout, pytest's test session (and
# its fixture scope), an HTTP client session, a browser or SASL session.
_ALLOWED_SESSION = re.compile(
    r"session[ _.-]?timeout|session_timeout|SESSION_TIMEOUT|test session|per test session|"
    r"scope=\"session\"|scope='session'|loop_scope=\"session\"|_scope = \"session\"|ClientSession|aiohttp\.ClientSession|"
    r"\"session\"|fetch sessions|session\.ms|sessions? of the browser|browser session|SASL session|session ids?|"
    r"start_new_session|member's session",
    re.I)


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RELIABILITY.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder in ("topics", "workflows", "streams", "handlers", "tools", "scripts", "ops"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".yml", ".yaml", ".md"))
    return files


def test_no_document_or_comment_speaks_of_work_sessions():
    offenders = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"session", line, re.I) and not _ALLOWED_SESSION.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()[:120]}")
    assert not offenders, "documents or comments that speak of sessions (of work):\n" + "\n".join(offenders[:40])


def test_the_session_check_can_fail():
    """A line that speaks of a work session is caught; Kafka's session timeout is not."""
    assert not _ALLOWED_SESSION.search("measured in the seventh session")
    assert _ALLOWED_SESSION.search("a survivor after the 10 s session timeout")
    assert _ALLOWED_SESSION.search("Integration tests share one broker per test session")


def test_benchmarks_and_reliability_hold_the_latest_figures_not_a_diary():
    """Each holds the latest figure per benchmark or scenario; the history lives in git."""
    for name in ("BENCHMARKS.md", "RELIABILITY.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert len(text.encode()) < 45_000, f"{name} is {len(text.encode())} bytes: keep the latest figures, history goes to git"
        assert "## Appendix" not in text, f"{name}: earlier measurements belong to the git history"


def test_every_chaos_scenario_has_its_latest_result_in_reliability():
    from legato.tools.chaos import SCENARIOS
    text = (ROOT / "RELIABILITY.md").read_text(encoding="utf-8")
    missing = [name for name in SCENARIOS if f"### {name}\n" not in text]
    assert not missing, f"RELIABILITY.md has no section for the chaos scenarios {missing}"
