"""GroupCoordinator without sockets: joins, rebalances, expiry, offsets, driven by a fake clock."""
from __future__ import annotations

import asyncio
import json

import pytest

from streams.broker.config import GroupConfig
from streams.broker.group_state import ErrorCode, GroupState
from streams.broker.groups import GroupCoordinator
from streams.broker.offsets_store import FILE_NAME, CommittedOffset, OffsetsStoreError

PROTOCOLS = [("range", b"meta-range"), ("roundrobin", b"meta-rr")]


class FakeClock:
    def __init__(self, start_ms: int = 1_000_000) -> None:
        self.t = start_ms

    def __call__(self) -> int:
        return self.t


def run(coro_fn):
    """Run an async test body with a started coordinator (tick driven by the test, not the timer)."""
    return asyncio.run(coro_fn())


async def started(tmp_path, clock, **cfg) -> GroupCoordinator:
    coord = GroupCoordinator(GroupConfig(**cfg), tmp_path / "__groups", clock, tick_interval_ms=3_600_000)
    await coord.start()
    return coord


async def join(coord, member_id="", group="g", session_ms=10_000, rebalance_ms=5_000, protocols=PROTOCOLS,
               instance=None, v4=False):
    return await coord.join_group(
        group_id=group, member_id=member_id, group_instance_id=instance, session_timeout_ms=session_ms,
        rebalance_timeout_ms=rebalance_ms, protocol_type="consumer", protocols=protocols,
        client_id="c", client_host="127.0.0.1", require_known_member_id=v4,
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_single_member_join_and_sync(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        res = await join(coord)
        assert res.error is ErrorCode.NONE
        assert res.generation_id == 1
        assert res.leader_id == res.member_id
        assert res.protocol_name == "range"
        assert [m.member_id for m in res.members] == [res.member_id]
        assert res.members[0].metadata == b"meta-range"
        sync = await coord.sync_group("g", 1, res.member_id, assignments={res.member_id: b"A"})
        assert (sync.error, sync.assignment) == (ErrorCode.NONE, b"A")
        assert coord.describe_group("g").state is GroupState.STABLE
        assert await coord.heartbeat("g", 1, res.member_id) is ErrorCode.NONE
        assert await coord.heartbeat("g", 0, res.member_id) is ErrorCode.ILLEGAL_GENERATION
        assert await coord.heartbeat("g", 1, "nobody") is ErrorCode.UNKNOWN_MEMBER_ID
        await coord.stop()

    run(body)


async def two_member_group(coord, clock):
    """a joins alone (gen 1, stable); b joins -> a learns via heartbeat, rejoins -> gen 2."""
    a = await join(coord)
    await coord.sync_group("g", a.generation_id, a.member_id, assignments={a.member_id: b"a-all"})
    b_task = asyncio.create_task(join(coord))
    await settle()
    assert await coord.heartbeat("g", a.generation_id, a.member_id) is ErrorCode.REBALANCE_IN_PROGRESS
    a2 = await join(coord, member_id=a.member_id)
    b = await b_task
    return a2, b


def test_two_members_one_leader_and_assignment_relayed(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        a, b = await two_member_group(coord, clock)
        assert a.error is ErrorCode.NONE and b.error is ErrorCode.NONE
        assert a.generation_id == b.generation_id == 2
        assert a.leader_id == b.leader_id == a.member_id  # the existing leader stays leader
        assert {m.member_id for m in a.members} == {a.member_id, b.member_id}
        assert b.members == ()  # only the leader gets the member list
        follower = asyncio.create_task(coord.sync_group("g", 2, b.member_id))
        await settle()
        assert not follower.done()  # waits for the leader
        leader = await coord.sync_group("g", 2, a.member_id, assignments={a.member_id: b"p0", b.member_id: b"p1,p2"})
        assert leader.assignment == b"p0"
        assert (await follower).assignment == b"p1,p2"
        desc = coord.describe_group("g")
        assert desc.state is GroupState.STABLE and desc.protocol_name == "range"
        assert {m.member_id: m.assignment for m in desc.members} == {a.member_id: b"p0", b.member_id: b"p1,p2"}
        await coord.stop()

    run(body)


def test_leave_triggers_rebalance_and_generation_bump(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        a, b = await two_member_group(coord, clock)
        s = asyncio.create_task(coord.sync_group("g", 2, b.member_id))
        await coord.sync_group("g", 2, a.member_id, assignments={a.member_id: b"x", b.member_id: b"y"})
        await s
        assert await coord.leave_group("g", [(a.member_id, None)]) == [(a.member_id, None, ErrorCode.NONE)]
        assert coord.describe_group("g").state is GroupState.PREPARING_REBALANCE
        assert await coord.heartbeat("g", 2, b.member_id) is ErrorCode.REBALANCE_IN_PROGRESS
        b2 = await join(coord, member_id=b.member_id)
        assert b2.generation_id == 3
        assert b2.leader_id == b.member_id  # leadership moves to the survivor
        await coord.leave_group("g", [(b.member_id, None)])
        desc = coord.describe_group("g")
        assert desc.state is GroupState.EMPTY and desc.members == ()
        assert (await coord.leave_group("g", [("ghost", None)]))[0][2] is ErrorCode.UNKNOWN_MEMBER_ID
        await coord.stop()

    run(body)


def test_silent_member_expires_after_session_timeout(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        a, b = await two_member_group(coord, clock)
        s = asyncio.create_task(coord.sync_group("g", 2, b.member_id))
        await coord.sync_group("g", 2, a.member_id, assignments={})
        await s
        clock.t += 6_000
        assert await coord.heartbeat("g", 2, a.member_id) is ErrorCode.NONE  # only a keeps beating
        clock.t += 4_000  # b silent for its whole 10 s session
        coord.tick()
        desc = coord.describe_group("g")
        assert [m.member_id for m in desc.members] == [a.member_id]
        assert desc.state is GroupState.PREPARING_REBALANCE
        assert await coord.heartbeat("g", 2, b.member_id) is ErrorCode.UNKNOWN_MEMBER_ID
        a3 = await join(coord, member_id=a.member_id)
        assert (a3.error, a3.generation_id, len(a3.members)) == (ErrorCode.NONE, 3, 1)
        await coord.stop()

    run(body)


def test_member_that_does_not_rejoin_is_dropped_at_rebalance_timeout(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        a = await join(coord, rebalance_ms=5_000)
        await coord.sync_group("g", 1, a.member_id, assignments={})
        b_task = asyncio.create_task(join(coord, rebalance_ms=5_000))
        await settle()
        clock.t += 4_999
        coord.tick()
        assert not b_task.done()  # still waiting for a to rejoin
        clock.t += 1
        coord.tick()
        b = await b_task  # a never rejoined within the rebalance timeout: dropped, b alone
        assert (b.error, b.generation_id, b.leader_id) == (ErrorCode.NONE, 2, b.member_id)
        assert [m.member_id for m in b.members] == [b.member_id]
        await coord.stop()

    run(body)


def test_member_id_required_round_trip(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        first = await join(coord, v4=True)
        assert first.error is ErrorCode.MEMBER_ID_REQUIRED and first.member_id
        assert coord.describe_group("g").members == ()
        again = await join(coord, member_id=first.member_id, v4=True)
        assert again.error is ErrorCode.NONE and again.member_id == first.member_id
        # an id handed out but never used expires after the session timeout
        other = await join(coord, v4=True, session_ms=2_000)
        clock.t += 2_000
        coord.tick()
        late = await join(coord, member_id=other.member_id, v4=True)
        assert late.error is ErrorCode.UNKNOWN_MEMBER_ID
        await coord.stop()

    run(body)


def test_empty_group_without_offsets_is_removed(tmp_path):
    async def body():
        coord = await started(tmp_path, FakeClock())
        for group in ("scratch", "kept"):
            res = await join(coord, group=group)
            await coord.sync_group(group, 1, res.member_id, assignments={})
            if group == "kept":
                await coord.commit_offsets(group, 1, res.member_id, None, {("t", 0): CommittedOffset(3)})
            await coord.leave_group(group, [(res.member_id, None)])
        coord.tick()
        assert coord.describe_group("scratch") is None
        kept = coord.describe_group("kept")
        assert kept.state is GroupState.EMPTY
        assert [g.group_id for g in coord.list_groups()] == ["kept"]
        await coord.stop()

    run(body)


def test_invalid_session_timeout_and_inconsistent_protocols(tmp_path):
    async def body():
        coord = await started(tmp_path, FakeClock(), min_session_timeout_ms=1000, max_session_timeout_ms=20_000)
        assert (await join(coord, session_ms=999)).error is ErrorCode.INVALID_SESSION_TIMEOUT
        assert (await join(coord, session_ms=20_001)).error is ErrorCode.INVALID_SESSION_TIMEOUT
        assert (await join(coord, group="")).error is ErrorCode.INVALID_GROUP_ID
        await join(coord)
        res = await join(coord, protocols=[("sticky", b"")])
        assert res.error is ErrorCode.INCONSISTENT_GROUP_PROTOCOL
        await coord.stop()

    run(body)


def test_protocol_selected_by_member_preference(tmp_path):
    async def body():
        coord = await started(tmp_path, FakeClock())
        a = await join(coord, protocols=[("rr", b"1"), ("range", b"2")])
        await coord.sync_group("g", 1, a.member_id, assignments={})
        b_task = asyncio.create_task(join(coord, protocols=[("rr", b"3"), ("sticky", b"4"), ("range", b"5")]))
        await settle()
        a2 = await join(coord, member_id=a.member_id, protocols=[("rr", b"1"), ("range", b"2")])
        await b_task
        assert a2.protocol_name == "rr"
        assert sorted(m.metadata for m in a2.members) == [b"1", b"3"]
        await coord.stop()

    run(body)


def test_static_member_rejoin_fences_old_id(tmp_path):
    async def body():
        coord = await started(tmp_path, FakeClock())
        a = await join(coord, instance="pod-1")
        await coord.sync_group("g", 1, a.member_id, group_instance_id="pod-1", assignments={})
        a2 = await join(coord, instance="pod-1")  # restarted process, same instance id
        assert a2.error is ErrorCode.NONE and a2.member_id != a.member_id
        assert await coord.heartbeat("g", a2.generation_id, a.member_id, "pod-1") is ErrorCode.FENCED_INSTANCE_ID
        left = await coord.leave_group("g", [("", "pod-1")])
        assert left == [(a2.member_id, "pod-1", ErrorCode.NONE)]
        await coord.stop()

    run(body)


def test_initial_rebalance_delay_collects_members(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock, initial_rebalance_delay_ms=3000)
        a_task = asyncio.create_task(join(coord))
        b_task = asyncio.create_task(join(coord))
        await settle()
        coord.tick()
        assert not a_task.done()
        clock.t += 3000
        coord.tick()
        a, b = await a_task, await b_task
        assert a.generation_id == b.generation_id == 1
        assert len([r for r in (a, b) if r.members]) == 1 and len((a.members or b.members)) == 2
        await coord.stop()

    run(body)


def test_offsets_commit_fetch_and_survive_restart(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        # a simple commit from outside group management (generation -1) is accepted
        res = await coord.commit_offsets("g", -1, "", None, {("t", 0): CommittedOffset(5, metadata="m")})
        assert res == {("t", 0): ErrorCode.NONE}
        a = await join(coord)
        await coord.sync_group("g", 1, a.member_id, assignments={})
        bad = await coord.commit_offsets("g", 7, a.member_id, None, {("t", 1): CommittedOffset(1)})
        assert bad == {("t", 1): ErrorCode.ILLEGAL_GENERATION}
        stranger = await coord.commit_offsets("g", 1, "ghost", None, {("t", 1): CommittedOffset(1)})
        assert stranger == {("t", 1): ErrorCode.UNKNOWN_MEMBER_ID}
        ok = await coord.commit_offsets("g", 1, a.member_id, None,
                                        {("t", 1): CommittedOffset(11), ("t", 2): CommittedOffset(22, 3, None)})
        assert set(ok.values()) == {ErrorCode.NONE}
        await coord.commit_offsets("g", 1, a.member_id, None, {("t", 1): CommittedOffset(12)})
        await coord.commit_offsets("other", -1, "", None, {("u", 0): CommittedOffset(1)})
        await coord.stop()

        restarted = await started(tmp_path, clock)
        got = restarted.fetch_offsets("g", None)
        assert {tp: c.offset for tp, c in got.items()} == {("t", 0): 5, ("t", 1): 12, ("t", 2): 22}
        assert got[("t", 0)].metadata == "m" and got[("t", 2)].leader_epoch == 3
        assert restarted.fetch_offsets("g", [("t", 1), ("t", 9)])[("t", 9)] is None
        assert {g.group_id for g in restarted.list_groups()} == {"g", "other"}
        await restarted.stop()
        # compacted on start: one line per partition, not one per commit
        lines = (tmp_path / "__groups" / FILE_NAME).read_text().splitlines()
        assert len(lines) == 4

    run(body)


def test_offsets_torn_tail_dropped_but_corruption_refused(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock)
        await coord.commit_offsets("g", -1, "", None, {("t", 0): CommittedOffset(5)})
        await coord.stop()
        path = tmp_path / "__groups" / FILE_NAME
        good = path.read_bytes()
        path.write_bytes(good + b'{"g":"g","t":"t","p":0,"o":9')  # died mid-write
        again = await started(tmp_path, clock)
        assert again.fetch_offsets("g", None)[("t", 0)].offset == 5
        await again.stop()
        path.write_bytes(b"garbage\n" + good)
        with pytest.raises(OffsetsStoreError, match="line 1"):
            await started(tmp_path, clock)

    run(body)


def test_offsets_older_than_retention_dropped_on_start(tmp_path):
    async def body():
        clock = FakeClock()
        coord = await started(tmp_path, clock, offsets_retention_ms=1000)
        await coord.commit_offsets("old", -1, "", None, {("t", 0): CommittedOffset(1)})
        clock.t += 900
        await coord.commit_offsets("new", -1, "", None, {("t", 0): CommittedOffset(2)})
        await coord.stop()
        clock.t += 200
        again = await started(tmp_path, clock, offsets_retention_ms=1000)
        assert again.fetch_offsets("old", None) == {}
        assert again.fetch_offsets("new", None)[("t", 0)].offset == 2
        await again.stop()
        rows = [json.loads(x) for x in (tmp_path / "__groups" / FILE_NAME).read_text().splitlines()]
        assert [r["g"] for r in rows] == ["new"]

    run(body)
