"""Activity workers: one faust agent per activity topic, handlers run as concurrent tasks.

Offsets are acknowledged only when a request's completion has been delivered, so a worker killed in the
middle of an activity leaves it to be redelivered (at least once; the request_id lets anyone drop repeats).
A worker stopped with SIGTERM drains first (``Workers.drain``): it starts no new request, lets the handlers already
running finish and their completions be delivered, commits, and only then leaves its group.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import faust
import orjson
from pydantic import BaseModel, ValidationError

from legato.handlers.heartbeat import beating
from legato.handlers.progress import reporting
from legato.handlers.registry import Activity, ActivityError, RateLimited, Result
from legato.streams import kafka_io
from legato.streams.dlq import DeadLetters
from legato.streams.stop_deadline import StopDeadline
from legato.topics.cache import fingerprint
from legato.streams.worker_offsets import Delivery, RequestOffsets
from legato.streams.worker_support import BoundedSet, Batcher, Cancellations, RateLimits, ResultCache, batch_settings, tail_topic
from legato.topics import codec
from legato.topics.codec import DecodeError
from legato.topics.models import ActivityCompleted, ActivityHeartbeat, ActivityRequested, ActivityStarted, Cost, ErrorInfo, ProgressReported, StoredPayload
from legato.topics.names import Topics
from legato.topics.payload_refs import refs_in
from legato.topics.payloads import PayloadError, Payloads
from legato.workflows.run_size import DEFAULT_MAX_STATE_BYTES

log = logging.getLogger("legato.worker")

RECORD_FRAMING_BYTES = 1024
"""What a completion's record adds to its value on the wire (key, headers, batch framing), kept free under the
producer's ``max_request_size``."""


def max_completion_bytes(producer_max_request_size: int) -> int:
    """The largest encoded completion this worker sends: under its producer's record limit (faust's
    ``producer_max_request_size``, 1,000,000 bytes by default; the broker's ``message.max.bytes`` is 1 MiB) less the
    record's framing, and never past a run document's own limit (1 MiB less 8 KiB), which the output must fit in."""
    return min(producer_max_request_size - RECORD_FRAMING_BYTES, DEFAULT_MAX_STATE_BYTES)


async def execute(activity: Activity, request: ActivityRequested, batcher: Batcher | None = None,
                  max_bytes: int = max_completion_bytes(1_000_000), payloads: Payloads | None = None) -> ActivityCompleted:
    """Run one request through its handler; every outcome becomes a completion, never an exception.

    With ``payloads``, references in the request's input are resolved before the handler sees it, and an output over
    the inline limit is stored and sent as a reference (claim checks); a payload that cannot be read or stored fails
    the attempt (retryable). An output over the store's limit, or whose completion would still be larger than
    ``max_bytes`` (no payload store), fails the step at once (``OutputTooLarge``, not retryable, naming the size): such
    a record cannot be produced, and waiting for it would end as an ``ActivityTimeout`` that names no cause."""
    timeout = None
    if request.deadline is not None:
        timeout = max(0.0, request.deadline / 1000 - time.time())
    base = {"request_id": request.request_id, "run_id": request.run_id, "step_id": request.step_id, "attempt": request.attempt}
    settings = batch_settings(request)
    deadline = asyncio.timeout(timeout)  # unlike wait_for, no task of its own: a loop turn less at each end of the call
    try:
        data = request.input
        async with deadline:
            if payloads is not None:
                data = await payloads.resolve(data)
            if batcher is not None and settings is not None:
                call = batcher.submit(data, *settings)
            else:
                call = activity([data] if activity.batched else data)
            result = await call
        if activity.batched and (batcher is None or settings is None):
            if not isinstance(result, list) or len(result) != 1:
                raise TypeError("a batch handler must return a list with one result per input")
            result = result[0]
    except asyncio.TimeoutError as exc:
        if timeout is None or not deadline.expired():  # the handler's own timeout (a client call, say), not the deadline
            return ActivityCompleted(**base, status="failed", error=ErrorInfo(type=type(exc).__name__, message=str(exc)[:2000] or "timed out", retryable=True))
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(type="ActivityTimeout", message=f"handler ran past its deadline ({timeout:.3f}s)", retryable=True))
    except RateLimited as exc:
        after = round(exc.retry_after * 1000) if exc.retry_after is not None else None
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(type="RateLimited", message=str(exc), retryable=True, retry_after_ms=after))
    except ActivityError as exc:
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(type=exc.type, message=str(exc), retryable=exc.retryable))
    except ValidationError as exc:
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(type="InputValidationError", message=str(exc)[:2000], retryable=False))
    except Exception as exc:
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(type=type(exc).__name__, message=str(exc)[:2000], retryable=True))
    confidence, cost = None, None
    if isinstance(result, Result):
        confidence, cost, result = result.confidence, result.cost, result.output
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    try:
        output_bytes = len(orjson.dumps(result))
        if payloads is not None and output_bytes > payloads.max_bytes:
            return ActivityCompleted(**base, status="failed", error=ErrorInfo(
                type="OutputTooLarge", retryable=False,
                message=f"handler output of {output_bytes:,} bytes exceeds the payload store's limit of {payloads.max_bytes:,} bytes"))
        if payloads is not None and output_bytes > payloads.inline_max:
            result = await payloads.externalize(request.run_id, result)
        completion = ActivityCompleted(**base, status="succeeded", output=result, confidence=confidence, cost=Cost.model_validate(cost) if cost else None)
    except PayloadError as exc:
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(type="PayloadError", message=str(exc)[:2000], retryable=True))
    except (TypeError, ValidationError) as exc:
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(type="OutputNotSerializable", message=f"handler output cannot be sent: {exc}"[:2000], retryable=False))
    size = len(codec.dumps(completion)) if output_bytes > max_bytes - 4096 else 0  # most outputs are small: encoded once
    if size > max_bytes:
        return ActivityCompleted(**base, status="failed", error=ErrorInfo(
            type="OutputTooLarge", retryable=False,
            message=f"handler output of {output_bytes:,} bytes (a completion record of {size:,} bytes) exceeds the limit of {max_bytes:,} bytes per record"))
    return completion


