"""Group-coordination request table: wire messages <-> ``GroupCoordinator`` calls.

``HANDLERS`` maps api_key -> (handler, min_version, max_version). The ranges are what this module
really speaks: every version kafka-python 3.0's schemas know, except OffsetCommit v10 and
OffsetFetch v10, which address topics by id only. Clients in use ask for: kafka-python (highest
common versions), aiokafka 0.14 (JoinGroup <= 5, SyncGroup <= 3, Heartbeat/LeaveGroup <= 1,
OffsetCommit/OffsetFetch <= 3), librdkafka 2.x (JoinGroup <= 5, OffsetCommit <= 9, OffsetFetch
<= 9, ...).
"""
from __future__ import annotations

import logging

from kafka.protocol.admin import (
    DescribeGroupsRequest,
    DescribeGroupsResponse,
    ListGroupsRequest,
    ListGroupsResponse,
)
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

from streams.broker.group_state import ErrorCode, GroupState
from streams.broker.groups import GroupCoordinator
from streams.broker.offsets_store import CommittedOffset
from streams.broker.server import HandlerTable, RequestContext

logger = logging.getLogger(__name__)

GROUP_KEY_TYPE = 0
TRANSACTION_KEY_TYPE = 1
GROUP_TYPE_CLASSIC = "classic"


def _coordinator(ctx: RequestContext) -> GroupCoordinator | None:
    return ctx.broker.groups


async def handle_find_coordinator(ctx: RequestContext, req: FindCoordinatorRequest) -> FindCoordinatorResponse:
    v = ctx.api_version
    broker = ctx.broker
    available = _coordinator(ctx) is not None
    error = ErrorCode.NONE
    if req.key_type not in (GROUP_KEY_TYPE, TRANSACTION_KEY_TYPE):
        error = ErrorCode.INVALID_REQUEST
    elif not available:
        error = ErrorCode.COORDINATOR_NOT_AVAILABLE
    node_id, host, port = (broker.node_id, broker.advertised_host, broker.port) if not error else (-1, "", -1)
    if v < 4:
        return FindCoordinatorResponse(
            version=v, throttle_time_ms=0, error_code=error, error_message=None,
            node_id=node_id, host=host, port=port,
        )
    coordinators = [
        FindCoordinatorResponse.Coordinator(
            version=v, key=key, node_id=node_id, host=host, port=port, error_code=error, error_message=None,
        )
        for key in req.coordinator_keys
    ]
    return FindCoordinatorResponse(version=v, throttle_time_ms=0, coordinators=coordinators)


async def handle_join_group(ctx: RequestContext, req: JoinGroupRequest) -> JoinGroupResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    if groups is None:
        result_error, result = ErrorCode.COORDINATOR_NOT_AVAILABLE, None
    else:
        result = await groups.join_group(
            group_id=req.group_id,
            member_id=req.member_id,
            group_instance_id=req.group_instance_id if v >= 5 else None,
            session_timeout_ms=req.session_timeout_ms,
            rebalance_timeout_ms=req.rebalance_timeout_ms if v >= 1 else -1,
            protocol_type=req.protocol_type,
            protocols=[(p.name, bytes(p.metadata)) for p in req.protocols],
            client_id=ctx.client_id or "",
            client_host=ctx.client_host,
            require_known_member_id=v >= 4,
        )
        result_error = result.error
    members = []
    if result is not None:
        members = [
            JoinGroupResponse.JoinGroupResponseMember(
                version=v, member_id=m.member_id, group_instance_id=m.group_instance_id, metadata=m.metadata,
            )
            for m in result.members
        ]
    protocol_name = result.protocol_name if result is not None else None
    return JoinGroupResponse(
        version=v,
        throttle_time_ms=0,
        error_code=result_error,
        generation_id=result.generation_id if result is not None else -1,
        protocol_type=result.protocol_type if result is not None and not result_error else None,
        protocol_name=protocol_name if v >= 7 else (protocol_name or ""),
        leader=result.leader_id if result is not None else "",
        skip_assignment=False,
        member_id=result.member_id if result is not None else req.member_id,
        members=members,
    )


async def handle_sync_group(ctx: RequestContext, req: SyncGroupRequest) -> SyncGroupResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    if groups is None:
        return SyncGroupResponse(version=v, throttle_time_ms=0, error_code=ErrorCode.COORDINATOR_NOT_AVAILABLE,
                                 assignment=b"")
    result = await groups.sync_group(
        group_id=req.group_id,
        generation_id=req.generation_id,
        member_id=req.member_id,
        group_instance_id=req.group_instance_id if v >= 3 else None,
        assignments={a.member_id: bytes(a.assignment) for a in req.assignments},
        protocol_type=req.protocol_type if v >= 5 else None,
        protocol_name=req.protocol_name if v >= 5 else None,
    )
    return SyncGroupResponse(
        version=v,
        throttle_time_ms=0,
        error_code=result.error,
        protocol_type=result.protocol_type,
        protocol_name=result.protocol_name,
        assignment=result.assignment,
    )


