"""Objectives: modules that map (ModelOutput, SampleBatch) to a loss and a dict of named parts.

Terms (each a module, so parameters and state live in ``state_dict``):

* :class:`BCEObjective` -- L_ori, mean binary cross-entropy of one head against one label
  (CLSD eq. 1, DUMN eq. 16). :class:`ValidReadObjective` is the same on the valid-read label
  (dwell-time paper eq. 2).
* :class:`NDTWeightedObjective` -- dwell-time paper eq. 3 on the "weighted" head: valid reads
  weighted by their normalized dwell time T_N, negatives by 1.
* :class:`CLSDObjective` -- CLSD eq. 2-4: teacher-confidence weighted positives, AdGate local
  adaption, L_ori warm-up counted in samples.
* :class:`Objective` -- sums terms and the model's auxiliary loss (DUMN's triplet L2, so
  L = L1 + L2) and says which score is served.

Reductions are means over the minibatch (the papers write sums; a mean keeps the learning rate
independent of the batch size).

>>> import torch
>>> from learner.models.base import ModelOutput
>>> from learner.synthetic import synthetic_batch
>>> b = synthetic_batch(4, 3, seed=0)
>>> out = ModelOutput(logits={"main": torch.zeros(4)}, aux_loss=torch.zeros(()))
>>> res = build_objective(ObjectiveConfig(terms=("bce",)))(out, b)
>>> round(float(res.loss), 4)  # log 2
0.6931
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from learner import MissingHeadError
from learner.batch import SampleBatch
from learner.config import CLSDConfig, ObjectiveConfig
from learner.models.base import ModelOutput
from learner.models.embedding import mlp


@dataclass
class ObjectiveResult:
    """``loss``: () to backpropagate; ``parts``: named () detached values for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def _head(out: ModelOutput, head: str) -> torch.Tensor:
    if head not in out.logits:
        raise MissingHeadError(f"objective needs head {head!r}; the model has {sorted(out.logits)}")
    return out.logits[head].float()                                         # (B,)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | float = 1.0,
                 neg_weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-sample -(pw y log sigma(z) + nw (1 - y) log(1 - sigma(z))), stable in z. (B,) -> (B,)."""
    return -(pos_weight * labels * F.logsigmoid(logits) + neg_weight * (1 - labels) * F.logsigmoid(-logits))


class BCEObjective(nn.Module):
    """L_ori = mean BCE of ``head`` against batch field ``label``."""

    name = "bce"

    def __init__(self, head: str = "main", label: str = "clicked"):
        super().__init__()
        self.head, self.label = head, label

    def forward(self, out: ModelOutput, batch: SampleBatch,
                teacher_p: torch.Tensor | None = None) -> ObjectiveResult:
        z = _head(out, self.head)                                           # (B,)
        loss = weighted_bce(z, getattr(batch, self.label).float()).mean()   # ()
        return ObjectiveResult(loss, {self.name: loss.detach()})


class ValidReadObjective(BCEObjective):
    """Dwell-time paper eq. 2, L_v: BCE of the valid-read tower on the valid-read label.

    As printed, eq. 2 adds +sum_{S_n} log(1 - P) (a sign slip: it would reward wrong negatives);
    the standard -log(1 - P) is used.
    """

    name = "valid_read"

    def __init__(self, head: str = "main"):
        super().__init__(head=head, label="valid_read")


class NDTWeightedObjective(nn.Module):
    """Dwell-time paper eq. 3, L_w: valid reads weighted by T_N (``ndt_weight``), negatives by 1.

    As printed eq. 3 weights negatives by T_N too, and T_N(0) = A / (1 + e^{offset/tau}) - B = 0
    with the paper's constants, which would drop every negative; weight 1 is used (and the same
    sign slip as eq. 2 is corrected).
    """

    name = "ndt_weighted"

    def __init__(self, head: str = "weighted"):
        super().__init__()
        self.head = head

    def forward(self, out: ModelOutput, batch: SampleBatch,
                teacher_p: torch.Tensor | None = None) -> ObjectiveResult:
        z = _head(out, self.head)                                           # (B,)
        loss = weighted_bce(z, batch.valid_read.float(), pos_weight=batch.ndt_weight.float()).mean()  # ()
        return ObjectiveResult(loss, {self.name: loss.detach()})


class AdGate(nn.Module):
    """CLSD eq. 3 before the sigmoid: an MLP over x_local. forward(batch) -> z_local (B,).

    Each entry of ``local_fields`` is a (B,) integer column of the batch (default: user_group,
    the activeness code; "user_profile.<k>" picks a profile column such as the age group), mapped
    to row ``code mod local_buckets`` of its own embedding table: group codes are small categorical
    values, so every group up to ``local_buckets`` gets its own prior (one-to-one, no hashing; the
    unknown code -1 takes the last row).
    """

    def __init__(self, cfg: CLSDConfig):
        super().__init__()
        self.fields, self.n_buckets = cfg.local_fields, cfg.local_buckets
        self.tables = nn.ModuleList(nn.Embedding(cfg.local_buckets, cfg.local_dim) for _ in cfg.local_fields)
        self.net = mlp(cfg.local_dim * len(cfg.local_fields), cfg.local_hidden, 1)
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        # logit_sum starts neutral (z_local = 0); clamped_sum starts with a small p_local = sigmoid(-4)
        nn.init.constant_(last.bias, 0.0 if cfg.local_combine == "logit_sum" else -4.0)

    @staticmethod
    def column(batch: SampleBatch, spec: str) -> torch.Tensor:
        """The (B,) x_local column named by ``spec`` ("user_group" or "user_profile.<k>")."""
        name, _, col = spec.partition(".")
        value = getattr(batch, name)
        return value[:, int(col)] if col else value

    def rows(self, codes: torch.Tensor) -> torch.Tensor:
        """(B,) group codes -> (B,) table rows, one-to-one for codes in [-1, local_buckets - 2]."""
        return torch.remainder(codes.long(), self.n_buckets)                  # (B,)

    def forward(self, batch: SampleBatch) -> torch.Tensor:
        x = torch.cat([t(self.rows(self.column(batch, f)))
                       for f, t in zip(self.fields, self.tables)], -1)              # (B, n_fields * d)
        return self.net(x).squeeze(-1)                                      # (B,)


@torch.no_grad()
def teacher_probs(model: nn.Module, batch: SampleBatch, head: str = "main") -> torch.Tensor:
    """CLSD teacher p: the current parameters (= as they stood after the previous minibatch's
    update) in eval mode, without gradient and without writing memory. -> (B,) float32.

    Call it before this minibatch's optimizer step. When the model is deterministic in training
    mode (no dropout, as all registry models are) this equals ``sigmoid(logits).detach()`` of the
    training forward, which :class:`CLSDObjective` uses when no ``teacher_p`` is passed.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(batch, write_memory=False)
    finally:
        model.train(was_training)
    return torch.sigmoid(out.logits[head].float())


