"""Who may see what: the rule every delivery path applies."""

import pytest

from events.core import routing


@pytest.mark.parametrize(
    ("event_user", "process_instance", "broadcast", "followed", "visible"),
    [
        ("alice", None, False, set(), True),
        ("bob", None, False, set(), False),
        (None, None, True, set(), True),
        (None, "p1", False, {"p1"}, True),
        (None, "p1", False, {"p2"}, False),
        ("alice", "p1", False, {"p1"}, True),
        ("bob", "p1", False, {"p1"}, False),
        ("alice", "p1", False, set(), False),
    ],
)
def test_visible_to_alice(
    event_user: str | None, process_instance: str | None, broadcast: bool, followed: set[str], visible: bool
) -> None:
    assert (
        routing.visible_to(
            stream_user="alice",
            event_user=event_user,
            process_instance=process_instance,
            broadcast=broadcast,
            followed=followed,
        )
        is visible
    )


@pytest.mark.parametrize("keys", [routing.Keyspace(), routing.Keyspace(shards=16, cluster=True)])
def test_each_event_lives_in_exactly_one_source_a_stream_reads(keys: routing.Keyspace) -> None:
    sources = keys.sources_for(user="alice", process_instances=["p1"])
    assert keys.source_of(type="message", user="alice", process_instance=None, broadcast=False) in sources
    assert keys.source_of(type="message", user=None, process_instance=None, broadcast=True) in sources
    assert keys.source_of(type="message", user="alice", process_instance="p1", broadcast=False) in sources
    assert keys.source_of(type="disconnect", user="alice", process_instance="p1", broadcast=False) in sources
    assert keys.source_of(type="message", user="bob", process_instance=None, broadcast=False) not in sources
    assert keys.source_of(type="connect", user="alice", process_instance="p1", broadcast=False) is None
