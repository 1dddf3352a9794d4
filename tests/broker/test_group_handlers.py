"""Every advertised version of every group API: request bytes -> handler -> response bytes -> decoded.

Runs the real handlers against a real GroupCoordinator and kafka-python's message classes, without
sockets, so a field that does not exist in some version (or a null where the schema forbids one)
fails here with the version named.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from kafka.protocol.admin import DescribeGroupsRequest, DescribeGroupsResponse, ListGroupsRequest, ListGroupsResponse
from kafka.protocol.consumer import (
    HeartbeatRequest,
    HeartbeatResponse,
    JoinGroupRequest,
    JoinGroupResponse,
    LeaveGroupRequest,
    LeaveGroupResponse,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchRequest,
    OffsetFetchResponse,
    SyncGroupRequest,
    SyncGroupResponse,
)
from kafka.protocol.metadata import FindCoordinatorRequest, FindCoordinatorResponse

from streams.broker.config import GroupConfig
from streams.broker.groups import GroupCoordinator
from streams.broker.handlers_group import HANDLERS
from streams.broker.server import RequestContext

RESPONSES = {
    cls.API_KEY: cls
    for cls in (FindCoordinatorResponse, JoinGroupResponse, SyncGroupResponse, HeartbeatResponse,
                LeaveGroupResponse, OffsetCommitResponse, OffsetFetchResponse, ListGroupsResponse,
                DescribeGroupsResponse)
}


async def call(broker, request):
    """What the server does: decode the request bytes at their version, run the handler, round-trip."""
    v = request.API_VERSION
    handler, lo, hi = HANDLERS[request.API_KEY]
    assert lo <= v <= hi
    decoded = type(request).decode(request.encode(), version=v)
    ctx = RequestContext(request.API_KEY, v, 1, "client-1", "127.0.0.1", broker)
    response = await handler(ctx, decoded)
    response.API_VERSION = v
    return RESPONSES[request.API_KEY].decode(response.encode(), version=v)


def versions(request_cls) -> range:
    _, lo, hi = HANDLERS[request_cls.API_KEY]
    return range(lo, hi + 1)


def with_broker(tmp_path, body):
    async def main():
        coord = GroupCoordinator(GroupConfig(), tmp_path / "__groups", lambda: 1_000_000, tick_interval_ms=3_600_000)
        await coord.start()
        logs = SimpleNamespace(topics=lambda: {"t": 2})  # what handlers read of the log manager
        broker = SimpleNamespace(groups=coord, logs=logs, node_id=0, advertised_host="127.0.0.1", port=19092)
        try:
            await body(broker)
        finally:
            await coord.stop()

    asyncio.run(main())


def test_advertised_apis_cover_the_group_protocol():
    assert set(HANDLERS) == {10, 11, 12, 13, 14, 8, 9, 16, 15}
    for key, (_, lo, hi) in HANDLERS.items():
        assert lo == 0 and hi >= 3, key  # aiokafka and librdkafka start at v0..v3


@pytest.mark.parametrize("v", versions(FindCoordinatorRequest))
def test_find_coordinator_all_versions(tmp_path, v):
    async def body(broker):
        if v < 4:
            req = FindCoordinatorRequest(version=v, key="g", key_type=0)
            resp = await call(broker, req)
            assert (resp.error_code, resp.node_id, resp.host, resp.port) == (0, 0, "127.0.0.1", 19092)
        else:
            req = FindCoordinatorRequest(version=v, key_type=0, coordinator_keys=["g", "h"])
            resp = await call(broker, req)
            assert [(c.key, c.port, c.error_code) for c in resp.coordinators] == [("g", 19092, 0), ("h", 19092, 0)]

    with_broker(tmp_path, body)


def join_req(v, member_id=""):
    P = JoinGroupRequest.JoinGroupRequestProtocol
    return JoinGroupRequest(
        version=v, group_id="g", session_timeout_ms=10_000, rebalance_timeout_ms=5_000, member_id=member_id,
        group_instance_id=None, protocol_type="consumer", protocols=[P(version=v, name="range", metadata=b"m")],
        reason=None,
    )


@pytest.mark.parametrize("v", versions(JoinGroupRequest))
def test_join_sync_heartbeat_leave_all_versions(tmp_path, v):
    async def body(broker):
        resp = await call(broker, join_req(v))
        if v >= 4:
            assert resp.error_code == 79 and resp.member_id  # MEMBER_ID_REQUIRED
            resp = await call(broker, join_req(v, resp.member_id))
        assert resp.error_code == 0 and resp.generation_id == 1 and resp.leader == resp.member_id
        assert resp.protocol_name == "range" and [m.metadata for m in resp.members] == [b"m"]
        me = resp.member_id
        sv = min(v, 5)
        A = SyncGroupRequest.SyncGroupRequestAssignment
        sync = await call(broker, SyncGroupRequest(
            version=sv, group_id="g", generation_id=1, member_id=me, group_instance_id=None,
            protocol_type="consumer", protocol_name="range", assignments=[A(version=sv, member_id=me, assignment=b"a")],
        ))
        assert (sync.error_code, sync.assignment) == (0, b"a")
        hv = min(v, 4)
        hb = await call(broker, HeartbeatRequest(version=hv, group_id="g", generation_id=1, member_id=me,
                                                 group_instance_id=None))
        assert hb.error_code == 0
        hb = await call(broker, HeartbeatRequest(version=hv, group_id="g", generation_id=9, member_id=me,
                                                 group_instance_id=None))
        assert hb.error_code == 22  # ILLEGAL_GENERATION
        lv = min(v, 5)
        if lv >= 3:
            M = LeaveGroupRequest.MemberIdentity
            leave = await call(broker, LeaveGroupRequest(
                version=lv, group_id="g", members=[M(version=lv, member_id=me, group_instance_id=None, reason=None),
                                                   M(version=lv, member_id="ghost", group_instance_id=None,
                                                     reason=None)]))
            assert leave.error_code == 0 and [m.error_code for m in leave.members] == [0, 25]
        else:
            leave = await call(broker, LeaveGroupRequest(version=lv, group_id="g", member_id=me))
            assert leave.error_code == 0
        assert broker.groups.describe_group("g").state.value == "Empty"

    with_broker(tmp_path, body)


@pytest.mark.parametrize("v", versions(OffsetCommitRequest))
def test_offset_commit_and_fetch_all_versions(tmp_path, v):
    async def body(broker):
        T = OffsetCommitRequest.OffsetCommitRequestTopic
        P = T.OffsetCommitRequestPartition
        req = OffsetCommitRequest(
            version=v, group_id="g", generation_id_or_member_epoch=-1, member_id="", group_instance_id=None,
            retention_time_ms=-1,
            topics=[T(version=v, name="t", partitions=[
                P(version=v, partition_index=p, committed_offset=10 + p, committed_leader_epoch=-1,
                  commit_timestamp=-1, committed_metadata="md") for p in (0, 1, 2)]),
                T(version=v, name="nope", partitions=[
                    P(version=v, partition_index=0, committed_offset=1, committed_leader_epoch=-1,
                      commit_timestamp=-1, committed_metadata=None)])],
        )
        resp = await call(broker, req)
        assert [(t.name, [(p.partition_index, p.error_code) for p in t.partitions]) for t in resp.topics] == [
            ("t", [(0, 0), (1, 0), (2, 3)]), ("nope", [(0, 3)])]  # 3: UNKNOWN_TOPIC_OR_PARTITION
        got = await fetch(broker, v, [("t", [1, 2])])
        assert got == {("t", 1): (11, "md"), ("t", 2): (-1, "")}
        if v >= 2:
            assert await fetch(broker, v, None) == {("t", 0): (10, "md"), ("t", 1): (11, "md")}

    with_broker(tmp_path, body)


async def fetch(broker, v, topics):
    if v >= 8:
        G = OffsetFetchRequest.OffsetFetchRequestGroup
        T = G.OffsetFetchRequestTopics
        ts = None if topics is None else [T(version=v, name=n, partition_indexes=ps) for n, ps in topics]
        req = OffsetFetchRequest(version=v, groups=[G(version=v, group_id="g", member_id=None, member_epoch=-1,
                                                      topics=ts)], require_stable=False)
        resp = await call(broker, req)
        (group,) = resp.groups
        assert group.group_id == "g" and group.error_code == 0
        resp_topics = group.topics
    else:
        T = OffsetFetchRequest.OffsetFetchRequestTopic
        ts = None if topics is None else [T(version=v, name=n, partition_indexes=ps) for n, ps in topics]
        resp = await call(broker, OffsetFetchRequest(version=v, group_id="g", topics=ts, require_stable=False))
        assert resp.error_code == 0
        resp_topics = resp.topics
    return {
        (t.name, p.partition_index): (p.committed_offset, p.metadata)
        for t in resp_topics for p in t.partitions
        if p.error_code == 0
    }


@pytest.mark.parametrize("v", versions(DescribeGroupsRequest))
def test_list_and_describe_groups_all_versions(tmp_path, v):
    async def body(broker):
        join = await call(broker, join_req(3, ""))
        me = join.member_id
        A = SyncGroupRequest.SyncGroupRequestAssignment
        await call(broker, SyncGroupRequest(version=3, group_id="g", generation_id=1, member_id=me,
                                            group_instance_id=None,
                                            assignments=[A(version=3, member_id=me, assignment=b"a")]))
        lv = min(v, 5)
        listed = await call(broker, ListGroupsRequest(version=lv, states_filter=[], types_filter=[]))
        assert [(g.group_id, g.protocol_type) for g in listed.groups] == [("g", "consumer")]
        if lv >= 4:
            none = await call(broker, ListGroupsRequest(version=lv, states_filter=["Empty"], types_filter=[]))
            assert none.groups == []
        desc = await call(broker, DescribeGroupsRequest(version=v, groups=["g", "missing"],
                                                        include_authorized_operations=False))
        g, missing = desc.groups
        assert (g.error_code, g.group_state, g.protocol_data) == (0, "Stable", "range")
        assert [(m.member_id, m.client_id, m.member_metadata, m.member_assignment) for m in g.members] == [
            (me, "client-1", b"m", b"a")]
        assert missing.group_state == "Dead" and missing.error_code == (69 if v >= 6 else 0)

    with_broker(tmp_path, body)
