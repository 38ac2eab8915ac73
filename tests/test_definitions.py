"""Deploying definitions: the validation, no-op and refusal rules, and the table's handling of every record."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from legato.streams.definitions import (
    DefinitionTable,
    DeployRefused,
    definition_files,
    deploy_files,
    plan_deploy,
    read_files,
    topics_needed,
)
from legato.topics import codec
from legato.topics.models import DefinitionDeployed
from legato.topics.names import Topics
from legato.workflows.catalog import Catalog, Definition, source_sha256
from legato.workflows.model import DefinitionError, load_source, load_workflow

V1 = textwrap.dedent("""\
    name: greet
    version: 1
    steps:
      - {id: hello, activity: say}
    """)
V1_EDITED = V1.replace("say", "shout")
V2 = V1_EDITED.replace("version: 1", "version: 2")


def _write(dir: Path, name: str, text: str) -> Path:
    path = dir / name
    path.write_text(text, encoding="utf-8")
    return path


def _deployed(*sources: str) -> Catalog:
    return Catalog.of([Definition(load_source(s), source_sha256(s), "2026-01-01T00:00:00.000Z") for s in sources])


def _record(text: str, **override) -> bytes:
    wf = load_source(text)
    fields = {"name": wf.name, "version": wf.version, "sha256": source_sha256(text), "source": text, "deployed_at": "2026-01-01T00:00:00Z"}
    return codec.dumps(DefinitionDeployed.model_validate({**fields, **override}))


# --- files: validated exactly like `legato validate` --------------------------------------------------


def test_files_are_validated_like_legato_validate(tmp_path):
    good = _write(tmp_path, "good.yaml", V1)
    bad = _write(tmp_path, "bad.yaml", "name: bad\nsteps:\n  - {id: a, activity: x, timeout: soon}\n")
    candidates, errors = read_files([good, bad, tmp_path / "missing.yaml"])
    assert [c.file for c in candidates] == [str(good)]
    assert candidates[0].sha256 == source_sha256(V1) and candidates[0].key == "greet@1"
    with pytest.raises(DefinitionError) as validated:
        load_workflow(bad)  # what `legato validate` runs
    assert str(errors[0]) == str(validated.value)
    assert str(errors[0]).startswith(f"{bad}: steps[0].timeout: ")
    assert "cannot read" in str(errors[1])


def test_definition_files_lists_yaml_of_each_dir_and_refuses_a_missing_one(tmp_path):
    _write(tmp_path, "b.yml", V1)
    _write(tmp_path, "a.yaml", V2)
    _write(tmp_path, "notes.txt", "x")
    assert [p.name for p in definition_files([tmp_path])] == ["a.yaml", "b.yml"]
    with pytest.raises(Exception, match="not a directory"):
        definition_files([tmp_path / "nope"])


# --- the rules ----------------------------------------------------------------------------------------


def _plan(tmp_path, texts: list[str], deployed: Catalog):
    files = [_write(tmp_path, f"f{i}.yaml", t) for i, t in enumerate(texts)]
    candidates, errors = read_files(files)
    assert not errors
    return plan_deploy(candidates, deployed)


def test_a_new_definition_is_published(tmp_path):
    plan = _plan(tmp_path, [V1], Catalog())
    assert [o.action for o in plan.outcomes] == ["publish"]


def test_identical_content_again_is_a_no_op(tmp_path):
    plan = _plan(tmp_path, [V1], _deployed(V1))
    assert [o.action for o in plan.outcomes] == ["unchanged"]
    assert not plan.to_publish and not plan.refused


def test_other_content_under_a_deployed_name_and_version_is_refused(tmp_path):
    plan = _plan(tmp_path, [V1_EDITED], _deployed(V1))
    [outcome] = plan.refused
    assert "greet@1 is already deployed with other content" in outcome.reason
    assert "bump `version`" in outcome.reason


def test_a_bumped_version_is_published_next_to_the_old_one(tmp_path):
    plan = _plan(tmp_path, [V1, V2], _deployed(V1))
    assert [o.action for o in plan.outcomes] == ["unchanged", "publish"]


def test_one_name_and_version_twice_in_the_files(tmp_path):
    same = _plan(tmp_path, [V1, V1], Catalog())
    assert [o.action for o in same.outcomes] == ["publish", "unchanged"]
    other = _plan(tmp_path, [V1, V1_EDITED], Catalog())
    assert [o.action for o in other.outcomes] == ["publish", "refused"]
    assert "also defined, with other content, in" in other.refused[0].reason


def test_whitespace_is_content(tmp_path):
    """The sha256 is of the text: a reformatted file is other content (what was deployed is what runs)."""
    plan = _plan(tmp_path, [V1 + "\n# a comment\n"], _deployed(V1))
    assert [o.action for o in plan.outcomes] == ["refused"]


async def test_deploy_files_refuses_invalid_files_before_touching_kafka(tmp_path):
    _write(tmp_path, "bad.yaml", "name: [unclosed\n")
    with pytest.raises(DeployRefused, match="not valid YAML"):
        await deploy_files([tmp_path], "127.0.0.1:1", Topics("unused"))
    with pytest.raises(DeployRefused, match="not a directory"):
        await deploy_files([tmp_path / "nope"], "127.0.0.1:1", Topics("unused"))


# --- the table: every record, good or bad -------------------------------------------------------------


def _table() -> DefinitionTable:
    return DefinitionTable("127.0.0.1:1", Topics("t"), dead_letters=False)


def test_table_compiles_records_and_looks_them_up():
    table, seen = _table(), []
    table.on_change(seen.append)
    assert table.apply(0, 0, b"greet@1", _record(V1)) is None
    assert table.apply(1, 0, b"greet@2", _record(V2)) is None
    assert table.version == 2
    assert table.catalog.get("greet", 1).sha256 == source_sha256(V1)
    assert table.catalog.latest("greet").version == 2
    assert table.catalog.resolve("greet").version == 2 and table.catalog.resolve("greet", 1).version == 1
    assert table.catalog.get("greet", 3) is None and table.catalog.latest("other") is None
    assert table.catalog.get("greet", 1).workflow.steps["hello"].activity == "say"


def test_the_same_record_again_changes_nothing():
    table = _table()
    table.apply(0, 0, b"greet@1", _record(V1))
    assert table.apply(0, 1, b"greet@1", _record(V1, deployed_at="2026-02-02T00:00:00Z")) is None
    assert table.version == 1
    assert table.catalog.get("greet", 1).deployed_at == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    "key, value, reason",
    [
        (b"greet@1", b"not json", "not valid JSON"),
        (b"greet@1", b'{"name": "greet"}', "invalid DefinitionDeployed"),
        (b"greet@9", _record(V1), "key 'greet@9' is not the record's name@version 'greet@1'"),
        (None, _record(V1), "key None is not"),
        (b"greet@1", _record(V1, sha256="0" * 64), "is not the sha256 of the source"),
        (b"greet@1", _record(V1, source=V1 + "steps: 3\n", sha256=source_sha256(V1 + "steps: 3\n")), "invalid definition: greet@1: steps:"),
        (b"greet@7", _record(V1, version=7), "the source defines greet@1, not greet@7"),
    ],
    ids=["not-json", "not-a-record", "wrong-key", "no-key", "wrong-sha", "does-not-compile", "name-mismatch"],
)
def test_a_bad_record_is_rejected_with_a_reason_and_the_table_goes_on(key, value, reason):
    table = _table()
    got = table.apply(0, 5, key, value)
    assert got is not None and reason in got, got
    assert table.rejected[-1].offset == 5 and table.version == 0
    assert table.apply(0, 6, b"greet@1", _record(V1)) is None
    assert table.catalog.get("greet", 1) is not None


def test_other_content_under_a_held_name_and_version_is_rejected_and_the_first_stays():
    table = _table()
    table.apply(0, 0, b"greet@1", _record(V1))
    reason = table.apply(0, 1, b"greet@1", _record(V1_EDITED))
    assert reason is not None and "already deployed with other content" in reason
    assert table.catalog.get("greet", 1).sha256 == source_sha256(V1)


def test_a_tombstone_removes_its_definition():
    table = _table()
    table.apply(0, 0, b"greet@1", _record(V1))
    table.apply(0, 1, b"greet@2", _record(V2))
    assert table.apply(0, 2, b"greet@2", None) is None
    assert table.catalog.latest("greet").version == 1 and table.version == 3
    assert table.apply(0, 3, b"greet@2", None) is None  # unknown: nothing to remove
    assert table.version == 3
    assert table.apply(0, 4, b"greet@1", None) is None
    assert table.catalog.latest("greet") is None and len(table.catalog) == 0


def test_a_listener_that_raises_does_not_stop_the_table():
    table = _table()
    table.on_change(lambda catalog: 1 / 0)

    async def go():
        from aiokafka import TopicPartition
        from types import SimpleNamespace

        batch = {TopicPartition("t.definitions", 0): [SimpleNamespace(offset=0, key=b"greet@1", value=_record(V1))]}
        await table._apply_batch(batch)

    import asyncio

    asyncio.run(go())
    assert table.catalog.get("greet", 1) is not None


def test_catalog_is_immutable():
    empty = Catalog()
    one = empty.with_definition(_deployed(V1).get("greet", 1))
    assert len(empty) == 0 and len(one) == 1
    assert [d.key for d in one] == ["greet@1"]


def test_topics_needed_lists_activities_and_completion_topics(tmp_path):
    a = _write(tmp_path, "a.yaml", V1)
    b = _write(tmp_path, "b.yaml", V2.replace("steps:", "completion_topic: greet.done\nsteps:"))
    activities, completion = topics_needed(read_files([a, b])[0])
    assert activities == ["say", "shout"] and completion == ["greet.done"]
