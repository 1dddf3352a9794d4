"""``streamrec broker`` flags and config-file layering."""
from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.cli import build_parser
from streamrec.commands.broker import build_config
from streamrec.config import ConfigError


def test_defaults():
    config = build_config(build_parser().parse_args(["broker"]))
    assert (config.host, config.port, config.default_partitions, config.log.fsync) == ("127.0.0.1", 9092, 3, "interval")
    assert config.data_dir == Path("./data/broker")


def test_flags_override_the_config_file(tmp_path):
    toml = tmp_path / "streamrec.toml"
    toml.write_text('[broker]\nport = 19092\ndefault_partitions = 5\ndata_dir = "/srv/b"\n'
                    '[broker.log]\nfsync = "never"\nfsync_interval_ms = 250\n')
    from_file = build_config(build_parser().parse_args(["--config", str(toml), "broker"]))
    assert (from_file.port, from_file.default_partitions, from_file.data_dir) == (19092, 5, Path("/srv/b"))
    assert (from_file.log.fsync, from_file.log.fsync_interval_ms) == ("never", 250)
    flagged = build_config(build_parser().parse_args(
        ["--config", str(toml), "broker", "--port", "0", "--partitions", "2", "--fsync", "always",
         "--data-dir", str(tmp_path / "d"), "--host", "0.0.0.0"]))
    assert (flagged.port, flagged.default_partitions, flagged.host) == (0, 2, "0.0.0.0")
    assert (flagged.log.fsync, flagged.log.fsync_interval_ms) == ("always", 250)  # the rest of [broker.log] kept
    assert flagged.data_dir == tmp_path / "d"


def test_bad_values_are_reported():
    with pytest.raises(ConfigError, match="default_partitions=0"):
        build_config(build_parser().parse_args(["broker", "--partitions", "0"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["broker", "--fsync", "sometimes"])
