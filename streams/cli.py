"""The ``legato`` command line."""
from __future__ import annotations

import argparse
import logging
import asyncio
import sys
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaConnectionError

from legato.streams import ast_gc, security
from legato.streams.config import Settings

EXAMPLES = Path(__file__).resolve().parent.parent / "workflows" / "examples"
RUNS_CATCH_UP_S = 120.0  # `legato runs`: how long reading the run topics into the local index may take


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workflows", action="append", default=[], metavar="DIR", help="workflow directory (repeatable; env LEGATO_WORKFLOWS)")
    p.add_argument("--handlers", action="append", default=[], metavar="MODULE", help="handler module (repeatable; env LEGATO_HANDLERS)")
    p.add_argument("--loglevel", default=None)


def _settings(args: argparse.Namespace) -> Settings:
    security.from_env()  # bad security settings fail here, with a message, before anything connects
    s = Settings.from_env(args.workflows, args.handlers)
    if args.loglevel:
        s.loglevel = args.loglevel
    return s


def cmd_coordinator(args: argparse.Namespace) -> int:
    from legato.streams.app import build, run

    s = _settings(args)  # --workflows is optional: a coordinator decides with what is deployed on the definitions topic
    run(build(s, coordinator=True, worker=False), s.loglevel)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from legato.streams.app import build, run

    s = _settings(args)
    if not s.handler_modules:
        print("legato worker: give --handlers MODULE or LEGATO_HANDLERS", file=sys.stderr)
        return 2
    run(build(s, coordinator=False, worker=True, only_activities=args.activity or None), s.loglevel)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from legato.tools import kafka_local
    from legato.streams.app import build, run

    s = _settings(args)
    if not s.workflow_dirs:
        s.workflow_dirs = [str(EXAMPLES)]
    if not s.handler_modules:
        s.handler_modules = ["legato.handlers.examples.demo", "legato.handlers.examples.proposal"]
    kafka_local.ensure_broker(s.bootstrap)
    from legato.streams.console.web import ConsoleError, serve_in_thread
    try:
        print(f"legato console: {serve_in_thread(s, port=s.console_port)}", flush=True)
    except ConsoleError as exc:
        print(f"legato dev: no console: {exc}", file=sys.stderr)
    run(build(s, coordinator=True, worker=True), s.loglevel)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from legato.tools.demo import main as demo_main

    return demo_main(_settings(args))


def cmd_cancel(args: argparse.Namespace) -> int:
    from legato.topics.client import LegatoClient

    s = _settings(args)

    async def go() -> int:
        async with LegatoClient(s.bootstrap, s.prefix, **security.aiokafka_kwargs()) as client:
            await client.cancel(args.run_id, args.reason)
            if not args.wait:
                return 0
            try:
                event = (await client.wait_for({args.run_id}, timeout=args.timeout))[args.run_id]
            except asyncio.TimeoutError:
                print(f"legato cancel: no terminal event for run {args.run_id!r} within {args.timeout:g}s (is the run_id right?)", file=sys.stderr)
                return 1
            print(event.model_dump_json(exclude_none=True))
            return 0 if event.status == "cancelled" else 1

    return asyncio.run(go())


def cmd_redrive(args: argparse.Namespace) -> int:
    from legato.topics.client import LegatoClient
    from legato.streams.runs import load_run
    from legato.streams.definitions import read_catalog
    from legato.workflows.lifecycle import redrive_refusal
    from legato.workflows.machine import Machine, redrive_target

    s = _settings(args)

    async def go() -> int:
        if args.wait:  # the coordinator counts a refused redrive and emits nothing: say why before waiting in vain
            state = await load_run(s.bootstrap, s.prefix, args.run_id)
            refusal = redrive_refusal(state)
            if refusal is None and state is not None:
                catalog = (await read_catalog(s.bootstrap, s.topics, kafka=security.aiokafka_kwargs())).catalog
                target = redrive_target(state, Machine(catalog).pinned(state))
                refusal = target if isinstance(target, str) else None
            if refusal is not None:
                print(f"legato redrive: run {args.run_id!r}: {refusal}", file=sys.stderr)
                return 1
        async with LegatoClient(s.bootstrap, s.prefix, **security.aiokafka_kwargs()) as client:
            if not args.wait:
                await client.redrive(args.run_id, args.reason)
                return 0
            try:
                event = await client.redriven(args.run_id, args.reason, timeout=args.timeout, progress=lambda line: print(line, file=sys.stderr))
            except asyncio.TimeoutError:
                print(f"legato redrive: no terminal event for run {args.run_id!r} within {args.timeout:g}s", file=sys.stderr)
                return 1
            print(event.model_dump_json(exclude_none=True))
            return 0 if event.status == "succeeded" else 1

    return asyncio.run(go())


