"""Leader election by a Lease (router.cluster.lease) against a fake Lease store (tests/fake_kube.py).

The official `kubernetes` client talks HTTP to the fake API server, so the
requests, resourceVersions and 409s are the real client's. Durations are
sub-second; the assertions are about order (which write came first, whether
two leaderships overlap) on one monotonic clock, with the durations as the
bounds, not about how fast a 2-core machine under load happens to be.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import pytest
from fake_kube import FakeKube
from helpers import wait_for_async
from kubernetes import client

from router.cluster.lease import LeaseElector, split_holder

LEASE, RENEW, RETRY = 0.8, 0.5, 0.1


@dataclass
class Candidate:
    elector: LeaseElector
    #: (monotonic time, state, detail) of every on_change call.
    changes: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    task: Optional[asyncio.Task[None]] = None

    def leaderships(self) -> list[tuple[float, float]]:
        """[(led_since, led_until)] of every leadership that ended."""
        return [(d["led_since"], d["led_until"]) for _, s, d in self.changes if s == "stopped"]

    def started(self) -> list[float]:
        return [t for t, s, _ in self.changes if s == "started"]


def candidate(kube: FakeKube, name: str, **kw: Any) -> Candidate:
    config = client.Configuration(host=kube.url)
    api = client.ApiClient(config, header_name="X-Client", header_value=name)
    c = Candidate(None)  # type: ignore[arg-type]
    c.elector = LeaseElector(api, name, f"10.0.0.{len(name)}:8080", "kvrouter-leader", "llm",
                             lease_seconds=kw.pop("lease", LEASE), renew_deadline_seconds=kw.pop("renew", RENEW),
                             retry_period_seconds=kw.pop("retry", RETRY),
                             on_change=lambda state, **d: c.changes.append((time.monotonic(), state, d)), **kw)
    return c


def start(*cands: Candidate) -> None:
    for c in cands:
        c.task = asyncio.get_running_loop().create_task(c.elector.run())


async def crash(c: Candidate) -> None:
    """The process dies: no step-down call, no release."""
    assert c.task is not None
    c.task.cancel()
    await asyncio.gather(c.task, return_exceptions=True)


async def stop_all(*cands: Candidate) -> None:
    for c in cands:
        if c.task is not None and not c.task.done():
            await c.elector.stop()
    await asyncio.gather(*(c.task for c in cands if c.task is not None), return_exceptions=True)


async def watch_leaders(cands: list[Candidate], seconds: float, seen: list[int]) -> None:
    """Sample how many candidates say they lead, every few milliseconds."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen.append(sum(c.elector.is_leader for c in cands))
        await asyncio.sleep(0.005)


def assert_no_overlap(cands: list[Candidate]) -> None:
    spans = sorted(span for c in cands for span in c.leaderships())
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin >= end, f"two leaders at once: one led until {end}, the next from {begin}"


def leader_of(cands: list[Candidate]) -> Candidate:
    (leader,) = [c for c in cands if c.elector.is_leader]
    return leader


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def election(*names: str, **kw: Any) -> AsyncIterator[tuple[FakeKube, list[Candidate]]]:
    """A fake API server and a candidate per name (not started); all stopped at the end."""
    kube = await FakeKube().start()
    cands = [candidate(kube, n, **kw) for n in names]
    try:
        yield kube, cands
    finally:
        kube.blocked.clear()  # a candidate cut off by a test must be able to stop
        await stop_all(*cands)
        await kube.stop()


async def settled(cands: list[Candidate], timeout: float = 3) -> tuple[Candidate, Candidate]:
    """Start two candidates; (leader, follower) once one leads and the other knows it."""
    start(*cands)
    await wait_for_async(lambda: any(c.elector.is_leader for c in cands), timeout)
    leader = leader_of(cands)
    follower = next(c for c in cands if c is not leader)
    await wait_for_async(lambda: follower.elector.leader_address() == leader.elector.address, timeout)
    return leader, follower


def test_three_candidates_one_leader_the_others_know_its_address() -> None:
    async def main() -> None:
        # Longer than the other tests' durations: "never none" needs every renewal in time, which a
        # loaded machine (the suite's other worker, its supervised stacks) must not be able to spoil.
        steady = {"lease": 2.0, "renew": 1.5, "retry": 0.2}
        async with election("a", "bb", "ccc", **steady) as (kube, cands):
            start(*cands)
            await wait_for_async(lambda: any(c.elector.is_leader for c in cands), 5)
            seen: list[int] = []
            await watch_leaders(cands, 3.0, seen)
            leader = leader_of(cands)
            assert set(seen) == {1}  # never none, never two, for 15 renewals
            assert len(leader.started()) == 1
            for c in cands:
                assert c.elector.leader_address() == leader.elector.address
                assert c.elector.leader() == f"{leader.elector.identity}@{leader.elector.address}"
                if c is not leader:
                    assert not c.started() and c.elector.stopped_leading.is_set()
                    assert [d for _, s, d in c.changes if s == "leader"][-1] == {
                        "leader": leader.elector.identity, "address": leader.elector.address}
            assert leader.elector.started_leading.is_set() and not leader.elector.stopped_leading.is_set()
            holders = {h for h in kube.holders()}
            assert holders == {leader.elector.holder}  # the followers never wrote
            lease = kube.leases["llm", "kvrouter-leader"]
            assert lease["spec"]["leaseDurationSeconds"] == 2 and lease["spec"]["leaseTransitions"] == 0
    run(main())


