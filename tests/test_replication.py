"""Replication of the topics Legato creates, and the start-up check of the topics a coordinator uses."""
import pytest

from legato.streams.admin import Replication, TopicMismatch, check_topics
from legato.streams.config import Settings


def _topic(name: str, partitions: int, replicas: int) -> dict:
    return {"topic": name, "partitions": [{"partition": p, "replicas": list(range(1, replicas + 1))} for p in range(partitions)]}


@pytest.mark.parametrize("brokers, factor, min_insync", [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2)])
def test_the_default_factor_is_three_or_the_brokers_when_fewer_and_min_isr_one_less(brokers, factor, min_insync):
    assert Replication().resolve(brokers) == (factor, min_insync)


def test_set_values_win_and_min_isr_never_exceeds_the_factor():
    assert Replication(5, None).resolve(3) == (5, 4)
    assert Replication(2, 2).resolve(3) == (2, 2)
    assert Replication(None, 3).resolve(1) == (1, 1)


def test_settings_read_the_replication_variables(monkeypatch):
    assert (Settings().replication_factor, Settings().min_insync_replicas) == (None, None)
    monkeypatch.setenv("LEGATO_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("LEGATO_MIN_INSYNC_REPLICAS", "2")
    assert Settings.from_env().replication == Replication(3, 2)


@pytest.mark.parametrize("bad", ["0", "-1", "three", "2.5"])
def test_a_bad_replication_setting_is_refused_by_name(monkeypatch, bad):
    monkeypatch.setenv("LEGATO_REPLICATION_FACTOR", bad)
    with pytest.raises(ValueError, match="LEGATO_REPLICATION_FACTOR"):
        Settings.from_env()


def test_a_run_keyed_topic_with_another_partition_count_stops_the_start_naming_it_and_the_fix():
    with pytest.raises(TopicMismatch) as err:
        check_topics([_topic("x.runs", 8, 3), _topic("x.completions", 12, 3)], ["x.runs", "x.completions"], 8, 3, 3)
    assert "x.completions has 12 partitions" in str(err.value)
    assert "LEGATO_PARTITIONS" in str(err.value) and "moves keys" in str(err.value)


def test_a_topic_that_is_not_run_keyed_may_have_another_count():
    check_topics([_topic("x.triggers", 3, 3), _topic("x.runs", 8, 3)], ["x.runs"], 8, 3, 3)


def test_a_topic_replicated_less_than_the_setting_stops_the_start_on_a_cluster_with_the_brokers():
    with pytest.raises(TopicMismatch) as err:
        check_topics([_topic("x.runs", 8, 3), _topic("x-coordinator-runs-changelog", 8, 1)], ["x.runs"], 8, 3, 3)
    message = str(err.value)
    assert "x-coordinator-runs-changelog has replication factor 1" in message
    assert "kafka-reassign-partitions.sh" in message and "LEGATO_REPLICATION_FACTOR=1" in message


def test_on_a_cluster_without_the_brokers_for_the_factor_a_lower_replication_is_accepted():
    check_topics([_topic("x.runs", 8, 1)], ["x.runs"], 8, 3, 1)


def test_a_topic_replicated_more_than_the_setting_is_fine():
    check_topics([_topic("x.runs", 8, 3)], ["x.runs"], 8, 2, 3)


class _Admin:
    """Answers create_topics with one error code per topic (the admin client is not under test: the handling is)."""

    def __init__(self, codes):
        self.codes, self.calls = codes, 0

    async def create_topics(self, new):
        self.calls += 1
        return type("Response", (), {"topic_errors": [(t.name, self.codes.get(t.name, 0), "") for t in new]})()


def test_a_topic_the_principal_may_not_create_is_left_to_one_that_may_and_other_errors_still_stop_the_start():
    import asyncio

    import pytest
    from aiokafka.admin import NewTopic

    from legato.streams.admin import _create

    admin = _Admin({"p.runs": 29})  # TOPIC_AUTHORIZATION_FAILED: a worker under ACLs
    asyncio.run(_create(admin, [NewTopic("p.runs", 8, 1), NewTopic("p.requests.a", 8, 1)]))
    assert admin.calls == 1
    with pytest.raises(Exception, match="creating topic p.bad"):
        asyncio.run(_create(_Admin({"p.bad": 37}), [NewTopic("p.bad", 8, 1)]))  # INVALID_PARTITIONS
