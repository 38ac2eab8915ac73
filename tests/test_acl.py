"""The roles' ACLs as tables: what each role may do on the topic contract, and nothing more (streams/acl.py)."""
from __future__ import annotations

import pytest

from legato.streams import acl
from legato.streams.acl import Acl, role_acls
from legato.streams.cli import main
from legato.topics.names import Topics

T = Topics("legato")
P = "User:someone"


def grants(role: str, **kw) -> set[tuple[str, str, str, str]]:
    return {(a.operation, a.resource, a.pattern, a.name) for a in role_acls(role, P, T, **kw)}


def topics_with(role: str, operation: str, **kw) -> set[str]:
    return {name for op, res, _, name in grants(role, **kw) if op == operation and res == "topic"}


def test_worker_reads_its_requests_and_writes_completions_only():
    g = grants("worker", activities=["summarize", "classify"])
    assert topics_with("worker", "READ", activities=["summarize", "classify"]) == {
        "legato.requests.summarize", "legato.requests.classify", "legato.cancellations", "legato.cache",
        "legato-worker-classify-summarize-__assignor-__leader"}
    assert topics_with("worker", "WRITE", activities=["summarize"]) == {"legato.completions", "legato.progress", "legato.cache", "legato.dlq"}
    assert ("READ", "group", "literal", "legato-worker-classify-summarize") in g
    assert not any(res == "transactional-id" for _, res, _, _ in g)


@pytest.mark.parametrize("forbidden", ["legato.runs", "legato.signals", "legato.definitions", "legato.coordinator", "legato.triggers",
                                       "legato.requests.other", "legato-coordinator-runs-changelog", "legato.limits", "legato-limiter-changelog"])
def test_worker_may_not_write(forbidden):
    assert forbidden not in topics_with("worker", "WRITE", activities=["mine"])
    assert not any(p == "prefixed" for _, _, p, _ in grants("worker", activities=["mine"]))


def test_worker_needs_activities():
    with pytest.raises(ValueError, match="--activity"):
        role_acls("worker", P, T)


def test_coordinator_transactions_and_group_follow_one_prefix():
    g = grants("coordinator", completion_topics=["app.done"])
    assert ("WRITE", "transactional-id", "prefixed", "legato-coordinator-") in g
    assert ("READ", "group", "literal", "legato-coordinator") in g
    # streams/coordinator.py: transactional_id=f"{self.group}-{p}" with group = Topics.coordinator_group
    assert f"{T.coordinator_group}-3".startswith("legato-coordinator-")
    assert ("WRITE", "topic", "prefixed", "legato.requests.") in g
    assert {"legato.runs", "legato.cancellations", "legato.dlq", "legato.coordinator", T.changelog, "app.done"} <= topics_with("coordinator", "WRITE", completion_topics=["app.done"])
    assert {"legato.triggers", "legato.completions", "legato.signals", "legato.coordinator", T.changelog} <= topics_with("coordinator", "READ")
    assert "legato.signals" not in topics_with("coordinator", "WRITE")
    # schedules (docs/schedules.md): it reads them and the runs they started, fires ticks as triggers, records them
    assert {"legato.schedules", "legato.triggers"} <= topics_with("coordinator", "WRITE")
    assert {"legato.schedules", "legato.runs"} <= topics_with("coordinator", "READ")
    # cluster-wide limits: acquisitions and releases written to the limits topic, read by the limiter, which keeps its
    # budgets in its changelog in transactions of its own group (streams/limiter.py: transactional_id=f"{group}-{p}")
    assert {"legato.limits", T.limits_changelog} <= topics_with("coordinator", "WRITE") & topics_with("coordinator", "READ")
    assert T.limits_changelog == "legato-limiter-changelog" and T.limits_changelog in topics_with("coordinator", "CREATE")
    assert ("READ", "group", "literal", "legato-limiter") in g
    assert ("WRITE", "transactional-id", "prefixed", "legato-limiter-") in g and f"{T.limiter_group}-3".startswith("legato-limiter-")
    # the result cache: read whole, entries written for every worker, hits answered as cached completions
    assert {"legato.cache", "legato.completions"} <= topics_with("coordinator", "WRITE") & topics_with("coordinator", "READ")


