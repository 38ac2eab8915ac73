"""Claim checks without a broker: the reference form and its schema, the file store, storing and resolving."""
import asyncio
import hashlib
import json

import jsonschema
import orjson
import pytest

from legato.topics.payloads import (
    FilePayloadStore,
    KafkaPayloadStore,
    PayloadError,
    PayloadRef,
    Payloads,
    chunks_of,
    is_ref,
    refs_in,
    store_from_url,
    substitute,
)
from legato.topics.schemas import SCHEMA_DIR


def _run(coro):
    return asyncio.run(coro)


def _payloads(tmp_path, inline_max=100, counted=None):
    return Payloads(FilePayloadStore(tmp_path / "store"), inline_max, (lambda d, n: counted.append((d, n))) if counted is not None else None)


def test_small_values_stay_inline_and_large_ones_become_references(tmp_path):
    counted = []
    payloads = _payloads(tmp_path, inline_max=100, counted=counted)

    async def go():
        await payloads.start()
        small = {"text": "x" * 50}
        assert await payloads.externalize("run-1", small) is small
        big = {"text": "y" * 500}
        ref = await payloads.externalize("run-1", big)
        return ref, await payloads.resolve({"a": [ref], "b": 1})

    ref, resolved = _run(go())
    data = orjson.dumps({"text": "y" * 500})
    # split, the field's reference would still be over 100 bytes: the value is stored whole
    assert ref == {"$ref": f"legato-payload:run-1/{hashlib.sha256(data).hexdigest()}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert resolved == {"a": [{"text": "y" * 500}], "b": 1}
    assert counted == [("stored", len(data)), ("fetched", len(data))]


def test_large_fields_are_stored_on_their_own_and_small_ones_stay_inline(tmp_path):
    payloads = _payloads(tmp_path, inline_max=1000)

    async def go():
        await payloads.start()
        value = {"text": "t" * 1200, "lang": "en", "parts": ["p" * 1200, "q"], "many": ["m" * 40] * 30}
        out = await payloads.externalize("r", value)
        return value, out, await payloads.resolve(out)

    value, out, resolved = _run(go())
    assert is_ref(out["text"]) and out["lang"] == "en"
    assert is_ref(out["parts"][0]) and out["parts"][1] == "q"
    assert is_ref(out["many"]) and out["many"]["size"] == len(orjson.dumps(value["many"]))  # small items: stored whole
    assert resolved == value
    assert len(FilePayloadStore(tmp_path / "store").ids()) == 3  # text, parts[0], many: nothing stored in vain


def test_reference_matches_its_published_schema(tmp_path):
    schema = json.loads((SCHEMA_DIR / "payload_ref.json").read_text())
    payloads = _payloads(tmp_path, inline_max=0)
    ref = _run(payloads.put("r", ["v"] * 10))
    jsonschema.validate(ref, schema)
    kafka_ref = {**ref, "chunks": 3, "partition": 2, "offset": 40}
    jsonschema.validate(kafka_ref, schema)
    for bad in ({**ref, "$ref": "s3://x"}, {**ref, "sha256": "abc"}, {k: v for k, v in ref.items() if k != "size"}, {**kafka_ref, "chunks": 0}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert PayloadRef.model_validate(kafka_ref).wire() == kafka_ref


def test_a_corrupted_or_missing_payload_is_an_error_not_a_value(tmp_path):
    store = FilePayloadStore(tmp_path / "store")
    payloads = Payloads(store, 10)

    async def go():
        await payloads.start()
        ref = await payloads.put("run-2", {"k": "v" * 100})
        path = store._path(PayloadRef.model_validate(ref).id)
        path.write_bytes(path.read_bytes().replace(b"v", b"w", 1))
        with pytest.raises(PayloadError, match="sha256"):
            await payloads.fetch(ref)
        path.write_bytes(b"{}")
        with pytest.raises(PayloadError, match="bytes"):
            await payloads.fetch(ref)
        await payloads.delete(ref)
        await payloads.delete(ref)  # deleting twice is fine (retention may run again after a crash)
        with pytest.raises(PayloadError, match="not found"):
            await payloads.fetch(ref)

    _run(go())


def test_the_same_value_of_one_run_is_one_payload_and_runs_do_not_share(tmp_path):
    store = FilePayloadStore(tmp_path / "store")
    payloads = Payloads(store, 10)

    async def go():
        await payloads.start()
        a = await payloads.put("run/with/slashes", "z" * 100)
        b = await payloads.put("run/with/slashes", "z" * 100)
        c = await payloads.put("other", "z" * 100)
        return a, b, c

    a, b, c = _run(go())
    assert a == b and a != c
    assert store.ids() == sorted([PayloadRef.model_validate(a).id, PayloadRef.model_validate(c).id])


def test_refs_in_and_substitute_walk_nested_values():
    r1 = {"$ref": "legato-payload:x/" + "a" * 64, "size": 3, "sha256": "a" * 64}
    r2 = {"$ref": "legato-payload:y/" + "b" * 64, "size": 4, "sha256": "b" * 64}
    value = {"list": [r1, {"inner": r2}, r1], "n": 1, "not": {"$ref": "#/definitions/x"}}
    assert [r.id for r in refs_in(value)] == ["x/" + "a" * 64, "y/" + "b" * 64]
    assert is_ref(r1) and not is_ref(value["not"]) and not is_ref("legato-payload:x")
    out = substitute(value, {"x/" + "a" * 64: "A", "y/" + "b" * 64: [2]})
    assert out == {"list": ["A", {"inner": [2]}, "A"], "n": 1, "not": {"$ref": "#/definitions/x"}}
    untouched = {"a": [1, {"b": 2}]}
    assert substitute(untouched, {}) is untouched


def test_chunks_cut_under_the_record_limit_and_join_back():
    data = bytes(range(256)) * 10_000
    pieces = chunks_of(data, 900_000)
    assert [len(p) for p in pieces] == [900_000, 900_000, 760_000]
    assert b"".join(pieces) == data
    assert chunks_of(b"", 10) == [b""]


def test_store_from_url():
    assert isinstance(store_from_url(None, "b:1", "legato.payloads"), KafkaPayloadStore)
    assert isinstance(store_from_url("kafka", "b:1", "legato.payloads"), KafkaPayloadStore)
    file_store = store_from_url("file:///tmp/legato%20payloads", "b:1", "legato.payloads")
    assert isinstance(file_store, FilePayloadStore) and str(file_store.root) == "/tmp/legato payloads"
    assert store_from_url("none", "b:1", "legato.payloads") is None
    with pytest.raises(ValueError, match="LEGATO_PAYLOAD_STORE"):
        store_from_url("s3://bucket", "b:1", "legato.payloads")


def test_a_worker_resolves_inputs_and_stores_a_large_output_by_reference(tmp_path):
    from legato.handlers.registry import Activity
    from legato.streams.worker import execute
    from legato.topics.models import ActivityRequested

    payloads = _payloads(tmp_path, inline_max=1000)
    seen = []

    async def handler(data):
        seen.append(data)
        return {"text": data["doc"].upper() * 10}

    async def go():
        ref = await payloads.put("r", "abc" * 100)
        request = ActivityRequested(request_id="r/a/1", run_id="r", step_id="a", activity="a", attempt=1, input={"doc": ref})
        completion = await execute(Activity("a", handler), request, payloads=payloads)
        return completion, await payloads.resolve(completion.output)

    completion, output = _run(go())
    assert seen == [{"doc": "abc" * 100}]
    assert completion.status == "succeeded" and is_ref(completion.output["text"]), completion
    assert completion.output["text"]["$ref"].startswith("legato-payload:r/")
    assert output == {"text": "ABC" * 1000}


def test_a_missing_input_payload_fails_the_attempt_retryably(tmp_path):
    from legato.handlers.registry import Activity
    from legato.streams.worker import execute
    from legato.topics.models import ActivityRequested

    async def handler(data):
        raise AssertionError("never called")

    ref = {"$ref": "legato-payload:r/" + "0" * 64, "size": 5, "sha256": "0" * 64}
    request = ActivityRequested(request_id="r/a/1", run_id="r", step_id="a", activity="a", attempt=1, input=[ref])
    completion = _run(execute(Activity("a", handler), request, payloads=_payloads(tmp_path)))
    assert completion.status == "failed" and completion.error.type == "PayloadError" and completion.error.retryable, completion


def test_an_output_over_the_store_limit_fails_the_step_at_once_naming_its_size(tmp_path):
    from legato.handlers.registry import Activity
    from legato.streams.worker import execute
    from legato.topics.models import ActivityRequested

    payloads = Payloads(FilePayloadStore(tmp_path / "store"), inline_max=100, max_bytes=10_000)

    async def handler(data):
        return "x" * data

    async def go(n):
        await payloads.start()
        request = ActivityRequested(request_id="r/a/1", run_id="r", step_id="a", activity="a", attempt=1, input=n)
        return await execute(Activity("a", handler), request, payloads=payloads)

    over = _run(go(20_000))
    assert over.status == "failed" and over.error.type == "OutputTooLarge" and over.error.retryable is False, over
    assert "20,002 bytes" in over.error.message and "limit of 10,000 bytes" in over.error.message, over.error.message
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())  # nothing stored
    under = _run(go(9_000))
    assert under.status == "succeeded" and is_ref(under.output), under  # a string: stored whole


def test_runs_show_prints_sizes_and_fetch_prints_a_value(tmp_path, capsys):
    from legato.streams.cli import _fetch_value
    from legato.streams.config import Settings
    from legato.streams.runs import render_table, value_size
    from legato.workflows.state import RunState, StepState

    settings = Settings(payload_store=f"file://{tmp_path / 'store'}", payload_inline_max=100)
    payloads = settings.payloads()
    ref = _run(payloads.put("r1", {"text": "w" * 5000}))
    state = RunState(run_id="r1", workflow="wf", version=1, input={"q": 1}, started_ms=0, status="succeeded", output={"doc": ref},
                     steps={"big": StepState(key="big", step_id="big", kind="activity", frame="root", status="succeeded", output={"doc": ref}, started_ms=0)})
    assert value_size({"doc": ref}) == f"{ref['size'] / 1000:.1f} kB by ref" and value_size({"a": 1}) == "7 B" and value_size(None) == "-"
    text = render_table(state)
    assert "5.0 kB by ref" in text.splitlines()[4] and "output    (5.0 kB by ref)" in text
    run = {"run_id": "r1", "state": state.model_dump(mode="json")}
    assert _fetch_value(settings, run, "big") == 0
    assert orjson.loads(capsys.readouterr().out) == {"doc": {"text": "w" * 5000}}
    assert _fetch_value(settings, run, "input") == 0 and orjson.loads(capsys.readouterr().out) == {"q": 1}
    assert _fetch_value(settings, run, "nope") == 1 and "no step 'nope'" in capsys.readouterr().err


def test_the_kafka_store_starts_its_clients_once_for_concurrent_first_calls(monkeypatch):
    """A coordinator's partitions fetch their first payloads at once: each call must find started clients (the
    second call used to see the producer set and a consumer still None, and its partition's task died)."""
    store = KafkaPayloadStore("b:1", "legato.payloads")
    started = []

    async def start_clients():
        started.append(1)
        await asyncio.sleep(0.01)
        store._producer, store._consumer = object(), object()

    monkeypatch.setattr(store, "_start_clients", start_clients)

    async def go():
        await asyncio.gather(*(store.start() for _ in range(5)))
        return store._consumer

    assert _run(go()) is not None and started == [1]


def test_a_fork_seed_gets_its_own_copies_of_the_source_payloads(tmp_path):
    """The coordinator rewrites a fork's seed before sending it: each payload of the source becomes the fork's own
    (``<new run>/…``), the same value; other records and payloads already the fork's are left as they are; a payload
    that cannot be read any more stays the source's reference."""
    from legato.streams.coordinator.payloads import PayloadValues
    from legato.topics import codec
    from legato.topics.models import ForkedStep, RunForkAccepted

    store = FilePayloadStore(tmp_path / "store")
    payloads = Payloads(store, inline_max=100)
    values = PayloadValues(payloads)

    async def scenario() -> None:
        text = await payloads.put("src", "x" * 1000)
        gone = await payloads.put("src", "y" * 1000)
        await payloads.delete(gone)  # deleted by the source's retention, say
        seed = RunForkAccepted(run_id="src-fork", workflow="w", version=1, sha256="0" * 64, input={"doc": text},
                               forked_from={"run_id": "src", "step": "b"},
                               steps=[ForkedStep(step_id="a", status="succeeded", output={"text": text, "lost": gone, "n": 1})])
        other = ("legato.runs", b"src", orjson.dumps({"type": "run.completed", "output": text}), None)
        sends = [other, ("legato.coordinator", b"src-fork", codec.dumps(seed), None)]
        assert await values.own_fork_seeds(sends, "legato.coordinator") == 1
        assert sends[0] is other
        rewritten = codec.decode(RunForkAccepted, sends[1][2])
        copy = rewritten.steps[0].output["text"]
        assert PayloadRef.model_validate(copy).id == f"src-fork/{text['sha256']}", copy
        assert rewritten.input == {"doc": copy}  # one copy for the two places it is used
        assert await payloads.fetch(copy) == "x" * 1000
        assert rewritten.steps[0].output["lost"] == gone and rewritten.steps[0].output["n"] == 1
        # decided again after a crash: the same seed gives the same ids, nothing more is stored
        again = [("legato.coordinator", b"src-fork", codec.dumps(seed), None)]
        await values.own_fork_seeds(again, "legato.coordinator")
        assert again[0][2] == sends[1][2]
        assert sorted(store.ids()) == sorted([f"src/{text['sha256']}", f"src-fork/{text['sha256']}"])
        # a seed whose payloads are already the fork's is sent as it is
        assert await values.own_fork_seeds(sends[1:], "legato.coordinator") == 0

    asyncio.run(scenario())


def test_forgetting_a_run_deletes_its_unused_payloads_too(tmp_path):
    """A run's retention tombstones the chunks of the payloads its document refers to and of those it listed as
    unused (ignored completions' outputs), once each; never another run's."""
    from legato.streams.coordinator.payloads import PayloadValues

    def ref(run_id: str, char: str, chunks: int) -> dict:
        data = orjson.dumps(char * 10)
        sha = hashlib.sha256(data).hexdigest()
        return {"$ref": f"legato-payload:{run_id}/{sha}", "size": len(data), "sha256": sha, "chunks": chunks, "partition": 2, "offset": 5}

    used, unused, foreign = ref("r1", "a", 2), ref("r1", "b", 3), ref("r2", "c", 1)
    def entry(r: dict) -> dict:  # as RunState.unused_payloads lists it
        return {"id": r["$ref"].split(":", 1)[1], **{k: r[k] for k in ("size", "sha256", "partition", "chunks") if k in r}}

    stored = orjson.dumps({"run_id": "r1", "output": {"text": used, "other": foreign}})
    values = PayloadValues(Payloads(KafkaPayloadStore("127.0.0.1:1", "p.payloads")))
    sends = values.forget("r1", stored, [entry(unused), entry(used), entry(foreign)])
    keys = sorted(key.decode() for _, key, _, _ in sends)
    uid, pid = entry(unused)["id"], entry(used)["id"]
    assert keys == sorted([f"{pid}/0", f"{pid}/1", f"{uid}/0", f"{uid}/1", f"{uid}/2"]), keys
    assert all(topic == "p.payloads" and value is None and partition == 2 for topic, _, value, partition in sends)

    # the file store deletes them at once
    store = FilePayloadStore(tmp_path / "store")
    payloads = Payloads(store, inline_max=10)

    async def scenario() -> None:
        kept = await payloads.put("r1", "u" * 100)
        forgetting = PayloadValues(payloads)
        assert forgetting.forget("r1", b"{}", [entry(kept)]) == []
        await asyncio.gather(*forgetting._deleting)
        assert store.ids() == []

    asyncio.run(scenario())
