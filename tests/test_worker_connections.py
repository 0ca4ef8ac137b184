"""Which closed connections make a worker lost (`scheduler.connections`, pure, no NATS): its latest one,
closed a heartbeat interval ago, with no new connection and no heartbeat since."""

from __future__ import annotations

from scheduler.connections import WorkerConnections
from scheduler.view import SchedulerView
from sdk.events import Heartbeat, WorkerConnection, WorkerRegistered

INTERVAL_S = 2.0


def registered_view() -> SchedulerView:
    view = SchedulerView()
    view.apply_worker_event(WorkerRegistered(worker_id="w1", name="w1", region="eu", capabilities=("echo",)), 1,
                            stored_at_us=1_000_000, now_s=1.0)
    beat(view, at_s=1.5)
    return view


def beat(view: SchedulerView, at_s: float) -> None:
    heartbeat = Heartbeat(worker_id="w1", region="eu", interval_s=INTERVAL_S)
    view.apply_heartbeat(heartbeat, stored_at_us=int(at_s * 1_000_000), now_s=at_s)


def notice(connected: bool, at_s: float, server: str = "s1", client: int = 7) -> WorkerConnection:
    return WorkerConnection(worker_id="w1", connected=connected, server_id=server, client_id=client,
                            at_us=int(at_s * 1_000_000))


def lost(connections: WorkerConnections, view: SchedulerView, now_s: float) -> list[str]:
    return [worker.worker_id for worker, _ in connections.closed(view, now_s)]


def test_a_closed_connection_makes_the_worker_lost_after_one_interval() -> None:
    view, connections = registered_view(), WorkerConnections()
    connections.apply(notice(True, 1.0), now_s=1.0)
    connections.apply(notice(False, 2.0), now_s=2.0)

    assert lost(connections, view, now_s=2.0 + INTERVAL_S - 0.1) == []
    assert lost(connections, view, now_s=2.0 + INTERVAL_S + 0.1) == ["w1"]


def test_a_new_connection_or_a_later_heartbeat_keeps_the_worker() -> None:
    view, connections = registered_view(), WorkerConnections()
    connections.apply(notice(False, 2.0), now_s=2.0)
    connections.apply(notice(True, 2.1, client=8), now_s=2.1)  # a reconnect
    assert lost(connections, view, now_s=10.0) == []

    connections.apply(notice(False, 11.0, client=8), now_s=11.0)
    beat(view, at_s=11.5)  # its reconnect's notice went missing: the heartbeat says the same
    assert lost(connections, view, now_s=20.0) == []


def test_an_older_connection_closing_after_a_reconnect_changes_nothing() -> None:
    """A network blip: the worker reconnects to another server before the first notices the old
    connection is dead."""
    view, connections = registered_view(), WorkerConnections()
    connections.apply(notice(True, 1.0, server="s1"), now_s=1.0)
    connections.apply(notice(True, 2.0, server="s2"), now_s=2.0)
    connections.apply(notice(False, 3.0, server="s1"), now_s=3.0)

    assert lost(connections, view, now_s=10.0) == []


def test_a_worker_declared_lost_is_forgotten_until_it_closes_a_connection_again() -> None:
    view, connections = registered_view(), WorkerConnections()
    connections.apply(notice(False, 2.0), now_s=2.0)
    assert lost(connections, view, now_s=5.0) == ["w1"]
    connections.forget("w1")

    assert lost(connections, view, now_s=6.0) == []
