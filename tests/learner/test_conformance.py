"""Conformance suite every registered model (and every DUMN ablation) must pass."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from learner.models import MODEL_CONFIGS, build_model
from learner.objectives import BCEObjective
from learner.synthetic import SyntheticSpec, synthetic_batch
from tests.learner.conftest import tiny_config

B, T = 16, 6

CASES = [(name, {}) for name in sorted(MODEL_CONFIGS)] + [
    ("dumn", {"use_fp": False}), ("dumn", {"use_umn": False}), ("dumn", {"n_memories": 1}),
    ("dumn", {"use_triplet": False}), ("dumn", {"fusion": "concat"}), ("dumn", {"key_strength": True}),
    ("dumn", {"attention_scale": "head_dim"}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in CASES]


def make(name: str, overrides: dict, seed: int = 0, heads=("main",)):
    torch.manual_seed(seed)
    return build_model(name, tiny_config(name, heads=heads, **overrides))


def train_steps(model, batches, lr=0.01):
    obj = BCEObjective()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for b in batches:
        out = model(b)
        loss = obj(out, b).loss + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return opt, losses


def batches(n, seed=0, **spec):
    return [synthetic_batch(B, T, seed=seed + i, spec=SyntheticSpec(**spec), start_sample_id=i * B) for i in range(n)]


def eval_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return {k: v.clone() for k, v in model(batch, write_memory=False).logits.items()}


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_shapes_and_finite_loss(name, overrides):
    model = make(name, overrides, heads=("main", "weighted"))
    b = batches(1)[0]
    out = model.train()(b)
    assert set(out.logits) == {"main", "weighted"}
    for v in out.logits.values():
        assert v.shape == (B,) and torch.isfinite(v).all()
    loss = BCEObjective()(out, b).loss + out.aux_loss
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_state_dict_round_trip(name, overrides):
    a = make(name, overrides, seed=0)
    train_steps(a, batches(2))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(name, overrides, seed=123)                       # different init, then restored
    b.load_state_dict(torch.load(buf, weights_only=True))
    probe = batches(1, seed=50)[0]
    for k, v in eval_logits(a, probe).items():
        assert torch.equal(v, eval_logits(b, probe)[k])
    if getattr(a, "memory", None) is not None:
        assert not torch.equal(a.memory.memory, make(name, overrides).memory.memory)  # memory moved
        assert torch.equal(a.memory.memory, b.memory.memory)
    # training on from the restored state continues identically (memory writes included)
    more = batches(1, seed=70)
    train_steps(a, more)
    train_steps(b, more)
    for k, v in eval_logits(a, probe).items():
        assert torch.equal(v, eval_logits(b, probe)[k])


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_same_seed_same_result(name, overrides):
    runs = []
    for _ in range(2):
        model = make(name, overrides, seed=7)
        _, losses = train_steps(model, batches(2))
        runs.append((losses, eval_logits(model, batches(1, seed=9)[0])["main"]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    other = make(name, overrides, seed=8)
    train_steps(other, batches(2))
    assert not torch.equal(eval_logits(other, batches(1, seed=9)[0])["main"], runs[0][1])


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_unseen_ids_mid_stream(name, overrides):
    model = make(name, overrides)
    opt, _ = train_steps(model, batches(2))
    n_params = sum(p.numel() for p in model.parameters())
    fresh = synthetic_batch(B, T, seed=99, spec=SyntheticSpec(id_offset=10**15))  # ids never seen
    out = model.train()(fresh)
    assert torch.isfinite(out.main).all()
    loss = BCEObjective()(out, fresh).loss + out.aux_loss
    opt.zero_grad()
    loss.backward()
    opt.step()                                                # the same optimizer, no rebuild
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert torch.isfinite(eval_logits(model, fresh)["main"]).all()


@pytest.mark.parametrize("name,overrides", CASES, ids=IDS)
def test_inputs_not_mutated(name, overrides):
    model = make(name, overrides)
    b = batches(1)[0]
    before = {k: v.clone() for k, v in b.tensors().items()}
    out = model.train()(b)
    (BCEObjective()(out, b).loss + out.aux_loss).backward()
    for k, v in b.tensors().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_learns_a_fixed_batch(name):
    model = make(name, {})
    b = batches(1)[0]
    _, losses = train_steps(model, [b] * 25, lr=0.02)
    assert losses[-1] < losses[0]


def test_unknown_model_and_wrong_config():
    from learner import UnknownModelError
    with pytest.raises(UnknownModelError):
        build_model("dien")
    with pytest.raises(ValueError):
        build_model("din", tiny_config("dcn"))


def test_config_validation():
    with pytest.raises(ValueError, match="n_memories"):
        tiny_config("dumn", n_memories=2)
    with pytest.raises(ValueError, match="heads"):
        tiny_config("din", heads=("weighted",))
    with pytest.raises(ValueError, match="not divisible"):
        tiny_config("dumn", n_heads=3)
    assert dataclasses.asdict(tiny_config("dumn"))["slot_dim"] == 8