def test_a_dead_leader_is_replaced_after_the_lease_expires_never_before() -> None:
    async def main() -> None:
        async with election("a", "bb", "ccc") as (kube, cands):
            start(*cands)
            await wait_for_async(lambda: any(c.elector.is_leader for c in cands), 3)
            await asyncio.sleep(2 * LEASE)  # a few renewals
            old = leader_of(cands)
            await crash(old)
            rest = [c for c in cands if c is not old]
            await wait_for_async(lambda: any(c.elector.is_leader for c in rest), 10 * LEASE)
            new = leader_of(rest)
            last_renewal = max(w.at for w in kube.writes if w.holder == old.elector.holder)
            taken = min(w.at for w in kube.writes if w.holder == new.elector.holder)
            # The followers saw the last renewal after it was written and waited a full lease from then.
            assert taken - last_renewal >= LEASE
            assert taken - last_renewal < LEASE + 2.0  # and they did take over
            assert new.started()[0] >= taken
            assert kube.leases["llm", "kvrouter-leader"]["spec"]["leaseTransitions"] == 1
            await asyncio.sleep(2 * LEASE)
            assert leader_of(rest) is new  # the third did not take it as well
            assert [c.elector.leader_address() for c in rest] == [new.elector.address] * 2
    run(main())


def test_a_leader_cut_off_from_the_api_server_steps_down_by_its_renew_deadline() -> None:
    async def main() -> None:
        async with election("a", "bb") as (kube, cands):
            old, other = await settled(cands)
            await asyncio.sleep(LEASE)
            kube.blocked.add(old.elector.identity)
            cut = time.monotonic()
            # Its last renewal began before the cut, so it leads no longer than RENEW after it...
            await asyncio.sleep(RENEW + 0.001)
            assert not old.elector.is_leader
            await wait_for_async(lambda: old.elector.stopped_leading.is_set(), 2)
            (span,) = old.leaderships()
            assert span[1] <= cut + RENEW
            stopped = next(d for _, s, d in old.changes if s == "stopped")
            assert "renew deadline" in stopped["reason"]
            # ...and the other takes over only once the lease expired, never while the old one led.
            await wait_for_async(lambda: other.elector.is_leader, 10 * LEASE)
            assert other.started()[0] >= span[1] + (LEASE - RENEW)
            assert_no_overlap(cands)
            # Back on the network, the old leader finds the new holder and follows.
            kube.blocked.clear()
            await wait_for_async(lambda: old.elector.leader_address() == other.elector.address, 5)
            await asyncio.sleep(2 * LEASE)
            assert other.elector.is_leader and not old.elector.is_leader
            assert_no_overlap(cands)
    run(main())


def test_racing_candidates_conflict_and_exactly_one_wins() -> None:
    async def main() -> None:
        # Long calls allowed (renew / 2): a held read must not time out while it waits for the other,
        # however loaded the machine. The Lease changes hands by release here, never by expiry.
        slow = {"lease": 60.0, "renew": 40.0, "retry": 0.1}
        async with election("a", "bb", **slow) as (kube, cands):
            # Both read "no Lease" together, both create it: the API server takes one and 409s the other.
            kube.hold_reads("a", "bb")
            start(*cands)
            await wait_for_async(lambda: any(c.elector.is_leader for c in cands), 10)
            await wait_for_async(lambda: kube.refusals, 10)  # the loser's create may still be on its way
            assert [(verb, code) for _, verb, code in kube.refusals] == [("create", 409)], kube.log
            first = leader_of(cands)
            await stop_all(first)  # steps down and frees the Lease
            other = next(c for c in cands if c is not first)
            await wait_for_async(lambda: other.elector.is_leader, 10)
            assert kube.holders()[-2:] == [None, other.elector.holder]
            await stop_all(other)
            assert kube.holders()[-1] is None
            # Two candidates read the freed Lease at one version and both replace it: one gets 409.
            second_race = candidate(kube, "ddd", **slow)
            kube.hold_reads("ddd", first.elector.identity)
            start(second_race, first)
            await wait_for_async(lambda: any(c.elector.is_leader for c in (second_race, first)), 10)
            await wait_for_async(lambda: ("replace", 409) in [(verb, code) for _, verb, code in kube.refusals[1:]], 10)
            assert sum(c.elector.is_leader for c in (second_race, first)) == 1
            assert_no_overlap([first, other, second_race])
            await stop_all(second_race, first)
    run(main())


