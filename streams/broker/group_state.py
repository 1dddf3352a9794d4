"""State of one classic consumer group: members, generation, selected protocol, pending replies.

Plain data plus small pure helpers; the state machine that moves it lives in ``groups.py``.
"""
from __future__ import annotations

import asyncio
import enum
from collections import Counter
from dataclasses import dataclass, field


class ErrorCode(enum.IntEnum):
    """The Kafka protocol error codes the group coordinator answers with."""

    NONE = 0
    UNKNOWN_TOPIC_OR_PARTITION = 3
    OFFSET_METADATA_TOO_LARGE = 12
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    ILLEGAL_GENERATION = 22
    INCONSISTENT_GROUP_PROTOCOL = 23
    INVALID_GROUP_ID = 24
    UNKNOWN_MEMBER_ID = 25
    INVALID_SESSION_TIMEOUT = 26
    REBALANCE_IN_PROGRESS = 27
    INVALID_REQUEST = 42
    GROUP_ID_NOT_FOUND = 69
    MEMBER_ID_REQUIRED = 79
    FENCED_INSTANCE_ID = 82


class GroupState(enum.Enum):
    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"
    DEAD = "Dead"


@dataclass(frozen=True)
class JoinedMember:
    """One entry of the member list the leader receives to compute the assignment."""

    member_id: str
    group_instance_id: str | None
    metadata: bytes


@dataclass(frozen=True)
class JoinResult:
    error: ErrorCode
    member_id: str = ""
    generation_id: int = -1
    protocol_type: str | None = None
    protocol_name: str | None = None
    leader_id: str = ""
    members: tuple[JoinedMember, ...] = ()  # non-empty only for the leader


@dataclass(frozen=True)
class SyncResult:
    error: ErrorCode
    protocol_type: str | None = None
    protocol_name: str | None = None
    assignment: bytes = b""


@dataclass(frozen=True)
class MemberDescription:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    metadata: bytes
    assignment: bytes


@dataclass(frozen=True)
class GroupDescription:
    group_id: str
    state: GroupState
    protocol_type: str
    protocol_name: str
    members: tuple[MemberDescription, ...]


@dataclass(frozen=True)
class GroupListing:
    group_id: str
    protocol_type: str
    state: GroupState


@dataclass
class Member:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocol_type: str
    protocols: list[tuple[str, bytes]]  # (name, metadata) in the member's order of preference
    last_heartbeat_ms: int
    assignment: bytes = b""
    join_waiter: asyncio.Future[JoinResult] | None = None
    sync_waiter: asyncio.Future[SyncResult] | None = None

    def protocol_names(self) -> list[str]:
        return [name for name, _ in self.protocols]

    def metadata_for(self, protocol_name: str | None) -> bytes:
        for name, metadata in self.protocols:
            if name == protocol_name:
                return metadata
        return b""

    def same_protocols(self, protocols: list[tuple[str, bytes]]) -> bool:
        return self.protocols == protocols


@dataclass
class Group:
    group_id: str
    state: GroupState = GroupState.EMPTY
    generation_id: int = 0
    protocol_type: str = ""
    protocol_name: str | None = None
    leader_id: str | None = None
    members: dict[str, Member] = field(default_factory=dict)
    # member ids handed out with MEMBER_ID_REQUIRED -> deadline (ms) to come back with them
    pending_member_ids: dict[str, int] = field(default_factory=dict)
    static_members: dict[str, str] = field(default_factory=dict)  # group_instance_id -> member_id
    rebalance_deadline_ms: int = 0  # PreparingRebalance: when non-rejoined members are dropped
    initial_delay_until_ms: int = 0  # PreparingRebalance from Empty: earliest completion

    def is_empty(self) -> bool:
        return not self.members and not self.pending_member_ids

    def supported_protocols(self) -> set[str]:
        """Protocol names every current member supports."""
        names: set[str] | None = None
        for member in self.members.values():
            mine = set(member.protocol_names())
            names = mine if names is None else names & mine
        return names or set()

    def all_members_joined(self) -> bool:
        return not self.pending_member_ids and all(
            m.join_waiter is not None for m in self.members.values()
        )

    def max_rebalance_timeout_ms(self) -> int:
        return max((m.rebalance_timeout_ms for m in self.members.values()), default=0)


def select_protocol(members: list[Member]) -> str | None:
    """The protocol every member supports that most members rank first among those candidates.

    Each member votes for its most preferred candidate; ties go to the candidate the earliest
    member prefers, so the choice is deterministic.
    """
    if not members:
        return None
    candidates = set(members[0].protocol_names())
    for member in members[1:]:
        candidates &= set(member.protocol_names())
    if not candidates:
        return None
    votes: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for i, member in enumerate(members):
        for name in member.protocol_names():
            if name in candidates:
                votes[name] += 1
                first_seen.setdefault(name, i)
                break
    return max(votes, key=lambda name: (votes[name], -first_seen[name]))
