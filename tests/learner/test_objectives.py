"""Objectives: hand-computed values on tiny cases, CLSD teacher and warm-up, AdGate, composition."""
from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from learner import MissingHeadError
from learner.config import CLSDConfig, ObjectiveConfig
from learner.models import build_model
from learner.models.base import ModelOutput
from learner.objectives import (BCEObjective, CLSDObjective, NDTWeightedObjective, ValidReadObjective,
                                build_objective, teacher_probs)
from learner.synthetic import synthetic_batch
from tests.learner.conftest import tiny_config

L3 = math.log(3.0)
Z = torch.tensor([0.0, L3, -L3])              # student probabilities 0.5, 0.75, 0.25


def tiny_batch(clicked=(1, 1, 0), valid=(1, 0, 0), ndt=(0.5, 2.0, 7.0), groups=(0, 1, 2)):
    b = synthetic_batch(3, 2, seed=0)
    return dataclasses.replace(b, clicked=torch.tensor(clicked, dtype=torch.float32),
                               valid_read=torch.tensor(valid, dtype=torch.float32),
                               ndt_weight=torch.tensor(ndt, dtype=torch.float32),
                               user_group=torch.tensor(groups))


def out_of(main, weighted=None, aux=0.0):
    logits = {"main": main.clone().requires_grad_(True)}
    if weighted is not None:
        logits["weighted"] = weighted.clone().requires_grad_(True)
    return ModelOutput(logits=logits, aux_loss=torch.tensor(aux))


def set_adgate_constant(obj: CLSDObjective, z_local: float) -> None:
    """Make AdGate output the constant logit z_local for every sample."""
    with torch.no_grad():
        last = obj.adgate.net[-1]
        last.weight.zero_()
        last.bias.fill_(z_local)


def test_bce_hand_computed():
    res = BCEObjective()(out_of(Z), tiny_batch())
    expect = (math.log(2) + 2 * math.log(4 / 3)) / 3
    assert res.loss.item() == pytest.approx(expect, rel=1e-6)


def test_clsd_global_eq2_hand_computed():
    # eq. 2: -((1 + p) y log p_s + (1 - y) log(1 - p_s)), teacher p = the model's own detached p
    obj = CLSDObjective(CLSDConfig(warmup_samples=0, use_local=False, alpha=1.0))
    res = obj(out_of(Z), tiny_batch())
    expect = (1.5 * math.log(2) + 1.75 * math.log(4 / 3) + math.log(4 / 3)) / 3
    assert res.loss.item() == pytest.approx(expect, rel=1e-6)
    # an explicit teacher and alpha scale only the positives
    obj = CLSDObjective(CLSDConfig(warmup_samples=0, use_local=False, alpha=0.5))
    res = obj(out_of(Z), tiny_batch(), teacher_p=torch.tensor([0.2, 0.6, 0.9]))
    expect = (1.1 * math.log(2) + 1.3 * math.log(4 / 3) + math.log(4 / 3)) / 3
    assert res.loss.item() == pytest.approx(expect, rel=1e-6)


def test_clsd_final_with_local_logit_sum_hand_computed():
    obj = CLSDObjective(CLSDConfig(warmup_samples=0, alpha=0.5, local_combine="logit_sum"))
    set_adgate_constant(obj, L3)                      # p_local = 0.75, q = sigmoid(z + log 3)
    res = obj(out_of(Z), tiny_batch(), teacher_p=torch.tensor([0.2, 0.6, 0.9]))
    # q = 0.75, 0.9, 0.5
    expect = (-1.1 * math.log(0.75) - 1.3 * math.log(0.9) - math.log(0.5)) / 3
    assert res.loss.item() == pytest.approx(expect, rel=1e-6)


def test_clsd_final_with_local_clamped_sum_hand_computed():
    obj = CLSDObjective(CLSDConfig(warmup_samples=0, alpha=0.5, local_combine="clamped_sum", eps=1e-4))
    set_adgate_constant(obj, math.log(0.25))          # p_local = 0.2, q = p_s + 0.2
    res = obj(out_of(Z), tiny_batch(), teacher_p=torch.tensor([0.2, 0.6, 0.9]))
    expect = (-1.1 * math.log(0.7) - 1.3 * math.log(0.95) - math.log(1 - 0.45)) / 3
    assert res.loss.item() == pytest.approx(expect, rel=1e-5)
    # p_s + p_local > 1 on a negative: clamped to 1 - eps, finite
    res = obj(out_of(torch.tensor([5.0, 5.0, 5.0])), tiny_batch(clicked=(0, 0, 0)))
    assert res.loss.item() == pytest.approx(-math.log(1e-4), rel=1e-3)