def cmd_fork(args: argparse.Namespace) -> int:
    import orjson

    from legato.topics.client import LegatoClient

    s = _settings(args)
    payload = None
    if args.input is not None:
        try:
            payload = orjson.loads(args.input)
        except orjson.JSONDecodeError as exc:
            print(f"legato fork: --input is not valid JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(payload, dict):
            print("legato fork: --input must be a JSON object", file=sys.stderr)
            return 2

    async def go() -> int:
        if args.wait:  # a refused fork starts nothing and emits nothing: say why before waiting in vain
            refusal = await _fork_refusal(s, args.run_id, args.from_step)
            if refusal is not None:
                print(f"legato fork: {refusal}", file=sys.stderr)
                return 1
        async with LegatoClient(s.bootstrap, s.prefix, **security.aiokafka_kwargs()) as client:
            if not args.wait:
                print(await client.fork(args.run_id, args.from_step, payload, new_run_id=args.run_id_new))
                return 0
            try:
                event = await client.forked(args.run_id, args.from_step, payload, new_run_id=args.run_id_new, timeout=args.timeout,
                                            progress=lambda line: print(line, file=sys.stderr))
            except asyncio.TimeoutError:
                print(f"legato fork: the forked run did not finish within {args.timeout:g}s (is {args.run_id!r} retained, with a top-level step {args.from_step!r}?)", file=sys.stderr)
                return 1
            print(event.model_dump_json(exclude_none=True))
            return 0 if event.status == "succeeded" else 1

    return asyncio.run(go())


async def _fork_refusal(s: Settings, run_id: str, from_step: str) -> str | None:
    """Why the coordinator would refuse to fork ``run_id`` from ``from_step`` (the same guard, on what is stored now)."""
    from legato.streams.definitions import read_catalog
    from legato.streams.runs import load_run
    from legato.topics.models import RunForkRequested
    from legato.workflows.lifecycle import fork_seed

    state = await load_run(s.bootstrap, s.prefix, run_id)
    if state is None:
        return f"no run {run_id!r} (unknown, or forgotten after its retention)"
    table = await read_catalog(s.bootstrap, s.topics, kafka=security.aiokafka_kwargs())
    definition = table.catalog.get(state.workflow, state.version)
    if definition is None:
        return f"run {run_id!r} ran {state.workflow} v{state.version}, which is not deployed"
    seed = fork_seed(state, definition, RunForkRequested(run_id=run_id, from_step=from_step, new_run_id="-"))
    return seed if isinstance(seed, str) else None


def cmd_signal(args: argparse.Namespace) -> int:
    import orjson

    from legato.topics.client import LegatoClient

    s = _settings(args)
    data = None
    if args.data is not None:
        try:
            data = orjson.loads(_json_argument(args.data))
        except (orjson.JSONDecodeError, OSError) as exc:
            print(f"legato signal: --data is not valid JSON: {exc}", file=sys.stderr)
            return 2

    async def go() -> int:
        async with _client(s) as client:
            await client.signal(args.run_id, args.signal, data, args.id)
        return 0

    return asyncio.run(go())


def _priority(text: str) -> int:
    """``--priority``: an integer from 1 (lowest) to 5."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from 1 (lowest) to 5")
    return value


def _json_argument(text: str) -> str | bytes:
    """A JSON argument, or with ``@PATH`` the file's content (a large input does not fit on a command line)."""
    return Path(text[1:]).read_bytes() if text.startswith("@") else text


def _client(s: Any) -> Any:
    """A LegatoClient with this process's settings: security, and the payload store for large inputs."""
    from legato.topics.client import LegatoClient
    from legato.topics.payloads import store_from_url

    kafka = security.aiokafka_kwargs()
    store = store_from_url(s.payload_store, s.bootstrap, s.topics.payloads, **kafka)
    inline_max = s.payload_inline_max if store is not None else sys.maxsize  # none: every value inline
    return LegatoClient(s.bootstrap, s.prefix, payload_inline_max=inline_max, payload_store=store, **kafka)


def cmd_trigger(args: argparse.Namespace) -> int:
    import orjson

    from legato.topics.client import LegatoClient

    s = _settings(args)
    try:
        payload = orjson.loads(_json_argument(args.input))
    except (orjson.JSONDecodeError, OSError) as exc:
        print(f"legato trigger: --input is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print("legato trigger: --input must be a JSON object", file=sys.stderr)
        return 2

    async def go() -> int:
        async with _client(s) as client:
            if not args.wait:
                run_id = await client.trigger(args.workflow, payload, run_id=args.run_id, version=args.version, priority=args.priority)
                print(run_id)
                return 0
            result = await client.run(args.workflow, payload, run_id=args.run_id, timeout=args.timeout, progress=lambda line: print(line, file=sys.stderr),
                                      version=args.version, priority=args.priority)
            print(result.model_dump_json(exclude_none=True))
            return 0 if result.status == "succeeded" else 1

    return asyncio.run(go())


def cmd_bench(args: argparse.Namespace) -> int:
    from legato.tools.bench import NAMES, main as bench_main

    s = _settings(args)
    names = list(NAMES) if args.name == "all" else [args.name]
    sizes = [int(x) for x in args.sizes.split(",")]
    return bench_main(s, names, runs=args.runs, output=Path(args.output) if args.output else None, sizes=sizes,
                      memory_runs=args.memory_runs, store=args.store, latency_runs=args.latency_runs)


def cmd_chaos(args: argparse.Namespace) -> int:
    from legato.tools.chaos import main as chaos_main

    return chaos_main(_settings(args), args.scenario, runs=args.runs, kills=args.kills, bad=args.bad, valid=args.valid, rate=args.rate,
                      session_timeout=args.session_timeout,
                      output=None if args.output in (None, "-") else Path(args.output), command="legato chaos " + " ".join(sys.argv[2:]), timeout=args.timeout,
                      waits=args.waits)


def cmd_validate(args: argparse.Namespace) -> int:
    from legato.workflows.model import DefinitionError, load_workflow

    failed = 0
    for file in args.files:
        try:
            wf = load_workflow(file)
            print(f"ok: {file}: workflow {wf.name} v{wf.version}, {len(wf.steps)} steps, activities: {', '.join(sorted(wf.activities)) or '-'}")
        except DefinitionError as exc:
            failed += 1
            print(f"invalid: {exc}", file=sys.stderr)
    return 1 if failed else 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from legato.streams.admin import ensure_topics
    from legato.streams.definitions import deploy, read_files, topics_needed

    s = _settings(args)
    candidates, errors = read_files(args.files)
    for exc in errors:
        print(f"invalid: {exc}", file=sys.stderr)
    if errors:
        print("legato deploy: nothing deployed", file=sys.stderr)
        return 1

    async def go() -> int:
        kafka = security.aiokafka_kwargs()
        activities, completion_topics = topics_needed(candidates)
        await ensure_topics(s.bootstrap, s.topics, activities, s.partitions, completion_topics, replication=s.replication)
        plan = await deploy(candidates, s.bootstrap, s.topics, kafka=kafka)
        for o in plan.outcomes:
            c = o.candidate
            if o.action == "refused":
                print(f"refused: {c.file}: {o.reason}", file=sys.stderr)
            elif not plan.refused:
                word = "deployed" if o.action == "publish" else "unchanged"
                print(f"{word}: {c.file}: {c.key} sha256 {c.sha256[:12]}")
        if plan.refused:
            print("legato deploy: nothing deployed", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(go())


def cmd_definitions(args: argparse.Namespace) -> int:
    from legato.streams.definitions import read_catalog

    s = _settings(args)
    table = asyncio.run(read_catalog(s.bootstrap, s.topics, kafka=security.aiokafka_kwargs()))
    rows = [(d.name, str(d.version), d.sha256[:12], d.deployed_at) for d in table.catalog]
    header = ("NAME", "VERSION", "SHA256", "DEPLOYED_AT")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    for r in table.rejected:
        print(f"unusable record {s.topics.definitions}[{r.partition}]@{r.offset} key {r.key!r}: {r.reason}", file=sys.stderr)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from legato.streams import schedule_cli

    s = _settings(args)
    return schedule_cli.run(args, s.bootstrap, s.topics, s.partitions)


def cmd_graph(args: argparse.Namespace) -> int:
    from legato.workflows.graph import mermaid
    from legato.workflows.model import DefinitionError, load_workflow

    try:
        wf = load_workflow(args.file)
    except DefinitionError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(mermaid(wf))
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    from legato.tools import kafka_cluster, kafka_local

    bootstrap = Settings.from_env().bootstrap
    if args.brokers < 1:
        print(f"legato kafka: --brokers must be at least 1, not {args.brokers}", file=sys.stderr)
        return 2
    cluster = kafka_cluster.local_cluster(bootstrap, args.brokers if args.action == "start" and args.brokers > 1 else None)
    if args.action == "start":
        if args.brokers > 1:
            if not kafka_local.is_local(bootstrap):
                print(f"legato kafka: refusing to start a cluster for non-local bootstrap {bootstrap!r}", file=sys.stderr)
                return 2
            print(cluster.start())
        else:
            print(kafka_local.start(bootstrap))
    elif args.action == "stop":
        if cluster is not None and cluster.running():
            print(cluster.stop())
        else:
            print(kafka_local.stop(bootstrap))
    else:
        if cluster is not None and cluster.running():
            alive, message = cluster.status()
        else:
            alive, message = kafka_local.status(bootstrap)
        print(message)
        return 0 if alive else 1
    return 0


def cmd_acl(args: argparse.Namespace) -> int:
    from legato.streams.acl import command

    return command(args.role, args.principal, _settings(args), args.activity, args.completion_topic, args.apply)


def _fresh_index(s: Settings, command: str):
    """The CLI's run index, caught up with the topics; None (after saying why) when they cannot be read."""
    from aiokafka.errors import KafkaError

    from legato.streams.console.feed import fresh_index

    try:
        return asyncio.run(fresh_index(s.bootstrap, s.prefix, s.data_dir, timeout=RUNS_CATCH_UP_S, **security.aiokafka_kwargs()))
    except (TimeoutError, OSError, KafkaError) as exc:
        print(f"legato {command}: cannot read the run topics at {s.bootstrap}: {exc}", file=sys.stderr)
        return None


def cmd_runs_list(args: argparse.Namespace) -> int:
    import time

    import orjson

    from legato.streams.console.index import RunFilter
    from legato.streams.runs import render_list
    from legato.workflows.durations import parse_duration

    s = _settings(args)
    try:
        since_ms = None if args.since is None else int((time.time() - parse_duration(args.since)) * 1000)
    except ValueError as exc:
        print(f"legato runs list: --since: {exc}", file=sys.stderr)
        return 2
    index = _fresh_index(s, "runs list")
    if index is None:
        return 1
    try:
        f = RunFilter(workflow=args.workflow, status=args.status, since_ms=since_ms)
        rows = index.list_runs(f, limit=args.limit)
        if args.json:
            print(orjson.dumps(rows).decode())
        else:
            print(render_list(rows, index.counts(f)))
    finally:
        index.close()
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    import orjson

    from legato.streams.runs import render_gantt, render_history, render_run, state_of

    s = _settings(args)
    index = _fresh_index(s, "runs show")
    if index is None:
        return 1
    try:
        run = index.get_run(args.run_id)
        if run is None:
            print(f"legato runs show: no run {args.run_id!r} in the topics of prefix {s.prefix!r}", file=sys.stderr)
            return 1
        events = index.events(args.run_id)
        definition = index.definition(run["workflow"], run["version"]) if run["workflow"] else None
    finally:
        index.close()
    if args.fetch is not None:
        return _fetch_value(s, run, args.fetch)
    if args.json:
        print(orjson.dumps({"run": run, "events": events}).decode())
    elif args.gantt:
        state = state_of(run)
        if state is None:
            print(f"legato runs show: run {args.run_id!r} has no step state in {s.topics.changelog}", file=sys.stderr)
            return 1
        print(render_gantt(state), end="")
    else:
        print(render_run(run, definition))
        print()
        print(render_history(events))
    return 0


def _fetch_value(s: Any, run: dict[str, Any], name: str) -> int:
    """``runs show RUN --fetch STEP``: the step's output (``input`` / ``output``: the run's) with every payload
    reference resolved, as JSON."""
    import orjson

    from legato.streams.runs import find_step, state_of

    state = state_of(run)
    if state is None:
        print(f"legato runs show: run {run['run_id']!r} has no stored state to fetch from", file=sys.stderr)
        return 1
    step = find_step(state, name)
    if step is None and name not in ("input", "output"):
        print(f"legato runs show: run {state.run_id!r} has no step {name!r} (steps: {', '.join(state.steps) or 'none'})", file=sys.stderr)
        return 1
    value = step.output if step is not None else state.input if name == "input" else state.output
    payloads = s.payloads()

    async def go() -> Any:
        try:
            return await payloads.resolve(value)
        finally:
            await payloads.stop()

    try:
        resolved = asyncio.run(go()) if payloads is not None else value
    except Exception as exc:  # deleted by retention, corrupted, the broker away
        print(f"legato runs show: cannot fetch {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(resolved).decode() + "\n")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from legato.streams.console.web import ConsoleError, serve

    s = _settings(args)
    try:
        serve(s, host=args.host, port=args.port, read_only=args.read_only)
    except ConsoleError as exc:
        print(f"legato console: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from legato.workflows.schema import render_workflow_schema

    sys.stdout.write(render_workflow_schema())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``legato`` argument parser (docs/reference/cli.md is generated from it)."""
    parser = argparse.ArgumentParser(prog="legato", description="Event-driven orchestrator for AI workflows on Apache Kafka")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dev", help="broker if needed + coordinator + all workers in one process")
    _common(p)
    p.set_defaults(fn=cmd_dev)
    p = sub.add_parser("demo", help="run the customer due-diligence demo: sequential vs parallel")
    _common(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("coordinator", help="run the coordinator")
    _common(p)
    p.set_defaults(fn=cmd_coordinator)
    p = sub.add_parser("worker", help="run activity workers")
    _common(p)
    p.add_argument("--activity", action="append", default=[], help="only this activity (repeatable)")
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("trigger", help="start a run")
    p.add_argument("workflow")
    p.add_argument("--input", default="{}", help="JSON object, or @FILE; over LEGATO_PAYLOAD_INLINE_MAX it is sent by reference")
    p.add_argument("--run-id", default=None)
    p.add_argument("--version", type=int, default=None, help="run this version of the workflow (default: the highest deployed)")
    p.add_argument("--priority", type=_priority, default=None, metavar="1-5",
                   help="1 (lowest) to 5: steps waiting for a saturated limit go in priority order, ageing one level per 10 s (default 3)")
    p.add_argument("--wait", action="store_true", help="show progress (completions and progress chunks, live) and print the terminal run event")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait with --wait")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_trigger, workflows=[], handlers=[])
    p = sub.add_parser("cancel", help="cancel a run (its pending requests and child runs too)")
    p.add_argument("run_id")
    p.add_argument("--reason", default="cancelled by legato cancel", help="recorded in the run's error message")
    p.add_argument("--wait", action="store_true", help="print the run's terminal event (exit 1 unless it ended cancelled)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait with --wait")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_cancel, workflows=[], handlers=[])
    p = sub.add_parser("signal", help="send a signal to a run (it completes the run's oldest wait step on that name)")
    p.add_argument("run_id")
    p.add_argument("signal")
    p.add_argument("--data", default=None, help="JSON value, or @FILE: the output of the wait step (over LEGATO_PAYLOAD_INLINE_MAX: by reference)")
    p.add_argument("--id", default=None, help="signal_id: a repeated id for the same run is ignored")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_signal, workflows=[], handlers=[])
    p = sub.add_parser("redrive", help="resume a failed run from what failed, keeping the outputs of the steps that succeeded")
    p.add_argument("run_id")
    p.add_argument("--reason", default="", help="recorded with the request")
    p.add_argument("--wait", action="store_true", help="print the run's next terminal event (exit 1 unless it succeeded, or when the run is not failed)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait with --wait")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_redrive, workflows=[], handlers=[])
    p = sub.add_parser("fork", help="start a new run of a run's definition from one of its steps, reusing the outputs before it")
    p.add_argument("run_id", help="the source run")
    p.add_argument("--from", dest="from_step", required=True, metavar="STEP", help="a top-level step of the source run")
    p.add_argument("--input", default=None, help="JSON object: the new run's input (default: the source run's)")
    p.add_argument("--run-id", dest="run_id_new", default=None, metavar="NEW", help="the new run's id (default: a new uuid4)")
    p.add_argument("--wait", action="store_true", help="show progress and print the new run's terminal event")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait with --wait")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_fork, workflows=[], handlers=[])
    p = sub.add_parser("bench", help="benchmarks against a raw aiokafka pipe (results appended to --output)")
    p.add_argument("name", nargs="?", default="all", choices=["all", "overhead", "throughput", "fanout", "speedup", "memory", "scaleout", "latency", "retention", "runs-show", "replication", "limits"])
    p.add_argument("--runs", type=int, default=300, help="runs of the 20-step workflow for throughput/overhead/scaleout")
    p.add_argument("--sizes", default="10,100,1000,10000", help="fan-out sizes")
    p.add_argument("--memory-runs", type=int, default=100_000, help="runs of the memory and retention benchmarks; changelog records of runs-show")
    p.add_argument("--latency-runs", type=int, default=30, help="runs of the 20-step workflow, one at a time, per pipe for latency")
    p.add_argument("--store", default="memory", choices=["memory", "rocksdb"], help="run table store for the memory benchmark")
    p.add_argument("--output", default=None, help="append the results to this markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_bench, workflows=[], handlers=[])
    p = sub.add_parser("chaos", help="kill real processes on a real broker; the report is printed (and appended to --output)")
    p.add_argument("scenario", nargs="?", default="all",
                   help="a scenario, 'all' (every one in turn) or 'list' (print their names)")
    p.add_argument("--runs", type=int, default=2000, help="runs of a scenario (waits: N waiting + N sleeping, N = min(runs, 1000) unless --waits; deploy: v1 runs, at most 1000)")
    p.add_argument("--waits", type=int, default=None, help="waits: N runs waiting on a signal and N sleeping (default: --runs, at most 1000)")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--bad", type=int, default=10_000)
    p.add_argument("--valid", type=int, default=500)
    p.add_argument("--rate", type=float, default=40.0, help="triggers per second")
    p.add_argument("--session-timeout", type=float, default=None)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--output", default=None, help="also append the report to this markdown file ('-' or none: print only)")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_chaos, workflows=[], handlers=[])
    p = sub.add_parser("runs", help="list and show runs (read from the run topics into a local index)")
    runs = p.add_subparsers(dest="runs_command", required=True)
    p = runs.add_parser("list", help="runs, newest first")
    p.add_argument("--workflow", default=None)
    p.add_argument("--status", default=None, help="running, waiting, succeeded, failed or cancelled")
    p.add_argument("--since", default=None, help="started within this duration, e.g. 1h")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="a JSON array of runs")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_runs_list, workflows=[], handlers=[])
    p = runs.add_parser("show", help="a run's steps and its event history (topic/partition/offset)")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true", help="the run (with its state) and its events as JSON")
    p.add_argument("--gantt", action="store_true", help="a Mermaid gantt timeline of the steps")
    p.add_argument("--fetch", metavar="STEP", default=None,
                   help="print the output of STEP (a step key or id; input / output: the run's) as JSON, with values stored by reference fetched")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_runs_show, workflows=[], handlers=[])
    p = sub.add_parser("console", help="the run console: a web page over the run topics")
    p.add_argument("--host", default="127.0.0.1", help="other than loopback needs LEGATO_CONSOLE_TOKEN")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--read-only", action="store_true", help="no cancel or signal buttons")
    _common(p)
    p.set_defaults(fn=cmd_console)
    p = sub.add_parser("validate", help="check workflow files")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("deploy", help="validate workflow files and publish them to the definitions topic (all or none)")
    p.add_argument("files", nargs="+")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_deploy, workflows=[], handlers=[])
    p = sub.add_parser("definitions", help="list the deployed workflow definitions")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_definitions, workflows=[], handlers=[])
    p = sub.add_parser("graph", help="print a Mermaid flowchart of a workflow")
    p.add_argument("file")
    p.set_defaults(fn=cmd_graph)
    p = sub.add_parser("kafka", help="manage the local Apache Kafka broker (or a local cluster: --brokers 3)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--brokers", type=int, default=1, help="start: a KRaft cluster of N brokers (each also a controller) on "
                   "the bootstrap's port and every second one after it (9092, 9094, 9096; controllers on the next port)")
    p.set_defaults(fn=cmd_kafka)
    p = sub.add_parser("acl", help="print (and --apply) the Kafka ACLs of a role (docs/security.md)")
    p.add_argument("role", choices=["coordinator", "worker", "trigger", "signal", "operator", "console", "observer"])
    p.add_argument("--principal", required=True, help="User:NAME")
    p.add_argument("--activity", action="append", default=[], help="the worker's activities (repeatable)")
    p.add_argument("--completion-topic", action="append", default=[], help="a workflow's completion topic (repeatable)")
    p.add_argument("--apply", action="store_true", help="create the ACLs through the admin API (needs ALTER on the cluster)")
    p.add_argument("--loglevel", default=None)
    p.set_defaults(fn=cmd_acl, workflows=[], handlers=[])
    p = sub.add_parser("schema", help="print the JSON Schema of a workflow file (for editors; topics/schemas/workflow.json)")
    p.add_argument("what", choices=["workflow"])
    p.set_defaults(fn=cmd_schema)
    from legato.streams import schedule_cli
    schedule_cli.add_parser(sub, {"fn": cmd_schedule, "workflows": [], "handlers": [], "loglevel": None})
    return parser


def main(argv: list[str] | None = None) -> int:
    ast_gc.install()  # CPython 3.11: a finalizer's traceback must not break a parse under way (see ast_gc)
    args = build_parser().parse_args(argv)
    if args.command in ("trigger", "signal", "demo", "bench", "runs", "chaos", "console", "deploy", "definitions", "redrive", "fork", "schedule"):
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its leader-election retries are noise here
    try:
        return args.fn(args) or 0
    except security.SecurityConfigError as exc:
        print(f"legato {args.command}: {exc}", file=sys.stderr)
        return 2
    except KafkaConnectionError:
        bootstrap = Settings.from_env().bootstrap
        reason = security.diagnose(bootstrap)
        if reason is None:
            raise
        print(f"legato {args.command}: cannot connect to {bootstrap}: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