@pytest.mark.parametrize("role,writes,reads", [
    ("trigger", {"legato.triggers"}, {"app.done"}),
    ("signal", {"legato.signals"}, set()),
    ("observer", set(), {"legato.runs", "app.done"}),
    ("console", set(), {"legato.runs", "legato.triggers", T.changelog, "legato.coordinator", "legato.completions", "legato.cancellations", "legato.requests.",
                        "legato.progress", "legato.definitions", "legato.signals", "legato.dlq", "legato.schedules", "app.done"}),
    ("operator", {"legato.coordinator", "legato.definitions", "legato.schedules", "legato.triggers"},
     {"legato.runs", T.changelog, "legato.dlq", "legato.definitions", "legato.schedules", "app.done"}),
])
def test_client_roles(role, writes, reads):
    assert topics_with(role, "WRITE", completion_topics=["app.done"]) == writes
    assert topics_with(role, "READ", completion_topics=["app.done"]) == reads
    resources = {res for _, res, _, _ in grants(role, completion_topics=["app.done"])}
    if role == "operator":  # `legato deploy` writes under the deployers' one transactional id, nothing else
        assert resources == {"topic", "transactional-id"}
        assert [g for g in grants(role) if g[1] == "transactional-id"] == [("WRITE", "transactional-id", "literal", T.deployer)]
    else:
        assert resources == {"topic"}  # no groups, no transactions


def test_a_coordinator_deploys_its_files_under_the_deployers_transactional_id():
    g = grants("coordinator")
    assert ("WRITE", "transactional-id", "literal", T.deployer) in g
    assert "legato.definitions" in topics_with("coordinator", "WRITE")


@pytest.mark.parametrize("role", acl.ROLES)
def test_no_wildcards_and_principal_on_every_acl(role):
    acls = role_acls(role, P, Topics("tenant1"), activities=["a"], completion_topics=["t.done"])
    assert acls and all(a.principal == P and "*" not in a.name and a.name for a in acls)
    assert all(a.name.startswith("tenant1") or a.name == "t.done" for a in acls)
    assert acls == sorted(set(acls))


def test_bad_role_and_principal():
    with pytest.raises(ValueError, match="unknown role"):
        role_acls("admin", P, T)
    with pytest.raises(ValueError, match="User:NAME"):
        role_acls("observer", "someone", T)


def test_worker_group_is_the_faust_app_id():
    # streams/app.py: role = "worker-" + "-".join(sorted(only_activities)); app id f"{prefix}-{role}"
    assert acl.worker_group("legato", ["b", "a"]) == "legato-worker-a-b"
    assert acl.worker_group("p", []) == "p-worker"


def test_create_acls_request_carries_kafka_codes():
    req = acl._request(Acl("transactional-id", "prefixed", "legato-coordinator-", "WRITE", P))
    assert (req._resource_type, req._resource_name, req._resource_pattern_type_filter, req._principal, req._host, req._operation,
            req._permission_type) == (5, "legato-coordinator-", 4, P, "*", 4, 3)


def test_cli_prints_the_acls(capsys, monkeypatch):
    monkeypatch.delenv("LEGATO_SECURITY_PROTOCOL", raising=False)
    assert main(["acl", "signal", "--principal", "User:bob"]) == 0
    assert capsys.readouterr().out.strip() == "User:bob ALLOW WRITE    topic literal legato.signals"
    assert main(["acl", "worker", "--principal", "User:w"]) == 2
    assert "--activity" in capsys.readouterr().err


def test_worker_group_matches_the_app_that_streams_app_builds(monkeypatch, tmp_path):
    from legato.streams import app as app_module
    from legato.streams.config import Settings

    async def no_topics(*args, **kwargs) -> None:
        return None

    monkeypatch.setattr(app_module, "ensure_topics", no_topics)
    monkeypatch.delenv("LEGATO_SECURITY_PROTOCOL", raising=False)
    settings = Settings(prefix="grp", handler_modules=["tests.integration.e2e_handlers"], data_dir=tmp_path)
    built = app_module.build(settings, coordinator=False, worker=True, only_activities=["e2e_sleep", "e2e_echo"])
    assert built.app is not None and built.app.conf.id == acl.worker_group("grp", ["e2e_echo", "e2e_sleep"])
    assert f"{built.app.conf.id}-__assignor-__leader" in {a.name for a in role_acls("worker", P, Topics("grp"), ["e2e_echo", "e2e_sleep"])}