async def handle_heartbeat(ctx: RequestContext, req: HeartbeatRequest) -> HeartbeatResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    if groups is None:
        error = ErrorCode.COORDINATOR_NOT_AVAILABLE
    else:
        error = await groups.heartbeat(
            req.group_id, req.generation_id, req.member_id, req.group_instance_id if v >= 3 else None
        )
    return HeartbeatResponse(version=v, throttle_time_ms=0, error_code=error)


async def handle_leave_group(ctx: RequestContext, req: LeaveGroupRequest) -> LeaveGroupResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    if v >= 3:
        leaving = [(m.member_id, m.group_instance_id) for m in req.members]
    else:
        leaving = [(req.member_id, None)]
    if groups is None:
        results = [(mid, iid, ErrorCode.COORDINATOR_NOT_AVAILABLE) for mid, iid in leaving]
    else:
        results = await groups.leave_group(req.group_id, leaving)
    if v < 3:
        return LeaveGroupResponse(version=v, throttle_time_ms=0, error_code=results[0][2])
    top = ErrorCode.COORDINATOR_NOT_AVAILABLE if groups is None else ErrorCode.NONE
    members = [
        LeaveGroupResponse.MemberResponse(version=v, member_id=mid, group_instance_id=iid, error_code=err)
        for mid, iid, err in results
    ]
    return LeaveGroupResponse(version=v, throttle_time_ms=0, error_code=top, members=members)


async def handle_offset_commit(ctx: RequestContext, req: OffsetCommitRequest) -> OffsetCommitResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    offsets: dict[tuple[str, int], CommittedOffset] = {}
    for topic in req.topics:
        for p in topic.partitions:
            offsets[(topic.name, p.partition_index)] = CommittedOffset(
                offset=p.committed_offset,
                leader_epoch=p.committed_leader_epoch if v >= 6 else -1,
                metadata=p.committed_metadata,
            )
    # As Kafka does: a partition that does not exist is refused, the rest of the commit goes ahead.
    n_partitions = ctx.broker.logs.topics() if ctx.broker.logs is not None else {}
    errors = {
        tp: ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        for tp in offsets
        if not 0 <= tp[1] < n_partitions.get(tp[0], 0)
    }
    known = {tp: c for tp, c in offsets.items() if tp not in errors}
    if groups is None:
        errors.update({tp: ErrorCode.COORDINATOR_NOT_AVAILABLE for tp in known})
    elif known:
        errors.update(await groups.commit_offsets(
            group_id=req.group_id,
            generation_id=req.generation_id_or_member_epoch if v >= 1 else -1,
            member_id=req.member_id if v >= 1 else "",
            group_instance_id=req.group_instance_id if v >= 7 else None,
            offsets=known,
        ))
    topics = [
        OffsetCommitResponse.OffsetCommitResponseTopic(
            version=v,
            name=topic.name,
            partitions=[
                OffsetCommitResponse.OffsetCommitResponseTopic.OffsetCommitResponsePartition(
                    version=v, partition_index=p.partition_index,
                    error_code=errors[(topic.name, p.partition_index)],
                )
                for p in topic.partitions
            ],
        )
        for topic in req.topics
    ]
    return OffsetCommitResponse(version=v, throttle_time_ms=0, topics=topics)


def _fetch_group(
    groups: GroupCoordinator, group_id: str, topics: list | None
) -> dict[str, list[tuple[int, CommittedOffset | None]]]:
    """Committed offsets per topic for the requested (topic, partitions) list, or all when None."""
    wanted = None
    if topics is not None:
        wanted = [(t.name, p) for t in topics for p in t.partition_indexes]
    by_topic: dict[str, list[tuple[int, CommittedOffset | None]]] = {}
    if topics is not None:
        for t in topics:
            by_topic.setdefault(t.name, [])
    for (topic, partition), committed in groups.fetch_offsets(group_id, wanted).items():
        by_topic.setdefault(topic, []).append((partition, committed))
    return by_topic


