"""One user's rows inside an open transaction: :class:`UserRows`, from :meth:`StoreBatch.user_rows`.

The joiner reads a user's sequences and then stages the sample's own entries, once per sample, and
a user often has several samples in one transaction. Going through the transaction for each read
and each update costs a key lookup every time; a :class:`UserRows` holds the user's current
objects instead (the committed values with this transaction's updates) and stages a row on its
first change through the transaction's read-modify-write path, exactly as
:meth:`StoreBatch.add_sequence_event` and :meth:`StoreBatch.add_user_event` would: the same checks,
the same objects, the same bytes at commit.

>>> import tempfile
>>> from featurestore.store import RocksFeatureStore
>>> tmp = tempfile.TemporaryDirectory()
>>> store = RocksFeatureStore(tmp.name)
>>> with store.transaction() as tx:
...     rows = tx.user_rows([7])[7]
...     rows.sequences()[SequenceKind.CLICK - 1] is None
...     rows.add_sequence_event(SequenceKind.CLICK, item_id=3, category=1, ts_ms=100)
...     rows.add_user_event(CounterKind.CLICK, ts_ms=100)
...     rows.sequences()[SequenceKind.CLICK - 1].entries_before(101, n=5)
True
([100], [3], [1])
>>> store.user_features(7).click.item_ids.tolist(), store.user_features(7).clicks_in_window
([3], 1)
>>> store.close(); tmp.cleanup()
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from featurestore.counters import WindowedCounter
from featurestore.keys import I32_MAX, U32_MAX, U64_MAX, CounterKind, SequenceKind
from featurestore.sequences import UserSequence

if TYPE_CHECKING:
    from featurestore.batch import StoreBatch

#: rows 0-3: the sequences in SequenceKind order; rows 4-5: the counters in CounterKind order
N_SEQUENCES = len(SequenceKind)
_COUNTER_ROW = {c: N_SEQUENCES + i for i, c in enumerate(CounterKind)}
_encode_sequence, _encode_counter = UserSequence.to_bytes, WindowedCounter.to_bytes


class UserRows:
    """A user's four sequences and two counters in one transaction (see the module docstring).

    While a ``UserRows`` is in use, change the user's rows only through it: it keeps the objects
    it handed out, so an update made directly on the transaction could be missed by
    :meth:`sequences`.
    """

    __slots__ = ("user_id", "_tx", "_keys", "_rows", "_staged")

    def __init__(self, tx: StoreBatch, user_id: int, row_keys: list[bytes],
                 sequences: list[UserSequence | None]) -> None:
        self.user_id = user_id
        self._tx = tx
        self._keys = row_keys  # keys.user_row_keys(user_id)
        self._rows: list = [*sequences, *[None] * len(CounterKind)]  # counters are decoded on their first change
        self._staged = 0  # bit i: row i is staged in the transaction

    def sequences(self) -> list[UserSequence | None]:
        """The four sequences in :class:`SequenceKind` order with this transaction's updates (None:
        none stored or staged yet). Read them; change them through :meth:`add_sequence_event`."""
        return self._rows[:N_SEQUENCES]

    def add_sequence_event(self, kind: SequenceKind, item_id: int, category: int, ts_ms: int) -> None:
        """:meth:`StoreBatch.add_sequence_event` for this user (the same checks)."""
        tx = self._tx
        if not 1 <= kind <= N_SEQUENCES:  # row kind - 1: another kind would write another row
            raise ValueError(f"kind={kind!r} is not a SequenceKind")
        if not -1 <= category <= I32_MAX or type(item_id) is not int or not 0 <= item_id <= U64_MAX:
            tx._check_entry(item_id, category, ts_ms)  # raises with the transaction's message
        self._saw(tx, ts_ms)
        self._for_update(tx, kind - 1, tx._decode_sequence, tx._new_sequence, _encode_sequence).add(
            item_id, category, ts_ms)

    def add_user_event(self, counter: CounterKind, ts_ms: int, n: int = 1) -> None:
        """:meth:`StoreBatch.add_user_event` for this user (the same checks)."""
        tx = self._tx
        if not 0 <= n <= U32_MAX:
            tx._check_count(n)  # raises with the transaction's message
        self._saw(tx, ts_ms)
        self._for_update(tx, _COUNTER_ROW[counter], tx._decode_counter, tx._new_counter, _encode_counter).add(
            ts_ms, n)

    def _for_update(self, tx, i: int, decode, new, encode):
        """Row ``i``, staged in ``tx`` on its first change (the transaction's read-modify-write)."""
        if self._staged >> i & 1:
            tx.n_updates += 1
            return self._rows[i]
        row = self._rows[i] = tx._for_update(self._keys[i], decode, new, encode)
        self._staged |= 1 << i
        return row

    @staticmethod
    def _saw(tx: StoreBatch, ts_ms: int) -> None:
        # StoreBatch._check_time, inlined: the joiner stages two to four entries per sample
        if ts_ms < 0:
            raise ValueError(f"ts_ms={ts_ms!r} < 0")
        if ts_ms > tx._max_event_ts_ms:
            tx._max_event_ts_ms = ts_ms
        if tx.state != tx.OPEN:
            tx._check_open()