MAX_PROGRESS_PAYLOADS = 200  # listed on one completion (about 200 bytes each, 40 kB at most); retention misses any beyond


class _Progress:
    """The progress chunks of one request: numbered from 0 and sent to ``legato.progress`` as they are reported."""

    def __init__(self, topic: Any, request: ActivityRequested, activity: str, metrics: Any = None, payloads: Payloads | None = None):
        self.topic = topic
        self.payloads = payloads
        self.request = request
        self.activity = activity
        self.metrics = metrics
        self.seq = 0
        self.sent: list[Any] = []  # delivery futures, awaited before the completion is sent
        self.stored: dict[str, StoredPayload] = {}  # chunks stored by reference: the completion lists them for retention

    async def __call__(self, chunk: Any) -> None:
        r = self.request
        if self.payloads is not None and (stored := await self.payloads.externalize(r.run_id, chunk)) is not chunk:
            chunk = stored  # parts of it (or all) stored by reference
            for ref in refs_in(chunk):
                if ref.id.startswith(r.run_id + "/") and ref.id not in self.stored and len(self.stored) < MAX_PROGRESS_PAYLOADS:
                    self.stored[ref.id] = StoredPayload(id=ref.id, size=ref.size, sha256=ref.sha256, partition=ref.partition, chunks=ref.chunks)
        value = codec.dumps(ProgressReported(run_id=r.run_id, step_id=r.step_id, request_id=r.request_id, seq=self.seq, chunk=chunk))
        self.seq += 1
        self.sent.append(await self.topic.send(key=r.run_id.encode(), value=value))
        if self.metrics is not None:
            self.metrics.progress_chunk(self.activity)

    async def delivered(self) -> None:
        """Wait until every chunk is on the broker, so that a reader sees them before the step's completion."""
        await _delivered(self.sent, "a progress chunk", self.request.request_id)

    def listed_on(self, completion: ActivityCompleted) -> ActivityCompleted:
        """``completion`` with the chunks stored by reference (``progress_payloads``): the run's retention deletes them."""
        if not self.stored:
            return completion
        return completion.model_copy(update={"progress_payloads": list(self.stored.values())})


