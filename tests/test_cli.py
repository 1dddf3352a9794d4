"""The console command: wiring, config layering, and the `make run` job end to end."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamrec.cli import build_parser, main
from streamrec.config import ConfigError, build, load_section
from streams.broker.config import BrokerConfig


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"broker", "replay", "tail", "demo"} <= set(sub.choices)


def test_toml_then_flags_layering(tmp_path: Path):
    cfg = tmp_path / "streamrec.toml"
    cfg.write_text('[broker]\nport = 19092\ndefault_partitions = 6\nlog = { fsync = "always" }\n')
    section = load_section(cfg, "broker")
    config = build(BrokerConfig, {"data_dir": tmp_path}, section, {"port": 29092, "host": None})
    assert config.port == 29092  # the flag wins over the file
    assert config.default_partitions == 6  # the file wins over the default
    assert config.log.fsync == "always"  # nested tables build nested dataclasses
    assert config.host == "127.0.0.1"  # a flag left unset (None) does not override


def test_config_errors_are_clear(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['prot'\]"):
        build(BrokerConfig, {"data_dir": tmp_path}, load_section(bad, "broker"))
    with pytest.raises(ConfigError, match="port=70000"):
        build(BrokerConfig, {"data_dir": tmp_path, "port": 70000})
    with pytest.raises(ConfigError, match="does not exist"):
        load_section(tmp_path / "missing.toml", "broker")
    (tmp_path / "broken.toml").write_text("[broker\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_section(tmp_path / "broken.toml", "broker")
    # a section no command reads is a typo, not silence; both spellings of one name are read
    (tmp_path / "typo.toml").write_text("[learnr]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \[learnr\]"):
        load_section(tmp_path / "typo.toml", "broker")
    (tmp_path / "spell.toml").write_text("[train_offline]\nlr = 0.1\n[build-samples]\n")
    assert load_section(tmp_path / "spell.toml", "train-offline") == {"lr": 0.1}
    assert load_section(tmp_path / "spell.toml", "build-samples") == {}
    (tmp_path / "both.toml").write_text("[train_offline]\n[train-offline]\n")
    with pytest.raises(ConfigError, match="both"):
        load_section(tmp_path / "both.toml", "train-offline")


def test_cli_reports_config_error_with_exit_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nlog = { fsync = \"sometimes\" }\n")
    assert main(["--config", str(bad), "demo", "--no-progress", "--data-dir", str(tmp_path / "d")]) == 2
    assert "fsync='sometimes'" in capsys.readouterr().err


def test_operational_errors_end_in_one_line_with_exit_1(tmp_path: Path, capsys):
    """A missing input, a malformed one, a truncated samples file: one line on stderr, status 1,
    no traceback (it is logged at DEBUG)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "click", "ts_ms": "x"}\n')
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x07" * 13)
    cases = [(["build-samples", str(tmp_path / "nothere.jsonl"), "--out", str(tmp_path / "o1")], "is not a file"),
             (["build-samples", str(bad), "--out", str(tmp_path / "o2")], "bad.jsonl:1"),
             (["train-offline", "--samples", str(garbage), "--out", str(tmp_path / "o3")], "")]
    for argv, text in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"streamrec {argv[0]}: error: ") and text in err[0], err


