"""Consumer-group coordinator of the embedded broker (Kafka's classic group protocol).

Protocol independent: ``handlers_group.py`` translates wire messages into these calls. The
membership state machine (JoinGroup, SyncGroup, Heartbeat, LeaveGroup, expiry) is inherited from
``group_membership.GroupMembership``; this module adds the lifecycle, committed offsets (durable in
``offsets_store``) and the admin views. All timing goes through the injected ``now_ms``; a
background task calls :meth:`GroupCoordinator.tick`, and tests call it directly after moving a
fake clock.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable

from streams.broker.config import GroupConfig
from streams.broker.group_membership import GroupMembership
from streams.broker.group_state import (
    ErrorCode,
    Group,
    GroupDescription,
    GroupListing,
    GroupState,
    MemberDescription,
)
from streams.broker.offsets_store import CommittedOffset, GroupOffsets, OffsetsStore, TopicPartition

logger = logging.getLogger(__name__)

MAX_METADATA_CHARS = 4096  # Kafka's offset.metadata.max.bytes default


class GroupCoordinator(GroupMembership):
    """Membership, rebalances and committed offsets of every group on this single-node broker."""

    def __init__(
        self,
        config: GroupConfig,
        state_dir: Path,
        now_ms: Callable[[], int],
        tick_interval_ms: int = 50,
    ) -> None:
        if tick_interval_ms < 1:
            raise ValueError(f"tick_interval_ms={tick_interval_ms!r} < 1")
        super().__init__(config, now_ms)
        self._tick_interval_ms = tick_interval_ms
        self._store = OffsetsStore(Path(state_dir))
        self._offsets: dict[str, GroupOffsets] = {}
        self._ticker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load (and compact) the committed offsets, then start expiring silent members."""
        self._offsets = self._store.open(self._now_ms(), self._config.offsets_retention_ms)
        for group_id in self._offsets:
            self._groups.setdefault(group_id, Group(group_id))
        self._ticker = asyncio.create_task(self._tick_forever(), name="group-coordinator-tick")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        self.fail_all_waiters(ErrorCode.COORDINATOR_NOT_AVAILABLE)
        self._store.close()

    def _retains(self, group_id: str) -> bool:
        return group_id in self._offsets

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval_ms / 1000)
            try:
                self.tick()
            except Exception:  # a bug here must not silently stop expiry forever
                logger.exception("group tick failed")

    # ------------------------------------------------------------------ offsets
    async def commit_offsets(
        self,
        group_id: str,
        generation_id: int,
        member_id: str,
        group_instance_id: str | None,
        offsets: dict[TopicPartition, CommittedOffset],
    ) -> dict[TopicPartition, ErrorCode]:
        """Store offsets durably; simple commits (generation < 0) are allowed while no member is in."""
        if not group_id:
            return {tp: ErrorCode.INVALID_GROUP_ID for tp in offsets}
        group = self._groups.get(group_id)
        error = ErrorCode.NONE
        if generation_id < 0 and (group is None or group.state is GroupState.EMPTY):
            pass
        elif group is None:
            error = ErrorCode.ILLEGAL_GENERATION  # a member of a generation this broker never saw
        else:
            _, member, error = self.lookup(group_id, member_id, group_instance_id)
            if member is not None:
                if generation_id != group.generation_id:
                    error = ErrorCode.ILLEGAL_GENERATION
                elif group.state is GroupState.COMPLETING_REBALANCE:
                    error = ErrorCode.REBALANCE_IN_PROGRESS
                else:
                    member.last_heartbeat_ms = self._now_ms()
        if error is not ErrorCode.NONE:
            return {tp: error for tp in offsets}
        now = self._now_ms()
        results: dict[TopicPartition, ErrorCode] = {}
        accepted: GroupOffsets = {}
        for tp, committed in offsets.items():
            if committed.metadata is not None and len(committed.metadata) > MAX_METADATA_CHARS:
                results[tp] = ErrorCode.OFFSET_METADATA_TOO_LARGE
                continue
            accepted[tp] = CommittedOffset(committed.offset, committed.leader_epoch, committed.metadata, now)
            results[tp] = ErrorCode.NONE
        if accepted:
            self._store.append(group_id, accepted)
            self._offsets.setdefault(group_id, {}).update(accepted)
            self._groups.setdefault(group_id, Group(group_id))
            await self._store.sync()
        return results

    def fetch_offsets(
        self, group_id: str, partitions: list[TopicPartition] | None
    ) -> dict[TopicPartition, CommittedOffset | None]:
        """Committed offsets of ``partitions`` (None: every committed one); None where none is."""
        committed = self._offsets.get(group_id, {})
        if partitions is None:
            return dict(committed)
        return {tp: committed.get(tp) for tp in partitions}

    # ------------------------------------------------------------------ admin
    def list_groups(self) -> list[GroupListing]:
        return [
            GroupListing(g.group_id, g.protocol_type, g.state)
            for g in self._groups.values()
            if g.members or g.group_id in self._offsets
        ]

    def describe_group(self, group_id: str) -> GroupDescription | None:
        group = self._groups.get(group_id)
        if group is None:
            return None
        stable = group.state is GroupState.STABLE
        members = tuple(
            MemberDescription(
                m.member_id,
                m.group_instance_id,
                m.client_id,
                m.client_host,
                m.metadata_for(group.protocol_name) if stable else b"",
                m.assignment if stable else b"",
            )
            for m in group.members.values()
        )
        return GroupDescription(
            group.group_id,
            group.state,
            group.protocol_type,
            group.protocol_name or "" if stable else "",
            members,
        )
