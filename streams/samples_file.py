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


def read_samples(path: str | Path, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Every record of the file, in order."""
    with open(path, "rb") as fh:
        buf = b""
        pos = 0
        while True:
            chunk = fh.read(chunk_bytes)
            if chunk:
                buf = buf[pos:] + chunk
                pos = 0
            elif pos >= len(buf):
                return
            while pos + 4 <= len(buf):
                (n,) = _LEN.unpack_from(buf, pos)
                if pos + 4 + n > len(buf):
                    break
                yield buf[pos + 4:pos + 4 + n]
                pos += 4 + n
            if not chunk:
                raise SamplesFileError(f"{path}: truncated record at the end ({len(buf) - pos} bytes left)")


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
