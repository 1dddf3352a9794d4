"""Samples files: the ``samples`` topic's messages on disk, for training before or without Kafka.

Framing: the file is a plain concatenation of records, each::

    length u32 little-endian | the exact bytes of one ``samples`` topic message (streams.samples)

No file header, no trailer, no compression; an empty file holds zero samples. A file that ends in
the middle of a record is truncated (``SamplesFileError``), never read as a short sample. Because
the payload is the topic message byte for byte, ``streams.samples.decode_batch`` reads a batch
from a file exactly as from the topic.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "s.bin")
>>> write_samples(path, [b"\\x01" * 8, b"\\x02" * 16])
2
>>> [len(v) for v in read_samples(path)], [len(b) for b in read_sample_batches(path, batch_size=1)]
([8, 16], [1, 1])
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from streams import StreamsError

_LEN = struct.Struct("<I")
_MAX_RECORD = 2**32 - 1


class SamplesFileError(StreamsError):
    """A samples file is truncated or a record is too large to frame."""


def write_samples(path: str | Path, values: Iterable[bytes]) -> int:
    """Write ``values`` (sample messages) to ``path``, replacing it atomically; returns the count."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as fh:
        for v in values:
            if len(v) > _MAX_RECORD:
                raise SamplesFileError(f"record {n}: {len(v)} bytes does not fit a u32 length")
            fh.write(_LEN.pack(len(v)))
            fh.write(v)
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return n


def append_samples(fh, values: Iterable[bytes]) -> int:
    """Append framed ``values`` to an open binary file; returns the count."""
    n = 0
    for v in values:
        fh.write(_LEN.pack(len(v)))
        fh.write(v)
        n += 1
    return n


def iter_records(path: str | Path, start_offset_bytes: int = 0,
                 buffer_bytes: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
    """(record, byte offset just past it) for every record from ``start_offset_bytes``, which must be
    a record boundary (an offset this function returned earlier, or 0): resuming a reader is exact."""
    with open(path, "rb", buffering=buffer_bytes) as fh:
        fh.seek(start_offset_bytes)
        pos = start_offset_bytes
        while True:
            head = fh.read(4)
            if not head:
                return
            if len(head) < 4:
                raise SamplesFileError(f"{path}: truncated record header at byte {pos}")
            (n,) = _LEN.unpack(head)
            value = fh.read(n)
            if len(value) < n:
                raise SamplesFileError(f"{path}: truncated record at byte {pos}: needs {n} bytes, {len(value)} left")
            pos += 4 + n
            yield value, pos


def read_samples(path: str | Path, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Every record of the file, in order (read through a buffer of ``chunk_bytes``)."""
    for value, _end in iter_records(path, buffer_bytes=chunk_bytes):
        yield value


def count_samples(path: str | Path) -> int:
    """Number of records in a samples file (reads only the length words)."""
    n, pos, size = 0, 0, os.path.getsize(path)
    with open(path, "rb") as fh:
        while pos < size:
            fh.seek(pos)
            head = fh.read(4)
            if len(head) < 4:
                raise SamplesFileError(f"{path}: truncated record header at byte {pos}")
            pos += 4 + _LEN.unpack(head)[0]
            n += 1
    if pos != size:
        raise SamplesFileError(f"{path}: truncated record: the last one runs past the end of the file")
    return n


def read_sample_batches(path: str | Path, batch_size: int = 4096) -> Iterator[list[bytes]]:
    """The records in lists of up to ``batch_size`` (feed them to ``samples.decode_batch``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    batch: list[bytes] = []
    for v in read_samples(path):
        batch.append(v)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