def test_stop_releases_the_lease_so_a_follower_takes_over_at_once() -> None:
    async def main() -> None:
        # A long lease: a takeover within it can only come from the release.
        async with election("a", "bb", lease=30.0, renew=20.0, retry=0.1) as (kube, cands):
            old, other = await settled(cands)
            await stop_all(old)
            assert not old.elector.is_leader and old.task is not None and old.task.done()
            await wait_for_async(lambda: other.elector.is_leader, 3)
            assert_no_overlap(cands)
    run(main())


def test_a_follower_without_the_api_server_forgets_the_leader_after_the_lease() -> None:
    async def main() -> None:
        async with election("a", "bb") as (kube, cands):
            leader, follower = await settled(cands)
            kube.blocked.add(follower.elector.identity)
            await asyncio.sleep(LEASE + 0.3)
            # It cannot know the leader still renews: it names none rather than a stale one.
            assert follower.elector.leader_address() is None
            assert not follower.elector.is_leader
    run(main())


def test_settings_that_would_allow_two_leaders_are_refused() -> None:
    api = client.ApiClient(client.Configuration(host="http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="renew_deadline_seconds"):
        LeaseElector(api, "a", "10.0.0.1:8080", "l", "ns", lease_seconds=5, renew_deadline_seconds=5)
    with pytest.raises(ValueError, match="retry_period_seconds"):
        LeaseElector(api, "a", "10.0.0.1:8080", "l", "ns", lease_seconds=5, renew_deadline_seconds=3,
                     retry_period_seconds=3)
    with pytest.raises(ValueError, match="'@'"):
        LeaseElector(api, "a@b", "10.0.0.1:8080", "l", "ns")


def test_holder_text_splits_at_the_last_at() -> None:
    assert split_holder("router-0@[fd00::5]:8080") == ("router-0", "[fd00::5]:8080")
    assert split_holder("kube-controller") == ("kube-controller", None)
    assert split_holder(None) == (None, None)


def test_from_config_runs_for_this_pod_on_the_yaml_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    from router.config import parse_config

    monkeypatch.setenv("POD_NAME", "router-5d8c-x2")
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    cfg = parse_config("""
router: {replicas: 2}
kubernetes: {namespace: llm, lease_name: llm-router, lease_seconds: 0.9}
instances: [{name: a, model: m, engine: vllm, engine_args: "--port 8001"}]
""", "<lease>", sim=True)

    async def main() -> None:
        kube = await FakeKube().start()
        changes: list[tuple[str, dict[str, Any]]] = []
        elector = LeaseElector.from_config(cfg, 8080, client.Configuration(host=kube.url),
                                           on_change=lambda state, **d: changes.append((state, d)))
        assert (elector.lease_seconds, elector.renew_deadline, elector.retry_period) == pytest.approx((0.9, 0.6, 0.12))
        task = asyncio.get_running_loop().create_task(elector.run())
        try:
            await asyncio.wait_for(elector.started_leading.wait(), 3)
            assert kube.leases["llm", "llm-router"]["spec"]["holderIdentity"] == "router-5d8c-x2@10.1.2.3:8080"
            assert elector.leader_address() == "10.1.2.3:8080"
            assert changes[0] == ("started", {"identity": "router-5d8c-x2", "address": "10.1.2.3:8080"})
            assert changes[1] == ("leader", {"leader": "router-5d8c-x2", "address": "10.1.2.3:8080"})
        finally:
            await elector.stop()
            await task
            await kube.stop()
        assert elector.stopped_leading.is_set() and changes[-1][0] in ("stopped", "leader")
    run(main())


def test_a_round_that_ends_after_stop_does_not_lead_again() -> None:
    async def main() -> None:
        async with election("a", lease=6.0, renew=4.0, retry=0.1) as (kube, (c,)):
            start(c)
            await wait_for_async(lambda: c.elector.is_leader, 5)
            kube.blocked.add("a")
            await asyncio.sleep(0.3)  # a renewal is under way, held by the API server
            await c.elector.stop()
            assert not c.elector.is_leader
            kube.blocked.clear()  # the renewal succeeds after the stop
            assert c.task is not None
            await c.task
            assert [s for _, s, _ in c.changes if s in ("started", "stopped")] == ["started", "stopped"]
            assert not c.elector.is_leader and c.elector.stopped_leading.is_set()
            assert kube.holders()[-1] is None  # and it still freed the Lease
    run(main())