class _Liveness:
    """What a running handler tells the coordinator on the completions topic, keyed by run_id: that it started
    (``activity.started``, when the request asks, ``report_started``) and that it is alive (``activity.heartbeat``, on
    ``await heartbeat()``, at most one per half the request's ``heartbeat_ms``). Both are sent before the completion:
    the coordinator decides them first."""

    def __init__(self, send: Callable[[bytes, bytes], Awaitable[Any]], request: ActivityRequested, clock: Callable[[], float] = time.monotonic):
        self._send = send
        self.request = request
        self._clock = clock
        self._last: float | None = None  # clock() of the last heartbeat sent
        self.sent: list[Any] = []  # delivery futures, awaited before the completion is sent

    def _base(self) -> dict[str, Any]:
        r = self.request
        return {"request_id": r.request_id, "run_id": r.run_id, "step_id": r.step_id, "attempt": r.attempt}

    async def started(self) -> None:
        if self.request.report_started:
            await self._emit(ActivityStarted(**self._base(), started_ms=int(time.time() * 1000)))

    async def beat(self) -> None:
        every = self.request.heartbeat_ms
        if not every:
            return
        now = self._clock()
        if self._last is not None and now - self._last < every / 2000:
            return  # throttled: the last one is recent enough
        self._last = now
        await self._emit(ActivityHeartbeat(**self._base(), heartbeat_ms=int(time.time() * 1000)))

    async def _emit(self, record: ActivityStarted | ActivityHeartbeat) -> None:
        try:
            self.sent.append(await self._send(self.request.run_id.encode(), codec.dumps(record)))
        except Exception as exc:  # the handler goes on: its completion, or the step's timeout, still ends the attempt
            log.warning("cannot send %s of %s: %s", record.type, self.request.request_id, exc)

    async def delivered(self) -> None:
        await _delivered(self.sent, "a started or heartbeat record", self.request.request_id)


async def _delivered(futures: list[Any], what: str, request_id: str) -> None:
    """Await the deliveries of records a handler sent before its completion; a lost one must not lose the completion."""
    for fut in futures:
        try:
            await fut
        except Exception as exc:
            log.warning("%s of %s was not delivered: %s", what, request_id, exc)


