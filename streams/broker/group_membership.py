"""Membership state machine of classic consumer groups: JoinGroup, SyncGroup, Heartbeat, LeaveGroup.

Group lifecycle::

    Empty --join--> PreparingRebalance --all joined / rebalance timeout--> CompletingRebalance
    CompletingRebalance --leader SyncGroup--> Stable
    Stable / CompletingRebalance --join, leave, session expiry--> PreparingRebalance
    PreparingRebalance --no member left--> Empty

Joins wait on futures that the rebalance completes; followers' SyncGroup waits for the leader's.
Time only comes from the injected ``now_ms``; :meth:`GroupMembership.tick` applies deadlines.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable

from streams.broker.config import GroupConfig
from streams.broker.group_state import (
    ErrorCode,
    Group,
    GroupState,
    JoinedMember,
    JoinResult,
    Member,
    SyncResult,
    select_protocol,
)

logger = logging.getLogger(__name__)


class GroupMembership:
    """Members, generations and rebalances of every group (no sockets, no disk)."""

    def __init__(self, config: GroupConfig, now_ms: Callable[[], int]) -> None:
        self._config = config
        self._now_ms = now_ms
        self._groups: dict[str, Group] = {}

    def fail_all_waiters(self, error: ErrorCode) -> None:
        """Answer every parked JoinGroup/SyncGroup with ``error`` (broker shutting down)."""
        for group in self._groups.values():
            for member in group.members.values():
                self._reply_join(member, JoinResult(error, member.member_id))
                self._reply_sync(member, SyncResult(error))

    def tick(self) -> None:
        """Expire silent members and finish rebalances whose deadline passed (uses ``now_ms``)."""
        now = self._now_ms()
        for group in list(self._groups.values()):
            for member_id, deadline in list(group.pending_member_ids.items()):
                if now >= deadline:
                    del group.pending_member_ids[member_id]
                    logger.info("pending member expired group=%s member=%s", group.group_id, member_id)
            for member in list(group.members.values()):
                waiting = member.join_waiter is not None or member.sync_waiter is not None
                if not waiting and now - member.last_heartbeat_ms >= member.session_timeout_ms:
                    logger.info(
                        "member expired group=%s member=%s session_timeout_ms=%d",
                        group.group_id, member.member_id, member.session_timeout_ms,
                    )
                    self._remove_member(group, member, ErrorCode.UNKNOWN_MEMBER_ID)
            if group.state is GroupState.PREPARING_REBALANCE:
                if now >= group.rebalance_deadline_ms:
                    self._complete_join(group)
                else:
                    self._maybe_complete_join(group)
            if group.state is GroupState.EMPTY and group.is_empty() and not self._retains(group.group_id):
                del self._groups[group.group_id]
                logger.info("group removed group=%s generation=%d", group.group_id, group.generation_id)

    def _retains(self, group_id: str) -> bool:
        """Whether an empty group must be kept (it has committed offsets); overridden by the coordinator."""
        return False

    # ------------------------------------------------------------------ JoinGroup
    async def join_group(
        self,
        group_id: str,
        member_id: str,
        group_instance_id: str | None,
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
        protocol_type: str,
        protocols: list[tuple[str, bytes]],
        client_id: str = "",
        client_host: str = "",
        require_known_member_id: bool = False,
    ) -> JoinResult:
        """Join (or rejoin) ``group_id``; returns once the rebalance completes or on error."""
        if not group_id:
            return JoinResult(ErrorCode.INVALID_GROUP_ID, member_id)
        cfg = self._config
        if not cfg.min_session_timeout_ms <= session_timeout_ms <= cfg.max_session_timeout_ms:
            return JoinResult(ErrorCode.INVALID_SESSION_TIMEOUT, member_id)
        if rebalance_timeout_ms < 0:
            rebalance_timeout_ms = session_timeout_ms
        if not protocols or not protocol_type:
            return JoinResult(ErrorCode.INCONSISTENT_GROUP_PROTOCOL, member_id)
        group = self._groups.setdefault(group_id, Group(group_id))
        if group.members:
            names = {name for name, _ in protocols}
            if protocol_type != group.protocol_type or not names & group.supported_protocols():
                return JoinResult(ErrorCode.INCONSISTENT_GROUP_PROTOCOL, member_id)
        now = self._now_ms()

        if not member_id:
            if group_instance_id is not None and group_instance_id in group.static_members:
                old = group.members.get(group.static_members[group_instance_id])
                if old is not None:
                    logger.info(
                        "static member replaced group=%s instance=%s old_member=%s",
                        group_id, group_instance_id, old.member_id,
                    )
                    self._remove_member(group, old, ErrorCode.FENCED_INSTANCE_ID, rebalance=False)
            new_id = f"{group_instance_id or client_id or 'member'}-{uuid.uuid4()}"
            if require_known_member_id and group_instance_id is None:
                group.pending_member_ids[new_id] = now + session_timeout_ms
                return JoinResult(ErrorCode.MEMBER_ID_REQUIRED, new_id)
            member_id = new_id
        elif member_id in group.pending_member_ids:
            del group.pending_member_ids[member_id]
        else:
            member = group.members.get(member_id)
            if member is None:
                return JoinResult(ErrorCode.UNKNOWN_MEMBER_ID, member_id)
            if group_instance_id is not None and group.static_members.get(group_instance_id) != member_id:
                return JoinResult(ErrorCode.FENCED_INSTANCE_ID, member_id)
            return await self._rejoin(group, member, protocols, session_timeout_ms, rebalance_timeout_ms)

        member = Member(
            member_id=member_id,
            group_instance_id=group_instance_id,
            client_id=client_id,
            client_host=client_host,
            session_timeout_ms=session_timeout_ms,
            rebalance_timeout_ms=rebalance_timeout_ms,
            protocol_type=protocol_type,
            protocols=list(protocols),
            last_heartbeat_ms=now,
        )
        if not group.members:
            group.protocol_type = protocol_type
        group.members[member_id] = member
        if group_instance_id is not None:
            group.static_members[group_instance_id] = member_id
        logger.info(
            "member joined group=%s member=%s instance=%s n_members=%d",
            group_id, member_id, group_instance_id, len(group.members),
        )
        return await self._await_join(group, member)

    async def _rejoin(
        self,
        group: Group,
        member: Member,
        protocols: list[tuple[str, bytes]],
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
    ) -> JoinResult:
        member.session_timeout_ms = session_timeout_ms
        member.rebalance_timeout_ms = rebalance_timeout_ms
        member.last_heartbeat_ms = self._now_ms()
        unchanged = member.same_protocols(protocols)
        if group.state is GroupState.COMPLETING_REBALANCE and unchanged:
            return self._join_result(group, member)  # it missed the response; hand it again
        if group.state is GroupState.STABLE and unchanged and member.member_id != group.leader_id:
            return self._join_result(group, member)
        member.protocols = list(protocols)
        return await self._await_join(group, member)

    async def _await_join(self, group: Group, member: Member) -> JoinResult:
        loop = asyncio.get_running_loop()
        self._reply_join(member, JoinResult(ErrorCode.REBALANCE_IN_PROGRESS, member.member_id))
        waiter: asyncio.Future[JoinResult] = loop.create_future()
        member.join_waiter = waiter
        if group.state is not GroupState.PREPARING_REBALANCE:
            self._prepare_rebalance(group, f"member {member.member_id} joining")
        self._maybe_complete_join(group)
        return await waiter

    def _join_result(self, group: Group, member: Member) -> JoinResult:
        members: tuple[JoinedMember, ...] = ()
        if member.member_id == group.leader_id:
            members = tuple(
                JoinedMember(m.member_id, m.group_instance_id, m.metadata_for(group.protocol_name))
                for m in group.members.values()
            )
        return JoinResult(
            ErrorCode.NONE,
            member_id=member.member_id,
            generation_id=group.generation_id,
            protocol_type=group.protocol_type,
            protocol_name=group.protocol_name,
            leader_id=group.leader_id or "",
            members=members,
        )

    # ------------------------------------------------------------------ rebalance machinery
    def _prepare_rebalance(self, group: Group, reason: str) -> None:
        now = self._now_ms()
        was = group.state
        for member in group.members.values():
            self._reply_sync(member, SyncResult(ErrorCode.REBALANCE_IN_PROGRESS))
        group.state = GroupState.PREPARING_REBALANCE
        group.rebalance_deadline_ms = now + group.max_rebalance_timeout_ms()
        if was is GroupState.EMPTY:
            group.initial_delay_until_ms = now + self._config.initial_rebalance_delay_ms
        else:
            group.initial_delay_until_ms = now
        logger.info(
            "rebalance started group=%s from=%s generation=%d reason=%r",
            group.group_id, was.value, group.generation_id, reason,
        )

    def _maybe_complete_join(self, group: Group) -> None:
        if group.state is not GroupState.PREPARING_REBALANCE:
            return
        if not group.members and not group.pending_member_ids:
            self._complete_join(group)
        elif group.all_members_joined() and self._now_ms() >= group.initial_delay_until_ms:
            self._complete_join(group)

    def _complete_join(self, group: Group) -> None:
        for member in [m for m in group.members.values() if m.join_waiter is None]:
            logger.info("member dropped group=%s member=%s reason=no-rejoin", group.group_id, member.member_id)
            self._remove_member(group, member, ErrorCode.UNKNOWN_MEMBER_ID, rebalance=False)
        group.pending_member_ids.clear()
        group.generation_id += 1
        if not group.members:
            group.state = GroupState.EMPTY
            group.protocol_name = None
            group.leader_id = None
            logger.info("group empty group=%s generation=%d", group.group_id, group.generation_id)
            return
        members = list(group.members.values())
        group.protocol_name = select_protocol(members)
        if group.leader_id not in group.members:
            group.leader_id = members[0].member_id
        group.state = GroupState.COMPLETING_REBALANCE
        now = self._now_ms()
        for member in members:
            member.assignment = b""
            member.last_heartbeat_ms = now
            self._reply_join(member, self._join_result(group, member))
        logger.info(
            "rebalance joined group=%s generation=%d protocol=%s leader=%s n_members=%d",
            group.group_id, group.generation_id, group.protocol_name, group.leader_id, len(members),
        )

    def _remove_member(self, group: Group, member: Member, error: ErrorCode, rebalance: bool = True) -> None:
        group.members.pop(member.member_id, None)
        if member.group_instance_id is not None:
            if group.static_members.get(member.group_instance_id) == member.member_id:
                del group.static_members[member.group_instance_id]
        self._reply_join(member, JoinResult(error, member.member_id))
        self._reply_sync(member, SyncResult(error))
        if not rebalance:
            return
        if group.state in (GroupState.STABLE, GroupState.COMPLETING_REBALANCE):
            self._prepare_rebalance(group, f"member {member.member_id} left")
        self._maybe_complete_join(group)

    @staticmethod
    def _reply_join(member: Member, result: JoinResult) -> None:
        waiter, member.join_waiter = member.join_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    @staticmethod
    def _reply_sync(member: Member, result: SyncResult) -> None:
        waiter, member.sync_waiter = member.sync_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def lookup(
        self, group_id: str, member_id: str, group_instance_id: str | None
    ) -> tuple[Group | None, Member | None, ErrorCode]:
        group = self._groups.get(group_id)
        if group is None:
            return None, None, ErrorCode.UNKNOWN_MEMBER_ID
        if group_instance_id is not None:
            known = group.static_members.get(group_instance_id)
            if known is not None and known != member_id:
                return group, None, ErrorCode.FENCED_INSTANCE_ID
        member = group.members.get(member_id)
        if member is None:
            return group, None, ErrorCode.UNKNOWN_MEMBER_ID
        return group, member, ErrorCode.NONE

    # ------------------------------------------------------------------ SyncGroup / Heartbeat / Leave
    async def sync_group(
        self,
        group_id: str,
        generation_id: int,
        member_id: str,
        group_instance_id: str | None = None,
        assignments: dict[str, bytes] | None = None,
        protocol_type: str | None = None,
        protocol_name: str | None = None,
    ) -> SyncResult:
        """Followers wait for the leader; the leader's assignments are relayed to every member."""
        group, member, error = self.lookup(group_id, member_id, group_instance_id)
        if group is None or member is None:
            return SyncResult(error)
        if generation_id != group.generation_id:
            return SyncResult(ErrorCode.ILLEGAL_GENERATION)
        if (protocol_type is not None and protocol_type != group.protocol_type) or (
            protocol_name is not None and protocol_name != group.protocol_name
        ):
            return SyncResult(ErrorCode.INCONSISTENT_GROUP_PROTOCOL)
        member.last_heartbeat_ms = self._now_ms()
        if group.state is GroupState.PREPARING_REBALANCE:
            return SyncResult(ErrorCode.REBALANCE_IN_PROGRESS)
        if group.state is GroupState.STABLE:
            return self._sync_result(group, member)
        # CompletingRebalance
        waiter: asyncio.Future[SyncResult] = asyncio.get_running_loop().create_future()
        self._reply_sync(member, SyncResult(ErrorCode.REBALANCE_IN_PROGRESS))
        member.sync_waiter = waiter
        if member_id == group.leader_id:
            given = assignments or {}
            for m in group.members.values():
                m.assignment = given.get(m.member_id, b"")
            group.state = GroupState.STABLE
            logger.info(
                "group stable group=%s generation=%d n_members=%d",
                group.group_id, group.generation_id, len(group.members),
            )
            now = self._now_ms()
            for m in group.members.values():
                m.last_heartbeat_ms = now
                self._reply_sync(m, self._sync_result(group, m))
        return await waiter

    @staticmethod
    def _sync_result(group: Group, member: Member) -> SyncResult:
        return SyncResult(ErrorCode.NONE, group.protocol_type, group.protocol_name, member.assignment)

    async def heartbeat(
        self, group_id: str, generation_id: int, member_id: str, group_instance_id: str | None = None
    ) -> ErrorCode:
        group, member, error = self.lookup(group_id, member_id, group_instance_id)
        if group is None or member is None:
            return error
        member.last_heartbeat_ms = self._now_ms()
        if group.state is GroupState.PREPARING_REBALANCE:
            return ErrorCode.REBALANCE_IN_PROGRESS
        if generation_id != group.generation_id:
            return ErrorCode.ILLEGAL_GENERATION
        return ErrorCode.NONE

    async def leave_group(
        self, group_id: str, members: list[tuple[str, str | None]]
    ) -> list[tuple[str, str | None, ErrorCode]]:
        """Remove each (member_id, group_instance_id); a static member may leave by instance id alone."""
        group = self._groups.get(group_id)
        results: list[tuple[str, str | None, ErrorCode]] = []
        for member_id, instance_id in members:
            if group is None:
                results.append((member_id, instance_id, ErrorCode.UNKNOWN_MEMBER_ID))
                continue
            if not member_id and instance_id is not None:
                member_id = group.static_members.get(instance_id, "")
            if member_id in group.pending_member_ids:
                del group.pending_member_ids[member_id]
                self._maybe_complete_join(group)
                results.append((member_id, instance_id, ErrorCode.NONE))
                continue
            _, member, error = self.lookup(group_id, member_id, instance_id)
            if member is None:
                results.append((member_id, instance_id, error))
                continue
            logger.info("member left group=%s member=%s", group_id, member_id)
            self._remove_member(group, member, ErrorCode.UNKNOWN_MEMBER_ID)
            results.append((member_id, instance_id, ErrorCode.NONE))
        return results

