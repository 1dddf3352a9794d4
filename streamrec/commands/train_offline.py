"""``streamrec train-offline --samples FILE``: one prequential pass over a samples file.

Every minibatch is scored before it is trained on (learner/trainer.py). Writes ``metrics.json``
(final metrics, the metric curves, throughput, configs and the command) and ``checkpoint.pt``
(complete state, learner/checkpoint.py) into ``--out``. ``--resume CKPT`` continues a run from
its checkpoint at the recorded file offset: the continuation equals an uninterrupted run.

Settings: dataclass defaults < the ``[train_offline]`` table of ``--config`` (TrainerConfig
fields; ``[train_offline.model]`` for the model config; ``batch_size``, ``seq_len``,
``max_samples`` for the reader) < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
from pathlib import Path

from streamrec.config import ConfigError, build, load_section

logger = logging.getLogger(__name__)

DATA_KEYS = ("batch_size", "seq_len", "max_samples")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-offline", help="prequential (predict-then-train) pass over a samples file",
        description="One pass over a samples file in stream order; every minibatch is scored before it "
                    "is trained on. Writes metrics.json and checkpoint.pt into --out.")
    p.add_argument("--samples", required=True, metavar="FILE", help="samples file (streamrec build-samples)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--model", default=None, help="dumn | wide_deep | deepfm | dcn | din (default dumn)")
    p.add_argument("--objective", default=None, help="bce | clsd | valid_read | mtl | mtl_clsd (default bce)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default 256)")
    p.add_argument("--seq-len", type=int, default=None, help="behaviour sequence length T (default 100)")
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many messages (0 = all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.005)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (CUDA runs bf16 autocast)")
    p.add_argument("--window", type=int, default=None, help="sliding metric window in samples (default 10000)")
    p.add_argument("--curve-every", type=int, default=None, help="minibatches between curve points")
    p.add_argument("--clsd-alpha", type=float, default=None, help="CLSD alpha (eq. 4, default 1.0)")
    p.add_argument("--clsd-warmup-samples", type=int, default=None,
                   help="L_ori warm-up in samples (default: a third of the file)")
    p.add_argument("--no-clsd-local", action="store_true", help="CLSD without the AdGate local term (eq. 2)")
    p.add_argument("--item-buckets", type=int, default=None, help="hashed item table rows")
    p.add_argument("--user-buckets", type=int, default=None, help="hashed user table rows")
    p.add_argument("--no-fp", action="store_true", help="DUMN-FP: no orthogonal mapping")
    p.add_argument("--no-umn", action="store_true", help="DUMN-UMN: no memory network")
    p.add_argument("--one-memory", action="store_true", help="DUMN+UMN1: one memory for the four feedbacks")
    p.add_argument("--no-triplet", action="store_true", help="DUMN-TL: no triplet loss")
    p.add_argument("--concat-fusion", action="store_true", help="DUMN_CONCAT: concat instead of PAIR")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save the checkpoint every N minibatches (0: only at the end)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from this checkpoint")
    p.set_defaults(func=run)


def _model_config(name: str, heads: tuple[str, ...], section: dict, args: argparse.Namespace):
    from learner.config import EmbeddingConfig
    from learner.models import MODEL_CONFIGS
    emb = dict(section.pop("embedding", {}) or {})
    for key, flag in (("item_buckets", args.item_buckets), ("user_buckets", args.user_buckets)):
        if flag is not None:
            emb[key] = flag
    flags: dict = {"heads": heads}
    if name == "dumn":
        flags.update(use_fp=False if args.no_fp else None, use_umn=False if args.no_umn else None,
                     n_memories=1 if args.one_memory else None, use_triplet=False if args.no_triplet else None,
                     fusion="concat" if args.concat_fusion else None)
    elif args.no_fp or args.no_umn or args.one_memory or args.no_triplet or args.concat_fusion:
        raise ConfigError(f"DUMN ablation flags given for model {name!r}")
    cfg = build(MODEL_CONFIGS[name], {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}, flags)
    if emb:
        cfg = dataclasses.replace(cfg, embedding=build(EmbeddingConfig, dataclasses.asdict(cfg.embedding), emb))
    return cfg


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def run(args: argparse.Namespace) -> int:
    from learner import LearnerError
    from learner.checkpoint import load_checkpoint, require_seq_len, save_checkpoint
    from learner.config import CLSDConfig
    from learner.data import DataConfig, SampleLoader, count_frames
    from learner.trainer import Trainer, TrainerConfig
    from streamrec.alloc import apply_for_decoding

    apply_for_decoding()  # batches of decoded samples: keep freed memory warm (streamrec/alloc.py)
    section = dict(load_section(args.config, "train-offline"))
    model_section = dict(section.pop("model", {}) or {})
    data_section = {k: section.pop(k) for k in DATA_KEYS if k in section}
    clsd_section = dict(section.pop("clsd", {}) or {})
    samples = Path(args.samples)
    if not samples.is_file():
        print(f"streamrec train-offline: samples file {str(samples)!r} does not exist", file=sys.stderr)
        return 2
    resumed = None
    if args.resume:
        try:
            resumed = load_checkpoint(args.resume)
        except LearnerError as exc:
            print(f"streamrec train-offline: cannot resume: {exc}", file=sys.stderr)
            return 1
    try:
        n_file = count_frames(samples)
        clsd_flags = {"alpha": args.clsd_alpha, "warmup_samples": args.clsd_warmup_samples,
                      "use_local": False if args.no_clsd_local else None}
        if args.clsd_warmup_samples is None and "warmup_samples" not in clsd_section:
            # the default depends on the file and --max-samples, which may have grown since the
            # checkpoint: a resumed run keeps the warm-up it started with
            ck_clsd = (((resumed or {}).get("config") or {}).get("trainer") or {}).get("clsd") or {}
            max_s = args.max_samples if args.max_samples is not None else data_section.get("max_samples", 0)
            clsd_flags["warmup_samples"] = ck_clsd.get("warmup_samples",
                                                       (min(n_file, max_s) if max_s else n_file) // 3)
        clsd = build(CLSDConfig, clsd_section, clsd_flags)
        flags = {"model": args.model, "objective": args.objective, "seed": args.seed, "lr": args.lr,
                 "device": args.device, "window": args.window, "curve_every": args.curve_every}
        cfg = build(TrainerConfig, section, flags, {"clsd": clsd})
        model_cfg = _model_config(cfg.model, cfg.heads, model_section, args)
        data = {"batch_size": 256, "seq_len": 100, "max_samples": 0, **data_section}
        data.update({k: getattr(args, k) for k in DATA_KEYS if getattr(args, k) is not None})
        trainer = Trainer(cfg, model_cfg)
        if resumed is not None:
            try:
                require_seq_len(resumed, data["seq_len"], "the checkpoint")
                trainer.load_checkpoint_state(resumed)
            except LearnerError as exc:
                print(f"streamrec train-offline: cannot resume: {exc}", file=sys.stderr)
                return 1
        offset = trainer.source_offsets.get("offset_bytes", 0)
        done = trainer.source_offsets.get("messages", 0)
        if data["max_samples"] and done >= data["max_samples"]:
            print("streamrec train-offline: the checkpoint already covers --max-samples", file=sys.stderr)
            return 2
        dcfg = DataConfig(str(samples), batch_size=data["batch_size"], seq_len=data["seq_len"],
                          start_offset_bytes=offset,
                          max_samples=data["max_samples"] - done if data["max_samples"] else 0,
                          pin_memory=trainer.device.type == "cuda")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"

    def state_of(t: Trainer) -> dict:
        return {**t.checkpoint_state(), "seq_len": dcfg.seq_len}   # the T the scorer must build batches with

    def on_step(t: Trainer) -> None:
        if args.checkpoint_every and t.step % args.checkpoint_every == 0:
            save_checkpoint(ckpt, state_of(t))

    logger.info("train-offline start samples=%s messages=%d model=%s objective=%s seed=%d device=%s "
                "batch_size=%d resume_offset_bytes=%d", samples, n_file, cfg.model, cfg.objective, cfg.seed,
                trainer.device, dcfg.batch_size, offset)
    with SampleLoader(dcfg) as loader:  # a LearnerError ends in one line (streamrec.cli)
        result = trainer.run(loader, on_step=on_step)
    save_checkpoint(ckpt, state_of(trainer))
    report = {"command": " ".join(["streamrec", *sys.argv[1:]]) if sys.argv else "",
              "samples_file": str(samples), "data": dataclasses.asdict(dcfg), "config": result.config,
              "final": result.final, "samples_seen": result.samples_seen, "steps": result.steps,
              "n_rejected": result.n_rejected, "train_seconds": result.train_seconds,
              "samples_per_s": result.samples_per_s, "source_offsets": result.source_offsets,
              "curve": result.curve, "machine": f"python={platform.python_version()} {platform.platform()}"}
    (out / "metrics.json").write_text(json.dumps(_finite(report), indent=1) + "\n")
    f = result.final
    print(f"samples={result.samples_seen} steps={result.steps} rejected={result.n_rejected} "
          f"samples_per_s={result.samples_per_s:.1f} auc={f['cum_click_auc']:.4f} gauc={f['cum_click_gauc']:.4f} "
          f"logloss={f['cum_click_logloss']:.4f} vr_auc={f['cum_vr_auc']:.4f} out={out}")
    return 0