def test_demo_replays_the_bundled_slice_and_summarises(tmp_path: Path, capsys):
    # a config file's [broker] / [replay] tune those parts but do not move the demo's own port,
    # data or state (a state file under a regular file would fail the replay)
    cfg = tmp_path / "demo.toml"
    (tmp_path / "a-file").write_text("")
    cfg.write_text(f'[broker]\nport = 1\n[replay]\nstate_path = "{tmp_path / "a-file" / "state.json"}"\n')
    data = tmp_path / "data"
    assert main(["--config", str(cfg), "demo", "--stages", "replay", "--no-progress", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1:1 " not in out and (data / "replay-state.json").exists()
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+messages=(\d+)", out, re.M)}
    assert set(counts) >= {"impressions", "clicks", "dwell", "feedback"}
    assert counts["impressions"] > 10_000
    assert counts["clicks"] == counts["dwell"]  # by default a dwell event per click
    assert "undecodable=0" in out


@pytest.mark.timeout(900)  # --timeout-s bounds each stage; together they exceed the default 300 s
def test_demo_runs_the_whole_pipeline(tmp_path: Path, capsys):
    """make run's job end to end: replay -> joiner -> samples -> learner -> published versions, with
    the three running at once (``--pipelined``: joiner and learner start before the replay)."""
    argv = ["demo", "--no-progress", "--pipelined", "--data-dir", str(tmp_path), "--model", "wide_deep",
            "--objective", "bce", "--timeout-s", "400"]
    assert main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    n_imp = int(re.search(r"^\s+impressions\s+messages=(\d+)", out, re.M).group(1))
    joiner = re.search(r"impressions=(\d+) samples=(\d+) clicked=(\d+) valid_read=(\d+)", out)
    assert joiner and int(joiner.group(1)) == n_imp and int(joiner.group(2)) == n_imp  # one sample each
    assert "late=0 orphan=0 duplicate=0 dead_letter=0 pending=0" in out
    n_versions = int(re.search(r"model versions published: (\d+)", out).group(1))
    assert n_versions >= 1
    last = re.findall(r"^\s+\d+\s+(\d+)\s+(\d\.\d+)\s+(\d\.\d+)", out, re.M)[-1]   # samples, cum AUC, GAUC
    assert int(last[0]) == n_imp  # the newest version has trained on every sample
    assert 0.0 < float(last[1]) < 1.0  # a real cumulative AUC was measured
    report = (tmp_path / "streamrec-report.html").read_text()
    assert report.count("<svg") == report.count("</svg>") >= 4
    e2e = re.search(r"end to end: (\d+) events replayed -> (\d+) samples trained in ([\d.]+)s", out)
    assert e2e and int(e2e.group(2)) == n_imp and float(e2e.group(3)) > 0
    newest = int(re.findall(r"^\s+(\d+)\s+\d+\s+\d\.\d+", out, re.M)[-1])
    _score_with_the_published_version(tmp_path, newest_version=newest, n_impressions=n_imp)


def _score_with_the_published_version(data_dir: Path, newest_version: int, n_impressions: int) -> None:
    """The serving side of the same run: the demo's broker data reopened, ``streamrec score`` (a
    separate process) follows ``model-updates``, loads the newest version and scores a user of the
    slice with the joiner's feature store. First, the ``samples`` topic the whole slice went
    through holds exactly one sample per impression, each with a point-in-time snapshot."""
    import csv
    import gzip
    import json
    import subprocess
    import sys

    from streamrec.commands.demo import DEFAULT_SLICE
    from streams.broker import EmbeddedBroker

    with gzip.open(DEFAULT_SLICE, "rt") as f:
        rows = list(csv.DictReader(f))
    clicks: dict[int, list[int]] = {}
    for r in rows:
        if r["is_click"] == "1":
            clicks.setdefault(int(r["user_id"]), []).append(int(r["video_id"]))
    user = max(clicks, key=lambda u: len(clicks[u]))  # the user with the longest click history
    items = sorted({int(r["video_id"]) for r in rows[:5]})
    config = build(BrokerConfig, {"data_dir": data_dir / "broker", "port": 0})
    with EmbeddedBroker(config) as broker:
        _one_point_in_time_sample_per_impression(broker.bootstrap, n_impressions)
        done = subprocess.run(
            [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "score", "--bootstrap", broker.bootstrap,
             "--feature-store", str(data_dir / "joiner"), "--user-id", str(user),
             "--items", ",".join(map(str, items)), "--wait-s", "60"],
            capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["model"]["version"] == newest_version  # the newest published version, not an older one
    assert line["items"] == items and len(line["scores"]) == len(items)
    assert all(s is not None and 0.0 < s < 1.0 for s in line["scores"])


def test_tail_renders_samples_and_reports_malformed_ones():
    from types import SimpleNamespace

    from streamrec.commands.tail import renderer_for
    from streams import samples as sample_contract

    sample = sample_contract.Sample(
        impression_id=1, ts_ms=100, user_id=5, item_id=7, label_ts_ms=200, clicked=True, dwell_ms=9000,
        snapshot=sample_contract.Snapshot(click_items=(3,), click_cats=(1,), newest_ts_ms=50),
    )
    record = SimpleNamespace(topic="samples", partition=0, offset=4, key=b"5", headers=[], timestamp=0,
                             value=sample_contract.encode(sample))
    row = renderer_for("samples")(record)
    assert row["type"] == "sample" and row["clicked"] is True and row["dwell_ms"] == 9000
    assert row["snapshot"]["click_items"] == [3]
    record.value = record.value[:-3]
    row = renderer_for("samples")(record)
    assert "error" in row and "value_b64" in row


def test_tail_renders_the_joiners_late_orphan_and_dwell_outputs():
    """Every output topic of the joiner besides samples decodes to fields, not base64: the
    records are built by the joiner's own output_records."""
    from types import SimpleNamespace

    import numpy as np

    from streamrec.commands.tail import renderer_for
    from streams.contracts import Click, Feedback, FeedbackKind
    from streams.joiner.outputs import output_records
    from streams.joiner.pipeline import PipelineOutput
    from streams.joiner.records import LateEvent, OrphanEvent
    from streams.joiner.shared import CONTRIB, encode_message

    out = PipelineOutput(late=[LateEvent(Click(11, 500, 70, 5, 7), "after_emit")],
                         orphans=[OrphanEvent(Feedback(12, 600, 5, 8, FeedbackKind.LIKE, None), "no_impression_id")],
                         stats=[encode_message(2, 3, 5, np.array([(3, 7, 9000, 100)], dtype=CONTRIB))])
    rows = {}
    for i, (topic, key, value, headers) in enumerate(output_records(2, out)):
        record = SimpleNamespace(topic=topic, partition=2, offset=i, key=key, headers=headers or [],
                                 timestamp=0, value=value)
        rows[topic] = renderer_for(topic)(record)
    late, orphan, stats = rows["clicks.late"], rows["joiner.orphans"], rows["joiner.dwell"]
    assert (late["type"], late["event_id"], late["impression_id"], late["reason"]) == ("click", 11, 70, "after_emit")
    assert (orphan["type"], orphan["kind"], orphan["impression_id"], orphan["reason"], orphan["source.topic"]) == (
        "feedback", "like", None, "no_impression_id", "feedback")
    assert (stats["source"], stats["from_epoch"], stats["to_epoch"], stats["contributions"]) == (2, 3, 5, [[3, 7, 9000, 100]])
    bad = SimpleNamespace(topic="joiner.orphans", partition=0, offset=0, key=None, headers=[], timestamp=0,
                          value=b"\x00garbage")
    assert "error" in renderer_for("joiner.orphans")(bad) and "error" in renderer_for("joiner.dwell")(bad)
    null = SimpleNamespace(**{**vars(bad), "value": None})  # a tombstone
    assert renderer_for("joiner.dwell")(null)["error"] == "null value"


def _one_point_in_time_sample_per_impression(bootstrap: str, n_impressions: int) -> None:
    from streams.joiner.readback import PartitionReader
    from streams.samples import decode, snapshot_is_point_in_time

    reader = PartitionReader(bootstrap, ["samples"])  # each partition to its end, within a deadline
    try:
        values = [v for p in reader.partitions("samples") for v in reader.read_values("samples", p, 0)]
    finally:
        reader.close()
    samples = [decode(v) for v in values]
    assert len(samples) == len({s.impression_id for s in samples}) == n_impressions
    assert all(snapshot_is_point_in_time(s) for s in samples)


def test_demo_console_carries_its_summary_and_the_logs_go_to_a_file(tmp_path: Path):
    """As ``make run`` prints it (a process of its own): the summary lines, none of the broker's or
    the Kafka client's INFO lines (they go to DIR/demo.log)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "streamrec.cli", "demo", "--stages", "replay", "--no-progress",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert "undecodable=0" in console and f"== logs: {tmp_path / 'demo.log'}" in console
    assert " INFO " not in console and " ERROR " not in console, console
    log = (tmp_path / "demo.log").read_text()
    assert "INFO streams.broker.server broker listening" in log and "INFO streams.replay replay complete" in log
    assert "INFO kafka." not in log  # kafka-python's connection chatter is below WARNING


def test_tail_and_score_give_up_on_an_unreachable_server_within_their_limit(tmp_path: Path, capsys):
    """No bootstrap server answering: one line and status 1 after the command's own limit, not
    kafka-python's 30 s default."""
    import socket
    import time

    from featurestore import FeatureStoreConfig, RocksFeatureStore

    with socket.socket() as held:               # bound, not listening: connections are refused
        held.bind(("127.0.0.1", 0))
        bootstrap = f"127.0.0.1:{held.getsockname()[1]}"
        t0 = time.monotonic()
        assert main(["tail", "samples", "--bootstrap", bootstrap, "--connect-timeout-s", "1"]) == 1
        assert time.monotonic() - t0 < 10
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("streamrec tail: error: ") and bootstrap in err[0], err
        RocksFeatureStore(tmp_path / "fs", FeatureStoreConfig()).close()
        t0 = time.monotonic()
        assert main(["score", "--bootstrap", bootstrap, "--feature-store", str(tmp_path / "fs"), "--user-id", "1",
                     "--items", "1,2", "--wait-s", "1"]) == 1
        assert time.monotonic() - t0 < 10
        assert f"no bootstrap server at {bootstrap} answered within 1.0 s" in capsys.readouterr().err