class Workers:
    """Registers one agent per activity on a faust app."""

    commit_timeout_s = 10.0  # how long a commit made while stopping or rebalancing may take (``_commit_bounded``)
    stop_deadline: Callable[..., StopDeadline] = StopDeadline  # ``stop``'s deadline (a test passes one that does not exit)

    def __init__(self, app: faust.App, topics: Topics, activities: dict[str, Activity], partitions: int, dlq: DeadLetters, metrics: Any = None, bootstrap: str = "localhost:9092",
                 payloads: Payloads | None = None, drain_s: float = 30.0, stop_s: float = 10.0):
        self.app = app
        self.drain_s = drain_s  # LEGATO_WORKER_DRAIN_S: how long a drain waits for the handlers running (``drain``)
        self.stop_s = stop_s  # LEGATO_WORKER_STOP_S: how long the stop after the drain may take (``stop``)
        self.payloads = payloads  # claim checks: inputs resolved, large outputs and progress chunks stored by reference
        self.bootstrap = bootstrap
        self.cancellations = Cancellations()
        self.cache = ResultCache()
        self.rate_limits = RateLimits()
        self.batchers = {name: Batcher(act) for name, act in activities.items() if act.batched}
        self.cache_topic = app.topic(topics.cache, key_serializer="raw", value_serializer="raw")
        app.task(self._tail_cancellations)
        app.task(self._tail_cache)
        self.topics = topics
        self.dlq = dlq
        self.metrics = metrics
        self.seen = BoundedSet()
        self.running: dict[str, asyncio.Future] = {}  # delivery key -> True once answered, False if left unanswered
        self.offsets = RequestOffsets()
        self.handling: dict[asyncio.Task, str] = {}  # every request's task (``_handle``) -> its activity
        self.draining = False  # set by ``drain``: no request starts any more
        self._drain: asyncio.Task | None = None
        self.drain_committed = False  # set by the drain: whether what was answered got committed
        self._waiting: set[asyncio.Task] = set()  # rate-limit waits, ended by a drain
        app.task(self._commit_every)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_before_shutdown.connect(self._on_shutdown)
        self.max_bytes = max_completion_bytes(app.conf.producer_max_request_size)
        self.progress = app.topic(topics.progress, key_serializer="raw", value_serializer="raw")
        for name, activity in sorted(activities.items()):
            topic = app.topic(topics.requests(name), partitions=partitions, key_serializer="raw", value_serializer="raw")
            app.agent(topic, name=f"legato.worker.{name}")(self._agent_for(activity))

    def _agent_for(self, activity: Activity):
        slots = asyncio.Semaphore(activity.concurrency)

        async def work(stream: faust.StreamT) -> None:
            async for event in stream.noack().events():
                delivery = self.offsets.received(event.message.tp, event.message.offset)  # in flight while it waits for a slot
                if self.draining:
                    continue  # stopping: left in flight (never committed past) for the partition's next owner
                await slots.acquire()
                if self.draining:
                    slots.release()
                    continue
                task = asyncio.ensure_future(self._handle(activity, event, delivery, slots))
                self.handling[task] = activity.name
                task.add_done_callback(self._handled)

        work.__name__ = f"work_{activity.name}"
        return work

    def _handled(self, task: asyncio.Task) -> None:
        self.handling.pop(task, None)

    async def _handle(self, activity: Activity, event: Any, delivery: Delivery, slots: asyncio.Semaphore) -> None:
        msg = event.message
        stopping = False
        done: asyncio.Future | None = None
        try:
            try:
                request = codec.decode(ActivityRequested, msg.value)
            except DecodeError as exc:
                await self.dlq.send(msg, f"bad activity request: {exc}")
                return
            if request.activity != activity.name:
                await self.dlq.send(msg, f"request for activity {request.activity!r} on the topic of {activity.name!r}")
                return
            key = _delivery(request)
            if not self.seen.add(key):
                original = self.running.get(key)
                if original is not None and not await asyncio.shield(original):
                    stopping = True  # its first copy was left unanswered by a stop: so is this one
                self._skip("duplicate_request")
                return
            done = self.running[key] = asyncio.get_running_loop().create_future()
            if request.deadline is not None and request.deadline < time.time() * 1000:
                self._skip("expired_request")  # the coordinator has stopped waiting: don't spend a model call
                return
            if request.request_id in self.cancellations.cancelled:
                self._skip("cancelled_request")
                return
            cache_key = fingerprint(activity.name, request.input) if request.cache_ttl_ms else None
            if cache_key is not None:
                hit = self.cache.get(cache_key, request.cache_ttl_ms, int(time.time() * 1000))
                if hit is not None:
                    completion = ActivityCompleted(request_id=request.request_id, run_id=request.run_id, step_id=request.step_id, attempt=request.attempt,
                                                   status="succeeded", output=hit.get("output"), confidence=hit.get("confidence"), cached=True)
                    await (await self._send_completion(completion))
                    self._skip("cache_hit")
                    return
            if request.rate_limit:
                # it waits here (and in its topic), never dropped; a drain ends the wait: the request was not started
                if not await self._unless_draining(self.rate_limits.take(activity.name, request.rate_limit)):
                    stopping = True
                    return
                if request.request_id in self.cancellations.cancelled:
                    self._skip("cancelled_request")
                    return
            if self.draining:
                stopping = True  # not started before the worker began to stop: the partition's next owner runs it
                return
            started = time.time()
            if self.metrics is not None and request.requested_ms:
                self.metrics.activity_wait(activity.name, started - request.requested_ms / 1000)
            if self.metrics is not None:
                self.metrics.activity_started(activity.name)
            self.cancellations.running[request.request_id] = asyncio.current_task()
            progress = _Progress(self.progress, request, activity.name, self.metrics, self.payloads)
            liveness = _Liveness(self._send_record, request)
            try:
                await liveness.started()
                with reporting(None if activity.batched else progress), beating(None if activity.batched else liveness.beat):  # a batched call serves many
                    completion = await execute(activity, request, self.batchers.get(activity.name), self.max_bytes, self.payloads)
            except asyncio.CancelledError:
                if request.request_id not in self.cancellations.cancelled:
                    stopping = True
                    raise  # the process is stopping: leave the request unacknowledged for the next worker
                self._skip("cancelled_running")  # the coordinator stopped waiting: nothing to report
                return
            finally:
                self.cancellations.running.pop(request.request_id, None)
                if self.metrics is not None:
                    self.metrics.activity_finished(activity.name)
            await progress.delivered()
            await liveness.delivered()
            completion = progress.listed_on(completion)
            if cache_key is not None and completion.status == "succeeded":
                entry = {"output": completion.output, "confidence": completion.confidence, "stored_ms": int(time.time() * 1000)}
                await self.cache_topic.send(key=cache_key.encode(), value=orjson.dumps(entry))
            if self.metrics is not None:
                self.metrics.activity_done(activity.name, completion.status, time.time() - started, completion.error.type if completion.error else "")
            await (await self._send_completion(completion))  # delivered before the offset may be committed
        except asyncio.CancelledError:
            stopping = True  # cancelled by a stop (an abandoned drain, the loop closing): left unanswered, never committed
            raise
        except Exception:
            log.exception("worker failed on %s:%s@%s", msg.topic, msg.partition, msg.offset)
        finally:
            if done is not None:
                self.running.pop(key, None)
                done.set_result(not stopping)
            if not stopping:
                self.offsets.answered(delivery)
            slots.release()

    async def _unless_draining(self, wait: Awaitable[Any]) -> bool:
        """Await ``wait`` unless the worker drains first (``drain`` cancels it then): whether it ended."""
        task = asyncio.ensure_future(wait)
        self._waiting.add(task)
        try:
            if self.draining:
                task.cancel()
            await asyncio.wait({task})
            if task.cancelled():
                return False
            task.result()
            return True
        finally:
            self._waiting.discard(task)
            if not task.done():
                task.cancel()

    async def drain(self, timeout: float | None = None) -> int:
        """Stop cleanly (SIGTERM, ``streams/app.py``), before leaving the group: start no new request, let the handlers
        already running finish (up to ``timeout``, default ``drain_s``) and their completions be delivered, then commit
        what was answered. A handler still running at the timeout is cancelled and left unanswered (its request runs
        again on the partition's next owner). Partitions revoked meanwhile wait for the drain (``_on_revoked``).
        Returns how many handlers were abandoned."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_once(self.drain_s if timeout is None else timeout))
        return await asyncio.shield(self._drain)

    async def stop(self) -> int:
        """The first SIGTERM (streams/app.py): ``drain``, under a deadline (streams/stop_deadline.py). The process
        exits by itself if the drain overruns its own bounds, or if the rest of the stop (faust's: leave the group,
        stop the consumer thread) takes over ``stop_s`` once the drain has ended; the exit code is 0 when the drain
        committed what was answered."""
        deadline = self.stop_deadline(loop=asyncio.get_running_loop())
        deadline.arm(self.drain_s + 5.0 + self.commit_timeout_s + self.stop_s, "SIGTERM (the drain did not end)", 1)
        abandoned = await self.drain()
        deadline.arm(self.stop_s, "its drain ended (LEGATO_WORKER_STOP_S)", 0 if self.drain_committed else 1)
        return abandoned

    async def _drain_once(self, timeout: float) -> int:
        self.draining = True
        for task in list(self._waiting):
            task.cancel()  # requests waiting for their rate limit: not started, left for the next owner
        pending = {t for t in self.handling if not t.done()}
        t0 = time.monotonic()
        if pending:
            log.warning("stopping: waiting up to %g s for %d request(s) in flight to finish (LEGATO_WORKER_DRAIN_S)", timeout, len(pending))
            _, pending = await asyncio.wait(pending, timeout=timeout)
        abandoned = len(pending)
        if pending:
            names = [self.handling.get(t, "?") for t in pending]
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5.0)
            for name in names:
                if self.metrics is not None:
                    self.metrics.activity_abandoned(name)
            log.warning("stopping: abandoned %d handler(s) still running after %g s (%s); their requests run again on "
                        "the partitions' next owners", abandoned, timeout, ", ".join(sorted(set(names))))
        self.drain_committed = await self._commit_bounded(None, "after draining")
        log.info("stopping: drained in %.2f s, %d abandoned%s", time.monotonic() - t0, abandoned,
                 "" if self.drain_committed else ", answered requests NOT committed (they run again on the next owner)")
        return abandoned

    async def _commit_bounded(self, tps: set | None, when: str) -> bool:
        """``commit_answered`` within ``commit_timeout_s``: whether it committed. While a worker stops, a commit can
        wait on a rebalance that itself waits on the drain (faust passes both through its method queues); a commit
        that does not return in time is given up (what it would have committed runs again on the next owner, which
        the coordinator's dedupe absorbs) rather than holding the stop until a SIGKILL."""
        try:
            if await asyncio.wait_for(self.commit_answered(tps), self.commit_timeout_s) is not False:
                return True
            log.warning("could not commit the answered requests %s: refused (the group rebalanced meanwhile)", when)
        except asyncio.TimeoutError:
            log.error("could not commit the answered requests %s: no answer within %g s", when, self.commit_timeout_s)
        except Exception:
            log.exception("could not commit the answered requests %s", when)
        return False

    async def commit_answered(self, tps: set | None = None) -> bool:
        """Commit each assigned request partition (of ``tps``, default all) up to its oldest request not yet
        answered (streams/worker_offsets.py says why not faust's acknowledgements); False when the commit was
        refused (the group rebalanced meanwhile)."""
        consumer = self.app.consumer
        assigned = consumer.assignment()
        offsets = {tp: o for tp, o in self.offsets.committable().items() if tp in assigned and (tps is None or tp in tps)}
        if not offsets:
            return True
        if await kafka_io.faust_commit(consumer, offsets):
            self.offsets.committed(offsets)
            return True
        return False

    async def _commit_every(self) -> None:
        interval = self.app.conf.broker_commit_interval
        while True:
            await asyncio.sleep(interval)
            await self.commit_answered()

    async def _on_revoked(self, sender: Any, revoked: set, **kwargs: Any) -> None:
        """Partitions move to another worker: commit what this one answered first, so the next owner starts after
        it (only requests still in flight here run again there). While the worker drains, the revocation waits for
        the drain: the handlers running finish and are committed before the partitions move."""
        if self._drain is not None:
            try:
                await asyncio.shield(self._drain)
            except Exception:
                log.exception("the drain failed")
        await self._commit_bounded(revoked, "of revoked partitions")
        self.offsets.revoked(revoked)

    async def _on_shutdown(self, sender: Any, **kwargs: Any) -> None:
        """Stopping (SIGTERM): commit what was answered before leaving the group."""
        await self._commit_bounded(None, "at shutdown")

    async def _send_completion(self, completion: ActivityCompleted) -> Any:
        """Hand ``completion`` to the producer; returns its delivery future. Straight to faust's producer: the
        topic's send (its message future, serializers and send sensors, none of which a raw-bytes record needs)
        cost a quarter of a millisecond per step in `legato bench latency`."""
        producer = await self.app.maybe_start_producer()
        return await producer.send(self.topics.completions, completion.run_id.encode(), codec.dumps(completion), None, None, None)

    async def _send_record(self, key: bytes, value: bytes) -> Any:
        """Hand a record for the completions topic to the producer; returns its delivery future."""
        producer = await self.app.maybe_start_producer()
        return await producer.send(self.topics.completions, key, value, None, None, None)

    def _skip(self, reason: str) -> None:
        log.info("skipped a request: %s", reason)

    async def _tail_cancellations(self) -> None:
        await tail_topic(self.bootstrap, self.topics.cancellations, self.cancellations.on_record, from_beginning=False)

    async def _tail_cache(self) -> None:
        await tail_topic(self.bootstrap, self.topics.cache, self.cache.on_record, from_beginning=True)


def _delivery(request: ActivityRequested) -> str:
    """What makes a request a duplicate: the same request_id of the same run, i.e. with the same ``run_started_ms``
    (a request decided again after a coordinator crash is decided at another ``requested_ms``; a run_id started
    again after its retention asks the same request ids with another ``run_started_ms``). Requests of coordinators
    that did not send ``run_started_ms`` are told apart by ``requested_ms``."""
    if request.run_started_ms is not None:
        return f"{request.request_id}@{request.run_started_ms}"
    return request.request_id if request.requested_ms is None else f"{request.request_id}@{request.requested_ms}"