def test_valid_read_and_ndt_weighted_hand_computed():
    b = tiny_batch(valid=(1, 1, 0), ndt=(0.5, 2.0, 7.0))
    res = ValidReadObjective()(out_of(Z), b)
    assert res.loss.item() == pytest.approx((math.log(2) + 2 * math.log(4 / 3)) / 3, rel=1e-6)
    res = NDTWeightedObjective()(out_of(Z, weighted=Z), b)
    # positives weighted by T_N (0.5, 2.0); the negative has weight 1 whatever its ndt_weight
    expect = (0.5 * math.log(2) + 2.0 * math.log(4 / 3) + 1.0 * math.log(4 / 3)) / 3
    assert res.loss.item() == pytest.approx(expect, rel=1e-6)


def test_mtl_sum_score_and_model_aux():
    obj = build_objective(ObjectiveConfig(terms=("valid_read", "ndt_weighted")))
    b = tiny_batch(valid=(1, 1, 0))
    out = out_of(Z, weighted=torch.zeros(3), aux=0.25)
    res = obj(out, b)
    parts = res.parts
    assert res.loss.item() == pytest.approx(float(parts["valid_read"] + parts["ndt_weighted"]) + 0.25, rel=1e-6)
    assert torch.allclose(obj.score(out), torch.sigmoid(Z) + 0.5)
    with pytest.raises(MissingHeadError):
        obj(out_of(Z), b)


def test_mtl_plus_clsd_composes():
    cfg = ObjectiveConfig(terms=("clsd", "ndt_weighted"),
                          clsd=CLSDConfig(label="valid_read", warmup_samples=0, use_local=False))
    obj = build_objective(cfg)
    b = tiny_batch(valid=(1, 0, 0))
    res = obj(out_of(Z, weighted=Z), b)
    clsd = (1.5 * math.log(2) + math.log(4) + math.log(4 / 3)) / 3      # labels valid_read = 1, 0, 0
    ndt = (0.5 * math.log(2) + math.log(4) + math.log(4 / 3)) / 3
    assert res.loss.item() == pytest.approx(clsd + ndt, rel=1e-6)
    with pytest.raises(ValueError, match="pick one"):
        ObjectiveConfig(terms=("bce", "clsd"))


def test_warmup_counts_samples_and_is_state():
    obj = CLSDObjective(CLSDConfig(warmup_samples=4, use_local=False)).train()
    b = tiny_batch()
    bce = BCEObjective()(out_of(Z), b).loss.item()
    first = obj(out_of(Z), b).loss.item()                               # stream rows 0..2: all warm-up
    assert first == pytest.approx(bce, rel=1e-6) and int(obj.n_seen) == 3
    second = obj(out_of(Z), b).loss.item()                              # rows 3..5: row 3 warm, 4-5 eq. 4
    per_ori = [math.log(2), math.log(4 / 3), math.log(4 / 3)]
    per_final = [1.5 * math.log(2), 1.75 * math.log(4 / 3), math.log(4 / 3)]
    assert second == pytest.approx((per_ori[0] + per_final[1] + per_final[2]) / 3, rel=1e-6)
    with torch.no_grad():                                               # a no-grad call does not count
        obj(out_of(Z), b)
    obj.eval()(out_of(Z), b)
    assert int(obj.n_seen) == 6
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    restored = CLSDObjective(CLSDConfig(warmup_samples=4, use_local=False))
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert int(restored.n_seen) == 6


def test_adgate_local_path_gets_gradient_only_after_warmup():
    obj = CLSDObjective(CLSDConfig(warmup_samples=3)).train()
    b = tiny_batch(groups=(0, 1, 1))
    obj(out_of(Z), b).loss.backward()                                   # warm-up: L_ori only
    assert all(p.grad is None or torch.all(p.grad == 0) for p in obj.adgate.parameters())
    obj(out_of(Z), b).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.adgate.parameters())
    # AdGate learns a group-level prior: train only AdGate on group 0 all-positive, group 1 all-negative
    opt = torch.optim.Adam(obj.adgate.parameters(), lr=0.05)
    b = tiny_batch(clicked=(1, 0, 0), groups=(0, 1, 1))
    for _ in range(60):
        opt.zero_grad()
        obj(out_of(torch.zeros(3)), b).loss.backward()
        opt.step()
    z_local = obj.adgate(b).detach()
    assert z_local[0] > 1.0 and z_local[1] < -1.0
    # the served score does not include p_local by default
    out = out_of(torch.zeros(3))
    assert torch.allclose(obj.score(out), torch.full((3,), 0.5))
    assert not torch.allclose(obj.score(out, b, include_local=True), torch.full((3,), 0.5))


