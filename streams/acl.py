"""Least privilege on the topic contract: the Kafka ACLs of each Legato role, and their creation.

A role is a function from a principal (and, for some roles, activities or completion topics) to a list of
:class:`Acl` bindings; :func:`role_acls` is pure, :func:`apply` is the one place that talks to Kafka. Names never
use wildcards: the coordinator's transactional ids (``<prefix>-coordinator-<partition>``) and the activity request
topics are PREFIXED patterns, everything else is LITERAL.

| role | may |
|---|---|
| ``coordinator`` | read triggers, completions, signals, definitions, the cache, its own topic and its changelog, schedules, run events, the limits topic and the limiter's changelog; write the limits topic (acquisitions, releases) and the limiter's changelog (in transactions under ``<prefix>-limiter-*``, group ``<prefix>-limiter``), triggers (schedule ticks), schedules, requests, completions (cache hits), run events, cancellations, the cache, the DLQ, completion topics and its changelog, in transactions under ``<prefix>-coordinator-*`` |
| ``worker`` | read the requests of its activities, cancellations and the cache; write completions, progress, the cache and the DLQ |
| ``trigger`` | write triggers; read the completion topics of its workflows |
| ``signal`` | write signals |
| ``operator`` | cancel, redrive and fork (records on the coordinator topic), deploy (write definitions), schedules (write schedules and triggers), read run events, the run table, schedules and the DLQ |
| ``console`` | read what the console shows: run events, the run table, progress, definitions, signals, schedules, the DLQ |
| ``observer`` | read run events and completion topics |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from legato.topics.names import Topics

ROLES = ("coordinator", "worker", "trigger", "signal", "operator", "console", "observer")

# Kafka's wire codes (org.apache.kafka.common.resource / acl enums).
_RESOURCE = {"topic": 2, "group": 3, "cluster": 4, "transactional-id": 5}
_PATTERN = {"literal": 3, "prefixed": 4}
_OPERATION = {"READ": 3, "WRITE": 4, "CREATE": 5, "DESCRIBE": 8}
_ALLOW = 3


class AclError(RuntimeError):
    """The broker refused to create an ACL (not authorized to alter ACLs, no authorizer configured …)."""


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW binding: ``principal`` may do ``operation`` on the resource (any host)."""

    resource: str  # topic · group · transactional-id
    pattern: str  # literal · prefixed
    name: str
    operation: str
    principal: str

    def __str__(self) -> str:
        return f"{self.principal} ALLOW {self.operation:<8} {self.resource} {self.pattern} {self.name}"


def worker_group(prefix: str, activities: Iterable[str]) -> str:
    """The consumer group (faust app id) of ``legato worker --activity A ...``, as streams/app.py names it."""
    acts = sorted(activities)
    return f"{prefix}-worker-{'-'.join(acts)}" if acts else f"{prefix}-worker"