class CLSDObjective(nn.Module):
    """CLSD final loss (eq. 4), per sample, mean over the minibatch:

        -((1 + alpha p) y log q + (1 - y) log(1 - q)),  q = "p_student + p_local"

    p is the teacher confidence (detached); the student probability is sigmoid(z) of ``head``.
    ``local_combine="logit_sum"`` (default) reads p_student + p_local as q = sigmoid(z + z_local)
    with p_local = sigmoid(z_local) (eq. 3): q stays in (0, 1) and log q is computed stably.
    ``"clamped_sum"`` uses q = clamp(sigmoid(z) + sigmoid(z_local), eps, 1 - eps) literally.
    Without the local module (``use_local=False``) this is the global loss, eq. 2 (alpha = 1) with
    alpha. Samples whose stream index (``n_seen`` + row) is below ``warmup_samples`` use L_ori.
    ``n_seen`` is a buffer advanced by B on every call made in training mode with gradients on.
    The served score is sigmoid(z), without p_local (:meth:`score`).
    """

    name = "clsd"

    def __init__(self, cfg: CLSDConfig = CLSDConfig()):
        super().__init__()
        self.cfg = cfg
        self.adgate = AdGate(cfg) if cfg.use_local else None
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.int64))

    def combined_log_probs(self, z: torch.Tensor, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q, log(1 - q)), each (B,)."""
        if self.adgate is None:
            return F.logsigmoid(z), F.logsigmoid(-z)
        z_local = self.adgate(batch).float()                                # (B,)
        if self.cfg.local_combine == "logit_sum":
            return F.logsigmoid(z + z_local), F.logsigmoid(-(z + z_local))
        q = (torch.sigmoid(z) + torch.sigmoid(z_local)).clamp(self.cfg.eps, 1 - self.cfg.eps)  # (B,)
        return torch.log(q), torch.log1p(-q)

    def forward(self, out: ModelOutput, batch: SampleBatch,
                teacher_p: torch.Tensor | None = None) -> ObjectiveResult:
        z = _head(out, self.cfg.head)                                       # (B,)
        y = getattr(batch, self.cfg.label).float()                          # (B,)
        p = torch.sigmoid(z).detach() if teacher_p is None else teacher_p.detach().float()  # (B,)
        idx = self.n_seen + torch.arange(z.shape[0], device=z.device)      # (B,) stream index
        warm = idx < self.cfg.warmup_samples                                # (B,) bool
        ori = weighted_bce(z, y)                                            # (B,)
        log_q, log_not_q = self.combined_log_probs(z, batch)                # (B,), (B,)
        final = -((1 + self.cfg.alpha * p) * y * log_q + (1 - y) * log_not_q)  # (B,)
        loss = torch.where(warm, ori, final).mean()                         # ()
        if self.training and torch.is_grad_enabled():
            self.n_seen += z.shape[0]
        parts = {"clsd": loss.detach(), "clsd_warm_fraction": warm.float().mean(),
                 "clsd_teacher_p": p.mean()}
        return ObjectiveResult(loss, parts)

    def score(self, out: ModelOutput, batch: SampleBatch | None = None,
              include_local: bool = False) -> torch.Tensor:
        """Served probability (B,): sigmoid(z); with ``include_local`` the training-time q."""
        z = _head(out, self.cfg.head).detach()
        if not include_local or self.adgate is None:
            return torch.sigmoid(z)
        return self.combined_log_probs(z, batch)[0].exp()


class Objective(nn.Module):
    """Sum of named terms plus (optionally) the model's ``aux_loss``.

    forward(out, batch, teacher_p=None) -> ObjectiveResult with parts per term and "aux";
    score(out) -> served (B,) score: sigmoid(main), or sigmoid(main) + sigmoid(weighted) when the
    NDT-weighted tower is trained (dwell-time paper: ranking by the sum of the two towers).
    """

    def __init__(self, terms: dict[str, nn.Module], include_model_aux: bool = True):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.include_model_aux = include_model_aux

    def forward(self, out: ModelOutput, batch: SampleBatch,
                teacher_p: torch.Tensor | None = None) -> ObjectiveResult:
        loss = out.main.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms.values():
            res = term(out, batch, teacher_p)
            loss = loss + res.loss
            parts.update(res.parts)
        if self.include_model_aux:
            loss = loss + out.aux_loss.float()
            parts["aux"] = out.aux_loss.detach().float()
            parts.update({k: v.detach() for k, v in out.aux_parts.items()})
        parts["loss"] = loss.detach()
        return ObjectiveResult(loss, parts)

    def teacher_p(self, out: ModelOutput) -> torch.Tensor | None:
        """CLSD's teacher confidence from ``out`` (a pre-step prediction): sigmoid of the head CLSD
        trains, detached float32 (B,); None without a CLSD term."""
        clsd = self.terms["clsd"] if "clsd" in self.terms else None
        return None if clsd is None else torch.sigmoid(_head(out, clsd.cfg.head).detach())

    def score(self, out: ModelOutput) -> torch.Tensor:
        s = torch.sigmoid(out.main.detach().float())                        # (B,)
        if "ndt_weighted" in self.terms:
            s = s + torch.sigmoid(_head(out, self.terms["ndt_weighted"].head).detach())
        return s


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """The composite objective of ``cfg.terms`` (see ObjectiveConfig)."""
    makers = {
        "bce": lambda: BCEObjective("main", "clicked"),
        "clsd": lambda: CLSDObjective(cfg.clsd),
        "valid_read": lambda: ValidReadObjective("main"),
        "ndt_weighted": lambda: NDTWeightedObjective("weighted"),
    }
    return Objective({t: makers[t]() for t in cfg.terms}, include_model_aux=cfg.include_model_aux)


__all__ = ["AdGate", "BCEObjective", "CLSDObjective", "NDTWeightedObjective", "Objective", "ObjectiveResult",
           "ValidReadObjective", "build_objective", "teacher_probs", "weighted_bce"]