@pytest.mark.parametrize("name", ["dumn", "din"])
def test_clsd_teacher_is_previous_step_model(name):
    torch.manual_seed(0)
    model = build_model(name, tiny_config(name)).train()
    obj = CLSDObjective(CLSDConfig(warmup_samples=0, use_local=False)).train()
    opt = torch.optim.Adam(list(model.parameters()) + list(obj.parameters()), lr=0.05)
    b1, b2 = synthetic_batch(8, 5, seed=1), synthetic_batch(8, 5, seed=2, start_sample_id=8)
    # step 1
    out = model(b1)
    opt.zero_grad()
    obj(out, b1).loss.backward()
    opt.step()
    # the model's no-grad output after step 1's update
    mem_before = model.memory.memory.clone() if name == "dumn" else None
    expected = teacher_probs(model, b2)
    if name == "dumn":
        assert torch.equal(model.memory.memory, mem_before)           # the teacher pass writes nothing
    assert model.training
    # step 2: the objective's teacher (no teacher_p passed) is exactly that output
    out2 = model(b2)
    assert torch.allclose(torch.sigmoid(out2.main).detach(), expected, atol=1e-6)
    res_default = obj(out2, b2)
    obj.n_seen -= 8
    res_explicit = obj(out2, b2, teacher_p=expected)
    assert res_default.loss.item() == pytest.approx(res_explicit.loss.item(), rel=1e-6)
    y = b2.clicked
    p_s = torch.sigmoid(out2.main.detach())
    manual = -((1 + expected) * y * torch.log(p_s) + (1 - y) * torch.log(1 - p_s)).mean()
    assert res_default.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # and it differs from the pre-update model's prediction on b2 (the teacher moved with the step)
    torch.manual_seed(0)
    fresh = build_model(name, tiny_config(name))
    assert not torch.allclose(teacher_probs(fresh, b2), expected)


def test_adgate_profile_column_and_config_validation():
    cfg = CLSDConfig(warmup_samples=0, local_fields=("user_group", "user_profile.0"))
    obj = CLSDObjective(cfg)
    b = tiny_batch()
    assert obj.adgate(b).shape == (3,)
    assert torch.equal(obj.adgate.column(b, "user_profile.0"), b.user_profile[:, 0])
    with pytest.raises(ValueError, match="local_fields"):
        CLSDConfig(local_fields=("clicked",))
    with pytest.raises(ValueError, match="local_fields"):
        CLSDConfig(local_fields=("user_profile.x",))


def test_adgate_gives_every_activeness_level_its_own_row():
    from streams.contracts import ACTIVENESS_LEVELS

    obj = CLSDObjective(CLSDConfig(warmup_samples=0))
    codes = torch.arange(-1, len(ACTIVENESS_LEVELS))  # -1 = unknown group, then every level
    rows = obj.adgate.rows(codes)
    assert len(set(rows.tolist())) == len(codes)  # one-to-one: no two groups share a prior


def test_the_clsd_teacher_comes_from_the_head_clsd_trains():
    """CLSD distils a head into itself: with ``clsd.head = "weighted"`` the teacher p of a pre-step
    prediction (the trainer's separate eval pass) is the weighted head's, not the main head's; and
    without an explicit teacher CLSD takes the same head of its own forward."""
    from learner.trainer import Trainer, TrainerConfig

    for head in ("main", "weighted"):
        cfg = TrainerConfig(model="din", objective="mtl_clsd", device="cpu", clsd=CLSDConfig(head=head))
        trainer = Trainer(cfg, tiny_config("din", heads=cfg.heads))
        out = trainer.model(synthetic_batch(8, 5, seed=3), write_memory=False)
        assert not torch.allclose(out.logits["main"], out.logits["weighted"])
        teacher = trainer.objective.teacher_p(out)
        assert torch.equal(teacher, torch.sigmoid(out.logits[head].detach().float()))
        clsd = trainer.objective.terms["clsd"]
        implicit = clsd(out, synthetic_batch(8, 5, seed=3)).loss
        clsd.n_seen -= 8
        explicit = clsd(out, synthetic_batch(8, 5, seed=3), teacher_p=teacher).loss
        assert implicit.item() == pytest.approx(explicit.item(), rel=1e-6)
    assert build_objective(ObjectiveConfig(terms=("bce",))).teacher_p(out) is None