async def handle_offset_fetch(ctx: RequestContext, req: OffsetFetchRequest) -> OffsetFetchResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    if groups is None:
        if v >= 8:
            resp_groups = [
                OffsetFetchResponse.OffsetFetchResponseGroup(
                    version=v, group_id=g.group_id, topics=[], error_code=ErrorCode.COORDINATOR_NOT_AVAILABLE,
                )
                for g in req.groups
            ]
            return OffsetFetchResponse(version=v, throttle_time_ms=0, groups=resp_groups)
        return OffsetFetchResponse(version=v, throttle_time_ms=0, topics=[],
                                   error_code=ErrorCode.COORDINATOR_NOT_AVAILABLE)
    if v >= 8:
        G = OffsetFetchResponse.OffsetFetchResponseGroup
        T = G.OffsetFetchResponseTopics
        P = T.OffsetFetchResponsePartitions
        resp_groups = []
        for g in req.groups:
            by_topic = _fetch_group(groups, g.group_id, g.topics)
            topics = [
                T(version=v, name=name, partitions=[_partition(P, v, p, c) for p, c in parts])
                for name, parts in by_topic.items()
            ]
            resp_groups.append(G(version=v, group_id=g.group_id, topics=topics, error_code=ErrorCode.NONE))
        return OffsetFetchResponse(version=v, throttle_time_ms=0, groups=resp_groups)
    T = OffsetFetchResponse.OffsetFetchResponseTopic
    P = T.OffsetFetchResponsePartition
    # v0 and v1 have no "all partitions" form: a null topic list there is just an empty one.
    req_topics = req.topics if (req.topics is not None or v >= 2) else []
    by_topic = _fetch_group(groups, req.group_id, req_topics)
    topics = [
        T(version=v, name=name, partitions=[_partition(P, v, p, c) for p, c in parts])
        for name, parts in by_topic.items()
    ]
    return OffsetFetchResponse(version=v, throttle_time_ms=0, topics=topics, error_code=ErrorCode.NONE)


def _partition(cls: type, v: int, partition: int, committed: CommittedOffset | None) -> object:
    """One OffsetFetch partition entry (``cls`` differs between the v0-7 and v8+ layouts)."""
    if committed is None:
        return cls(version=v, partition_index=partition, committed_offset=-1, committed_leader_epoch=-1,
                   metadata="", error_code=ErrorCode.NONE)
    return cls(
        version=v,
        partition_index=partition,
        committed_offset=committed.offset,
        committed_leader_epoch=committed.leader_epoch,
        metadata=committed.metadata if committed.metadata is not None else "",
        error_code=ErrorCode.NONE,
    )


async def handle_list_groups(ctx: RequestContext, req: ListGroupsRequest) -> ListGroupsResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    if groups is None:
        return ListGroupsResponse(version=v, throttle_time_ms=0, error_code=ErrorCode.COORDINATOR_NOT_AVAILABLE,
                                  groups=[])
    states = {s.lower() for s in (req.states_filter or [])} if v >= 4 else set()
    types = {t.lower() for t in (req.types_filter or [])} if v >= 5 else set()
    listed = [
        ListGroupsResponse.ListedGroup(
            version=v, group_id=g.group_id, protocol_type=g.protocol_type,
            group_state=g.state.value, group_type=GROUP_TYPE_CLASSIC,
        )
        for g in groups.list_groups()
        if (not states or g.state.value.lower() in states) and (not types or GROUP_TYPE_CLASSIC in types)
    ]
    return ListGroupsResponse(version=v, throttle_time_ms=0, error_code=ErrorCode.NONE, groups=listed)


async def handle_describe_groups(ctx: RequestContext, req: DescribeGroupsRequest) -> DescribeGroupsResponse:
    v = ctx.api_version
    groups = _coordinator(ctx)
    G = DescribeGroupsResponse.DescribedGroup
    M = G.DescribedGroupMember
    described = []
    for group_id in req.groups:
        desc = groups.describe_group(group_id) if groups is not None else None
        if desc is None:
            if groups is None:
                error = ErrorCode.COORDINATOR_NOT_AVAILABLE
            else:
                error = ErrorCode.GROUP_ID_NOT_FOUND if v >= 6 else ErrorCode.NONE
            described.append(G(
                version=v, error_code=error, error_message=None, group_id=group_id,
                group_state=GroupState.DEAD.value, protocol_type="", protocol_data="", members=[],
            ))
            continue
        members = [
            M(version=v, member_id=m.member_id, group_instance_id=m.group_instance_id, client_id=m.client_id,
              client_host=m.client_host, member_metadata=m.metadata, member_assignment=m.assignment)
            for m in desc.members
        ]
        described.append(G(
            version=v, error_code=ErrorCode.NONE, error_message=None, group_id=desc.group_id,
            group_state=desc.state.value, protocol_type=desc.protocol_type, protocol_data=desc.protocol_name,
            members=members,
        ))
    return DescribeGroupsResponse(version=v, throttle_time_ms=0, groups=described)


HANDLERS: HandlerTable = {
    FindCoordinatorRequest.API_KEY: (handle_find_coordinator, 0, 6),
    JoinGroupRequest.API_KEY: (handle_join_group, 0, 9),
    SyncGroupRequest.API_KEY: (handle_sync_group, 0, 5),
    HeartbeatRequest.API_KEY: (handle_heartbeat, 0, 4),
    LeaveGroupRequest.API_KEY: (handle_leave_group, 0, 5),
    OffsetCommitRequest.API_KEY: (handle_offset_commit, 0, 9),
    OffsetFetchRequest.API_KEY: (handle_offset_fetch, 0, 9),
    ListGroupsRequest.API_KEY: (handle_list_groups, 0, 5),
    DescribeGroupsRequest.API_KEY: (handle_describe_groups, 0, 6),
}