def role_acls(role: str, principal: str, topics: Topics, activities: Iterable[str] = (), completion_topics: Iterable[str] = ()) -> list[Acl]:
    """The exact ACLs of ``role`` for ``principal`` (``User:NAME``), sorted and without repeats."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if not principal.startswith("User:") or len(principal) <= len("User:"):
        raise ValueError(f"principal {principal!r}: expected User:NAME")
    activities = sorted(set(activities))
    completion = sorted(set(completion_topics))
    if role == "worker" and not activities:
        raise ValueError("the worker role needs its activities (--activity A ...)")
    t = topics
    out: set[Acl] = set()

    def topic(op: str, *names: str, pattern: str = "literal") -> None:
        out.update(Acl("topic", pattern, n, op, principal) for n in names)

    if role == "coordinator":
        topic("READ", t.triggers, t.coordinator, t.completions, t.signals, t.definitions, t.changelog, t.cache, t.schedules, t.runs)
        # limits (docs/limits.md): it writes acquisitions and releases there; its limiter (group <prefix>-limiter)
        # reads them and writes the grants (to the coordinator topic) with its budgets (to its changelog) in
        # transactions under <prefix>-limiter-<partition>
        topic("READ", t.limits, t.limits_changelog)
        topic("WRITE", t.limits, t.limits_changelog)
        topic("CREATE", t.limits_changelog)
        out.add(Acl("group", "literal", t.limiter_group, "READ", principal))
        out.add(Acl("transactional-id", "prefixed", f"{t.limiter_group}-", "WRITE", principal))
        # completions: a cache hit is answered with a cached completion (and a misplaced one is re-keyed there);
        # cache: the results of cache steps, whichever worker answered them
        topic("WRITE", t.runs, t.coordinator, t.completions, t.cancellations, t.dlq, t.changelog, t.cache, t.schedules, t.triggers, *completion)
        # schedules: it reads them, fires their ticks as triggers and records the last tick fired
        topic("WRITE", t.requests(""), pattern="prefixed")
        # it creates the contract's topics at start when they are missing (streams/admin.py), and lists them
        topic("CREATE", t.changelog, *completion)
        topic("CREATE", f"{t.prefix}.", pattern="prefixed")
        topic("DESCRIBE", f"{t.prefix}.", pattern="prefixed")
        out.add(Acl("group", "literal", t.coordinator_group, "READ", principal))
        out.add(Acl("transactional-id", "prefixed", f"{t.coordinator_group}-", "WRITE", principal))
        # a coordinator started with --workflows deploys those files first, under `legato deploy`'s rules
        topic("WRITE", t.definitions)
        out.add(Acl("transactional-id", "literal", t.deployer, "WRITE", principal))
    elif role == "worker":
        group = worker_group(t.prefix, activities)
        topic("READ", *(t.requests(a) for a in activities), t.cancellations, t.cache)
        topic("WRITE", t.completions, t.progress, t.cache, t.dlq)
        # faust elects the group's leader through this one-partition topic, which it creates on first start
        topic("CREATE", f"{group}-__assignor-__leader")
        topic("READ", f"{group}-__assignor-__leader")
        out.add(Acl("group", "literal", group, "READ", principal))
    elif role == "trigger":
        topic("WRITE", t.triggers)
        topic("READ", *completion)
    elif role == "signal":
        topic("WRITE", t.signals)
    elif role == "operator":
        topic("WRITE", t.coordinator, t.definitions)  # cancel, redrive and fork are coordinator-topic records
        topic("WRITE", t.schedules, t.triggers)  # legato schedule create/pause/resume/delete, trigger and backfill
        topic("READ", t.runs, t.changelog, t.dlq, t.definitions, t.schedules, *completion)
        out.add(Acl("transactional-id", "literal", t.deployer, "WRITE", principal))  # legato deploy
    elif role == "console":
        # what the console's run index reads (streams/console/feed.py): the run-keyed topics and every request topic
        topic("READ", t.runs, t.triggers, t.changelog, t.coordinator, t.completions, t.cancellations, t.progress, t.definitions, t.signals,
              t.dlq, t.schedules, *completion)
        topic("READ", t.requests(""), pattern="prefixed")
    elif role == "observer":
        topic("READ", t.runs, *completion)
    return sorted(out)


def render(acls: list[Acl]) -> str:
    """One line per ACL, as ``legato acl`` prints them."""
    return "\n".join(str(a) for a in acls)


def _request(acl: Acl) -> Any:
    from aiokafka.protocol.admin import CreateAclsRequest

    return CreateAclsRequest(_RESOURCE[acl.resource], acl.name, _PATTERN[acl.pattern], acl.principal, "*", _OPERATION[acl.operation], _ALLOW)


async def apply(bootstrap: str, acls: list[Acl], **kafka: Any) -> None:
    """Create ``acls`` through the admin API (creating an existing ACL is a no-op); raises :class:`AclError`.

    aiokafka's admin client has no ``create_acls``: its protocol's CreateAcls request is sent as it is, one binding
    per request (the request builder takes one)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from legato.streams import kafka_io

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="legato-acl", **kafka)
    await admin.start()
    try:
        for acl in acls:
            response = await kafka_io.admin_request(admin, _request(acl))
            for code, message in [(r[0], r[1]) for r in response.creation_responses]:
                if code:
                    from aiokafka.errors import for_code

                    raise AclError(f"cannot create `{acl}`: {for_code(code).__name__} ({code}){': ' + message if message else ''}")
    finally:
        await admin.close()


def command(role: str, principal: str, settings: Any, activities: list[str], completion_topics: list[str], create: bool) -> int:
    """``legato acl``: print the role's ACLs and, with ``create``, create them with this process's credentials."""
    import asyncio
    import sys

    from legato.streams import security

    try:
        acls = role_acls(role, principal, settings.topics, activities, completion_topics)
    except ValueError as exc:
        print(f"legato acl: {exc}", file=sys.stderr)
        return 2
    print(render(acls))
    if create:
        try:
            asyncio.run(apply(settings.bootstrap, acls, **security.aiokafka_kwargs()))
        except AclError as exc:
            print(f"legato acl: {exc}", file=sys.stderr)
            return 1
        print(f"created {len(acls)} ACLs for {principal} on {settings.bootstrap}", file=sys.stderr)
    return 0
