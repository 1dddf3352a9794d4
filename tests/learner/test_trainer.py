"""Prequential trainer: score-before-train, determinism, metrics against a direct computation."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from learner.config import CLSDConfig
from learner.data import DataConfig, SampleLoader
from learner.metrics import auc, gauc, logloss
from learner.trainer import OBJECTIVES, Trainer, TrainerConfig
from tests.learner.conftest import tiny_config
from tests.learner.test_data import make_samples_file


@pytest.fixture(scope="module")
def samples_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "s.bin"
    make_samples_file(path, 600, seed=11)
    return str(path)


def loader(path, batch_size=32, **kw):
    return SampleLoader(DataConfig(path, batch_size=batch_size, seq_len=8, **kw))


def trainer(model="dumn", objective="bce", seed=0, **kw):
    cfg = TrainerConfig(model=model, objective=objective, seed=seed, device="cpu", window=200,
                        curve_every=4, clsd=CLSDConfig(warmup_samples=100), **kw)
    return Trainer(cfg, tiny_config(model, heads=cfg.heads))


def test_scores_are_pre_step_predictions(samples_path):
    """The recorded score of minibatch k equals a no-grad eval forward of the model (and memory) as
    they stood before minibatch k's update; the memory changes only through the training step."""
    t = trainer("dumn", "clsd", keep_predictions=True)
    for k, item in enumerate(loader(samples_path)):
        if k == 6:
            break
        before = copy.deepcopy(t.model).eval()
        with torch.no_grad():
            want = torch.sigmoid(before(item.batch, write_memory=False).main)       # (B,)
        mem_before = t.model.memory.memory.clone()
        got = t.train_batch(item.batch)
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
        assert not torch.equal(t.model.memory.memory, mem_before)                  # this batch was written
        with torch.no_grad():
            after = torch.sigmoid(t.model.eval()(item.batch, write_memory=False).main)
        t.model.train()
        assert not torch.allclose(after, want)                                    # and trained on


def test_separate_eval_pass_gives_same_run(samples_path):
    a = trainer("dumn", "clsd", keep_predictions=True).run(loader(samples_path))
    b = trainer("dumn", "clsd", keep_predictions=True, separate_eval_pass=True).run(loader(samples_path))
    np.testing.assert_allclose(a.predictions["scores"], b.predictions["scores"], atol=1e-5)
    assert a.final["cum_click_auc"] == pytest.approx(b.final["cum_click_auc"], abs=1e-3)


def test_same_seed_same_metrics_other_seed_differs(samples_path):
    a = trainer("din", seed=3).run(loader(samples_path))
    b = trainer("din", seed=3).run(loader(samples_path))
    c = trainer("din", seed=4).run(loader(samples_path))
    np.testing.assert_equal(a.curve, b.curve)                             # NaN-aware equality
    np.testing.assert_equal(a.final, b.final)
    assert a.final["cum_click_logloss"] != c.final["cum_click_logloss"]


def test_metrics_agree_with_direct_computation(samples_path):
    res = trainer("wide_deep", keep_predictions=True).run(loader(samples_path))
    p = res.predictions
    assert res.samples_seen == len(p["scores"]) == 600
    assert res.final["cum_click_logloss"] == pytest.approx(logloss(p["scores"], p["clicked"]), rel=1e-9)
    # the cumulative AUC/GAUC bin scores into 1e4 bins: equal up to pairs sharing a bin
    assert res.final["cum_click_auc"] == pytest.approx(auc(p["scores"], p["clicked"]), abs=2e-3)
    assert res.final["cum_click_gauc"] == pytest.approx(gauc(p["scores"], p["clicked"], p["users"]), abs=2e-3)
    assert res.final["cum_vr_auc"] == pytest.approx(auc(p["scores"], p["valid_read"]), abs=2e-3)
    w = slice(-200, None)                                                     # window=200 is exact
    assert res.final["window_click_auc"] == pytest.approx(auc(p["scores"][w], p["clicked"][w]), abs=1e-12)
    assert res.final["window_click_gauc"] == pytest.approx(
        gauc(p["scores"][w], p["clicked"][w], p["users"][w]), abs=1e-12)
    assert res.final["window_vr_auc"] == pytest.approx(auc(p["scores"][w], p["valid_read"][w]), abs=1e-12)
    assert [pt["samples"] for pt in res.curve][-1] == 600


@pytest.fixture(scope="module")
def larger_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "s.bin"
    make_samples_file(path, 1500, seed=12)
    return str(path)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_runs_and_learns_something(larger_path, objective):
    res = trainer("deepfm", objective, lr=0.02).run(loader(larger_path, batch_size=50))
    assert math.isfinite(res.final["cum_click_logloss"]) and res.steps == 30
    assert 0.0 <= res.final["cum_click_auc"] <= 1.0 and 0.0 <= res.final["cum_vr_auc"] <= 1.0
    assert res.final["cum_click_auc"] > 0.55          # the stream is learnable (valid reads are clicks)


def test_mtl_scores_are_mean_of_two_towers(samples_path):
    t = trainer("dcn", "mtl")
    item = next(iter(loader(samples_path)))
    with torch.no_grad():
        out = copy.deepcopy(t.model)(item.batch)
    want = (torch.sigmoid(out.logits["main"]) + torch.sigmoid(out.logits["weighted"])) / 2
    assert torch.allclose(t.train_batch(item.batch), want, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError):
        TrainerConfig(model="nope")
    with pytest.raises(ValueError):
        TrainerConfig(objective="nope")
    with pytest.raises(ValueError):
        Trainer(TrainerConfig(model="din", objective="mtl", device="cpu"), tiny_config("din"))


