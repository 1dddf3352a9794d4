"""JoinerPipeline on rocksdict: a pipeline closed and reopened from its store at any commit continues
exactly as one that never stopped; uncommitted work is dropped and redone; counters persist."""
from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import streams.joiner.worker as worker_module
from streams.contracts import Impression
from streams.joiner.pipeline import JoinerPipeline, PipelineConfig, open_pipeline
from streams.replay import iter_events

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"


@pytest.fixture(scope="module")
def events():
    evs = list(iter_events([SLICE]))
    return [e for e in evs if e.ts_ms < evs[0].ts_ms + 2 * 3_600_000]


def run_all(pipe: JoinerPipeline, events, batch: int) -> list[bytes]:
    out = []
    for i in range(0, len(events), batch):
        out += pipe.process(events[i:i + batch]).samples
        pipe.commit({"all": i + batch})
    out += pipe.finish().samples
    pipe.commit()
    return out


def test_reopen_at_every_commit_point_gives_the_same_samples(events, tmp_path):
    cfg = PipelineConfig()
    ref_pipe = open_pipeline(tmp_path / "ref", 0, cfg)
    ref = run_all(ref_pipe, events, 500)
    ref_pipe.close()
    assert len(ref) == sum(type(e) is Impression for e in events)

    path = tmp_path / "restarted"
    got, pos, batch = [], 0, 500
    pipe = open_pipeline(path, 0, cfg)
    while pos < len(events):
        got += pipe.process(events[pos:pos + batch]).samples
        pipe.commit({"all": pos + batch})
        # uncommitted work is lost with the process: redone from the committed offset
        pipe.process(events[pos + batch:pos + 2 * batch])
        pipe.close()
        pipe = open_pipeline(path, 0, cfg)
        pos = pipe.committed_offset("all")
        batch = 137 if batch == 500 else 500
    got += pipe.finish().samples
    pipe.commit()
    assert got == ref
    assert pipe.counters()["samples"] == len(ref)
    pipe.close()


def test_samples_do_not_depend_on_batch_size(events, tmp_path):
    cfg = PipelineConfig()
    a = run_all(open_pipeline(tmp_path / "a", 0, cfg), events, 1)
    b = run_all(open_pipeline(tmp_path / "b", 0, cfg), events, 10_000)
    assert a == b


def test_dead_letters_are_counted_and_persisted(tmp_path):
    cfg = PipelineConfig()
    pipe = open_pipeline(tmp_path / "s", 3, cfg)
    pipe.count_dead_letter("clicks", "bad_magic", 2)
    pipe.commit({"clicks": 5})
    pipe.close()
    pipe = open_pipeline(tmp_path / "s", 3, cfg)
    c = pipe.counters()
    assert (c["dead_letter"], c["dead_letter.clicks.bad_magic"]) == (2, 2)
    assert pipe.committed_offset("clicks") == 5 and pipe.committed_offset("dwell") is None
    pipe.close()


def test_config_rejects_short_store_sequences():
    from featurestore import FeatureStoreConfig, SequenceConfig
    from streams.joiner import JoinerConfig

    with pytest.raises(ValueError, match="seq_len"):
        PipelineConfig(joiner=JoinerConfig(seq_len=200), store=FeatureStoreConfig(sequences=SequenceConfig(max_len=100)))
    with pytest.raises(ValueError, match="stats_epoch_ms"):
        PipelineConfig(stats_epoch_ms=0)


def test_doctests():
    import streams.samples_file as samples_file_module
    for module in (worker_module, samples_file_module):
        assert doctest.testmod(module).failed == 0
