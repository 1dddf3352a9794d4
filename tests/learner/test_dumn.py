"""DUMN parts: orthogonal mapping gradient, memory scan oracle, minibatch memory semantics."""
from __future__ import annotations

import pytest
import torch

from learner.models import build_model
from learner.models.dumn import PairGate, SequenceEncoder, TargetAttentionPool, orthogonal_map, sample_entries
from learner.models.dumn_memory import UserMemory, cosine_address, scan_writes, sequential_writes
from learner.synthetic import synthetic_batch
from tests.learner.conftest import tiny_config


def test_orthogonal_map_gradcheck_and_orthogonality():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonal_map, (a, b))
    out = orthogonal_map(a, b)
    assert torch.allclose((out * b).sum(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # the removed part is the projection on b (eq. 6): a - out is parallel to b
    coef = ((a - out) * b).sum(-1) / (b * b).sum(-1)
    assert torch.allclose(a - out, coef[:, None] * b)
    # an empty explicit sequence (b = 0) removes nothing
    assert torch.equal(orthogonal_map(a, torch.zeros_like(b)), a)


@pytest.mark.parametrize("n,chunk", [(1, 4), (7, 3), (13, 64), (40, 8)])
def test_scan_equals_sequential_reference(n, chunk):
    g = torch.Generator().manual_seed(n)
    m0 = torch.randn(6, 5, dtype=torch.float64, generator=g)
    w = torch.softmax(torch.randn(n, 6, dtype=torch.float64, generator=g) * 3, -1)
    e = torch.sigmoid(torch.randn(n, 5, dtype=torch.float64, generator=g))
    a = torch.tanh(torch.randn(n, 5, dtype=torch.float64, generator=g))
    ref = sequential_writes(m0, w, e, a)
    assert torch.allclose(scan_writes(m0, w, e, a, chunk=chunk), ref, atol=1e-12, rtol=0)
    # order matters: reversing the writes gives a different memory, and the scan follows the order
    assert not torch.allclose(sequential_writes(m0, w.flip(0), e.flip(0), a.flip(0)), ref) or n == 1


@pytest.mark.parametrize("n_memories", [4, 1])
def test_model_memory_write_equals_per_sample_loop(n_memories):
    """A minibatch forward writes exactly what a plain loop of eq. 12 over its samples writes,
    with write addressing taken against the minibatch-start memory (sample-major, kinds c,u,l,d)."""
    torch.manual_seed(0)
    model = build_model("dumn", tiny_config("dumn", n_memories=n_memories)).train()
    mem = model.memory
    b = synthetic_batch(11, 5, seed=3)
    captured = {}
    def spy(w, erase, add):
        captured.update(w=w.clone(), erase=erase.clone(), add=add.clone())
        mem.apply_writes(w, erase, add)

    mem.write_sink = spy
    start = mem.memory.clone()
    model(b)
    end = mem.memory.clone()
    w, e, a = captured["w"], captured["erase"], captured["add"]
    expect = start.clone()
    for s in range(11):                                 # plain per-sample loop in stream order
        for k in range(4):
            slot = mem.kind_to_memory[k]
            expect[slot] = sequential_writes(expect[slot], w[s, k:k + 1], e[s, k:k + 1], a[s, k:k + 1])
    assert torch.allclose(end, expect, atol=1e-5, rtol=1e-5)
    assert w.shape == (11, 4, 8) and torch.allclose(w.sum(-1), torch.ones(11, 4))
    assert not end.requires_grad and not start.requires_grad


def test_reads_do_not_see_same_minibatch_writes():
    """Each row's prediction in a training forward equals its prediction alone against the same
    starting memory: reads use the minibatch-start memory, never a write of the same minibatch."""
    torch.manual_seed(0)
    model = build_model("dumn", tiny_config("dumn")).train()
    b = synthetic_batch(9, 5, seed=4)
    start = model.memory.memory.clone()
    full = model(b).main.detach()                                   # writes the memory
    assert not torch.equal(model.memory.memory, start)
    singles = []
    for i in range(9):
        model.memory.memory.copy_(start)
        singles.append(model(b.select(slice(i, i + 1)), write_memory=False).main.detach())
    assert torch.allclose(full, torch.cat(singles), atol=1e-6)


def test_memory_is_a_buffer_and_detached_across_minibatches():
    torch.manual_seed(0)
    model = build_model("dumn", tiny_config("dumn")).train()
    assert "memory.memory" in model.state_dict()
    assert all(p is not model.memory.memory for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for i in range(3):                                              # backward twice-free: graphs do not chain
        b = synthetic_batch(8, 5, seed=i, start_sample_id=8 * i)
        out = model(b)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.main, b.clicked) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert not model.memory.memory.requires_grad


def test_write_flag_and_eval_mode():
    torch.manual_seed(0)
    model = build_model("dumn", tiny_config("dumn"))
    b = synthetic_batch(6, 5, seed=5)
    start = model.memory.memory.clone()
    model.eval()(b)
    assert torch.equal(model.memory.memory, start)                  # eval: no write by default
    model.train()(b, write_memory=False)
    assert torch.equal(model.memory.memory, start)
    model.eval()(b, write_memory=True)
    assert not torch.equal(model.memory.memory, start)


def test_triplet_anchor_is_read_after_own_write():
    torch.manual_seed(0)
    mem = UserMemory(in_dim=6, n_slots=5, slot_dim=4, controller_dim=8).double()
    short, e_user = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    r, q = mem(short, e_user, write=False)
    x = torch.cat([short, e_user.unsqueeze(1).expand(3, 4, 4)], -1)
    c = mem.controller(x)
    m0 = mem.memory
    w = cosine_address(c["write_key"], m0)
    for b in range(3):
        for k in range(4):
            after = sequential_writes(m0[k], w[b, k:k + 1], c["erase"][b, k:k + 1], c["add"][b, k:k + 1])
            assert torch.allclose(q[b, k], w[b, k] @ after)
            assert torch.allclose(r[b, k], cosine_address(c["read_key"], m0)[b, k] @ m0[k])


def test_attention_masks_padding_and_empty_sequences():
    torch.manual_seed(0)
    enc, pool = SequenceEncoder(8, 2, "seq_len"), TargetAttentionPool(4, 4, 8)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    e_user, e_item = torch.randn(3, 4), torch.randn(3, 4)
    f = pool(e_user, e_item, enc(x, mask), mask)
    x2 = x.clone()
    x2[0, 3:] = 100.0                                               # padding content must not matter
    x2[1, 1:] = -50.0
    f2 = pool(e_user, e_item, enc(x2, mask), mask)
    assert torch.allclose(f2[:2], f[:2], atol=1e-5)
    assert torch.equal(f[2], torch.zeros(8))                        # empty sequence pools to 0
    assert torch.isfinite(f).all()
    # a one-entry sequence pools to that entry's self-attention output
    assert torch.allclose(f[1], enc(x, mask)[1, 0], atol=1e-6)


def test_pair_gate_shapes_and_concat_ablation():
    g = PairGate(4, 6, "pair")
    s, l = torch.randn(2, 4, 4), torch.randn(2, 4, 6)
    out = g(s, l)
    assert out.shape == (2, 40)
    gate = torch.sigmoid(torch.einsum("be,ef->bf", s[:, 0], g.w1[0]))
    assert torch.allclose(out[:, :4], s[:, 0] * gate)
    assert torch.equal(PairGate(4, 6, "concat")(s, l), torch.cat([s, l], -1).flatten(1))


def test_sample_entries_pick_real_entries_deterministically():
    e = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1).expand(2, 4, 3)
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    s, ok = sample_entries(e, mask, torch.tensor([10, 11]), salt=1)
    assert ok.tolist() == [True, False]
    assert s[0, 0].item() in (1.0, 3.0)
    s2, _ = sample_entries(e, mask, torch.tensor([10, 11]), salt=1)
    assert torch.equal(s, s2)


def test_bf16_autocast_forward_backward_keeps_fp32_memory():
    torch.manual_seed(0)
    model = build_model("dumn", tiny_config("dumn")).train()
    b = synthetic_batch(8, 5, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(b)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.main.float(), b.clicked) + out.aux_loss.float()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.memory.memory.dtype == torch.float32 and torch.isfinite(model.memory.memory).all()
