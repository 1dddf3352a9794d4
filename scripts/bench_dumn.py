"""Training throughput of DUMN at its paper defaults on synthetic batches.

One training step = (host -> device copy on CUDA) + forward (memory write included) + BCE + triplet
loss + backward + Adam step. Prints the machine, the exact command, and per batch size the median
step time over the timed steps after warm-up and the samples/s it implies. Synthetic batches only:
the figures measure compute, not model quality.

    .venv/bin/python scripts/bench_dumn.py --batch-sizes 256 4096 --steps 5 --warmup 2
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch

from learner.config import DUMNConfig, EmbeddingConfig
from learner.models import build_model
from learner.objectives import BCEObjective
from learner.synthetic import synthetic_batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--seq-len", type=int, default=100, help="T (paper: 100)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, then CUDA (bf16 autocast, pinned memory) when a GPU is present")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--item-buckets", type=int, default=EmbeddingConfig().item_buckets)
    p.add_argument("--user-buckets", type=int, default=EmbeddingConfig().user_buckets)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adam", choices=["fused", "foreach"], default="fused",
                   help="Adam implementation (the trainer uses fused)")
    return p.parse_args(argv)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"python={platform.python_version()} torch={torch.__version__} platform={platform.platform()} "
            f"cpu={platform.processor() or platform.machine()} cores={os.cpu_count()} "
            f"torch_threads={torch.get_num_threads()} gpu={gpu}")


def bench_one(batch_size: int, device: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    cfg = DUMNConfig(embedding=EmbeddingConfig(item_buckets=args.item_buckets, user_buckets=args.user_buckets))
    model = build_model("dumn", cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.005, **({"fused": True} if args.adam == "fused" else {}))
    objective = BCEObjective()
    cuda = device == "cuda"
    host = [synthetic_batch(batch_size, args.seq_len, seed=args.seed + i, start_sample_id=i * batch_size)
            for i in range(3)]
    if cuda:
        host = [b.pin_memory() for b in host]
    times = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = host[step % len(host)].to(device, non_blocking=True) if cuda else host[step % len(host)]
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            out = model(batch)
            loss = objective(out, batch).loss + out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}: {loss.item()}")
    med = statistics.median(times)
    return {"median_step_s": med, "samples_per_s": batch_size / med, "min_step_s": min(times),
            "max_step_s": max(times)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is available")
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    cfg = DUMNConfig()
    print(f"machine: {machine()}")
    print(f"command: {sys.executable} {' '.join(sys.argv)}")
    print(f"model: DUMN T={args.seq_len} E={cfg.embedding.dim} m={cfg.n_slots} Z={cfg.slot_dim} "
          f"ffn={cfg.controller_dim} heads={cfg.n_heads} item_buckets={args.item_buckets} "
          f"user_buckets={args.user_buckets} optimizer=Adam(lr=0.005,{args.adam}) warmup={args.warmup} steps={args.steps}")
    for device in devices:
        for bs in args.batch_sizes:
            r = bench_one(bs, device, args)
            mode = "cuda bf16-autocast pinned" if device == "cuda" else "cpu fp32"
            print(f"device={device} mode=\"{mode}\" batch_size={bs} median_step_s={r['median_step_s']:.4f} "
                  f"min_step_s={r['min_step_s']:.4f} max_step_s={r['max_step_s']:.4f} "
                  f"samples_per_s={r['samples_per_s']:.1f}", flush=True)


if __name__ == "__main__":
    main()