# The trainer's DUMN throughput rests on three batched paths; each equals its plain reference.

def test_fast_paths_equal_their_references():
    from learner.models.dumn import encode_all
    from learner.models.dumn_memory import loop_writes, sequential_writes
    from learner.synthetic import synthetic_batch
    torch.manual_seed(0)
    model = Trainer(TrainerConfig(model="dumn", device="cpu"), tiny_config("dumn")).model
    b = synthetic_batch(9, 6, seed=2)
    user, item, x, m = model.embed.all_fields(b)                                     # (4, B, T, E), (4, B, T)
    assert torch.equal(user, model.embed.user_fields(b)) and torch.equal(item, model.embed.item_fields(b))
    for k, kind in enumerate(("click", "unclick", "like", "dislike")):
        e_ref, m_ref = model.embed.sequence(b, kind)
        assert torch.equal(x[k], e_ref) and torch.equal(m[k], m_ref)
    m = m.clone()
    m[1, 3] = False                                                                  # an empty sequence
    ref = torch.stack([model.encoders[k](x[k], m[k]) for k in range(4)])
    assert torch.allclose(encode_all(model.encoders, x, m), ref, atol=1e-6, rtol=0)
    mem = torch.randn(4, 5, 3, dtype=torch.float64)
    w = torch.softmax(torch.randn(7, 4, 5, dtype=torch.float64), -1)
    e, a = torch.rand(7, 4, 3, dtype=torch.float64), torch.rand(7, 4, 3, dtype=torch.float64) * 2 - 1
    got = loop_writes(mem.clone(), w, e, a)
    for k in range(4):
        assert torch.allclose(got[k], sequential_writes(mem[k], w[:, k], e[:, k], a[:, k]), atol=1e-12, rtol=0)
    assert not torch.allclose(loop_writes(mem.clone(), w.flip(0), e.flip(0), a.flip(0)), got)  # order matters


def test_hashed_multi_lookup_with_two_hashes_equals_separate_lookups():
    from learner.models.embedding import HashedEmbedding, hash_ids
    emb = HashedEmbedding(64, 4, n_hashes=2)
    ids1, ids2 = torch.tensor([1, 5, 2**40]), torch.tensor([[3, 3], [9, 1]])
    got = emb.multi([(ids1, 0), (ids2, 7)])
    ref = [sum(emb.weight[hash_ids(i, 64, salt=f * 1_000_003 + k)] for k in range(2))
           for i, f in ((ids1, 0), (ids2, 7))]
    assert all(torch.allclose(g, r) for g, r in zip(got, ref)) and got[1].shape == (2, 2, 4)


def test_hardest_pair_search_has_the_full_matrix_value_and_gradient():
    from learner.models.dumn import cosine_distance, hardest
    torch.manual_seed(1)
    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
    for farthest in (True, False):
        d = cosine_distance(a, b)
        ref = d.max(1).values if farthest else d.min(1).values
        ga_ref, gb_ref = torch.autograd.grad((ref * torch.arange(6.0)).sum(), (a, b))
        got = hardest(a, b, farthest)
        ga, gb = torch.autograd.grad((got * torch.arange(6.0)).sum(), (a, b))
        assert torch.allclose(got, ref, atol=1e-6) and torch.allclose(ga, ga_ref, atol=1e-6)
        assert torch.allclose(gb, gb_ref, atol=1e-6)


def test_trimming_padding_changes_no_output(monkeypatch):
    """DUMN cuts all-padding sequence positions before attention; no output may move."""
    import learner.models.dumn as dumn
    from learner.models import build_model
    from learner.synthetic import synthetic_batch
    torch.manual_seed(0)
    model = build_model("dumn", tiny_config("dumn")).train()
    b = synthetic_batch(7, 6, seed=4)
    padded = {}
    for kind in ("click", "unclick", "like", "dislike"):                      # 4 more padding columns
        items, cats, mask = b.sequence(kind)
        padded[f"{kind}_items"] = torch.cat([items, torch.full((7, 4), 123)], 1)
        padded[f"{kind}_cats"] = torch.cat([cats, torch.full((7, 4), 5)], 1)
        padded[f"{kind}_mask"] = torch.cat([mask, torch.zeros(7, 4, dtype=torch.bool)], 1)
    long = type(b)(**{**b.tensors(), **padded})
    assert dumn.trim_padding(long).seq_len == 6
    empty = type(b)(**{**long.tensors(), **{k: torch.zeros_like(v) for k, v in padded.items() if k.endswith("mask")}})
    assert dumn.trim_padding(empty).seq_len == 1
    outs = {}
    for name, trim in (("trimmed", dumn.trim_padding), ("full", lambda batch: batch)):
        monkeypatch.setattr(dumn, "trim_padding", trim)
        for which, batch in (("long", long), ("empty", empty)):
            out = model(batch, write_memory=False)
            grads = torch.autograd.grad(out.main.sum() + out.aux_loss, list(model.parameters()), allow_unused=True)
            outs[name, which] = (out.main.detach(), out.aux_loss.detach(), grads)
    for which in ("long", "empty"):
        (m1, a1, g1), (m2, a2, g2) = outs["trimmed", which], outs["full", which]
        assert torch.allclose(m1, m2, atol=1e-6) and torch.allclose(a1, a2, atol=1e-6)
        assert all((x is None and y is None) or torch.allclose(x, y, atol=1e-6) for x, y in zip(g1, g2))
