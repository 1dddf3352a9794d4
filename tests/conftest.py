"""Shared fixtures: a real embedded broker over TCP on an ephemeral port, data paths."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "kuairand-pure"


@pytest.fixture
def broker(tmp_path):
    """A started EmbeddedBroker on 127.0.0.1:<free port>, data under tmp_path; stopped afterwards."""
    from streams.broker import EmbeddedBroker
    from streams.broker.config import BrokerConfig

    with EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "broker", port=0)) as b:
        yield b
