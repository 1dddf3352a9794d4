"""Run the result grid of issue 4 on a samples file and write its tables into docs/results.md.

Parts: (a) every backbone with BCE and with CLSD; (b) DUMN against the baselines (the BCE rows of
(a)); (c) click-only vs valid-read vs valid-read + NDT (and + CLSD), judged by valid-read AUC;
(d) DUMN ablations; (e) the CLSD alpha sweep 0, 0.25, ..., 1.25; and, on request, (g) CLSD without
the AdGate local term. Every cell is one
``streamrec train-offline`` process per seed (the exact command is in the table, ``{seed}`` and
``{out}`` stand for the seed and the cell's output directory); a cell whose ``metrics.json`` exists
is not run again, so an interrupted grid resumes. Tables report mean ± sample std over the seeds
of the cumulative prequential metrics. The tables go between ``<!-- results:LABEL -->`` markers
in ``--doc`` (replaced on every run; text outside the markers is kept).

    .venv/bin/python scripts/run_results.py --samples runs/samples/slice.bin --label slice --jobs 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("dumn", "wide_deep", "deepfm", "dcn", "din")
ABLATIONS = (("DUMN", ()), ("DUMN-FP", ("--no-fp",)), ("DUMN-UMN", ("--no-umn",)),
             ("DUMN+UMN1", ("--one-memory",)), ("DUMN-TL", ("--no-triplet",)), ("DUMN_CONCAT", ("--concat-fusion",)))
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
METRICS = (("AUC", "cum_click_auc"), ("GAUC", "cum_click_gauc"), ("logloss", "cum_click_logloss"),
           ("VR AUC", "cum_vr_auc"), ("VR GAUC", "cum_vr_gauc"))


@dataclass(frozen=True)
class Cell:
    part: str
    name: str
    model: str
    objective: str
    flags: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        # no part in the key: the same run (e.g. DUMN with BCE in (a) and (d)) is made once
        return "_".join([self.model, self.objective, *[f.strip("-").replace("-", "") for f in self.flags]])


def grid(parts: str, c_model: str, d_quick: bool, e_model: str, quick: bool) -> list[Cell]:
    cells: list[Cell] = []
    backbones = ("dumn", "deepfm") if quick else BACKBONES
    if "a" in parts or "b" in parts:
        for m in backbones:
            for obj in ("bce", "clsd"):
                cells.append(Cell("a", f"{m} {obj}", m, obj))
    if "g" in parts:   # CLSD without the AdGate local term (eq. 2 only): separates the global and local parts
        for m in backbones:
            cells.append(Cell("g", f"{m} clsd global only", m, "clsd", ("--no-clsd-local",)))
    if "c" in parts:
        for obj in ("bce", "valid_read", "mtl", "mtl_clsd"):
            cells.append(Cell("c", f"{c_model} {obj}", c_model, obj))
    if "d" in parts:
        for name, flags in (ABLATIONS[:3] if d_quick or quick else ABLATIONS):
            cells.append(Cell("d", name, "dumn", "bce", flags))
    if "e" in parts:
        for a in ((0.0, 1.0) if quick else ALPHAS):
            cells.append(Cell("e", f"alpha={a:g}", e_model, "clsd", ("--clsd-alpha", f"{a:g}")))
    return cells


def command(cell: Cell, args: argparse.Namespace, seed: str, out: str) -> list[str]:
    cmd = ["streamrec", "--log-level", "WARNING", "train-offline", "--samples", args.samples, "--out", out,
           "--model", cell.model, "--objective", cell.objective, "--batch-size", str(args.batch_size),
           "--seed", seed, "--device", args.device, *cell.flags]
    if args.max_samples:
        cmd += ["--max-samples", str(args.max_samples)]
    return cmd


def run_one(cell: Cell, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out_dir) / cell.key / f"seed{seed}"
    metrics = out / "metrics.json"
    if not metrics.exists():
        cmd = command(cell, args, str(seed), str(out))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "streamrec.cli", *cmd[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cell.key} seed {seed} failed:\n{proc.stderr[-3000:]}")
        print(f"done {cell.key} seed={seed} in {time.time() - t0:.0f}s: {proc.stdout.strip()}", flush=True)
        ckpt = out / "checkpoint.pt"
        if ckpt.exists() and not args.keep_checkpoints:
            ckpt.unlink()
    return json.loads(metrics.read_text())


def mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def _mean(rows: list[dict], key: str) -> float:
    vals = [r["final"].get(key) for r in rows]
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else math.nan


def table(cells: list[Cell], results: dict[str, list[dict]], args, metrics=METRICS, extra=None) -> list[str]:
    head = "| cell | " + " | ".join(m for m, _ in metrics) + (" | " + extra[0] if extra else "") + \
        " | samples/s | command |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for cell in cells:
        rows = results[cell.key]
        vals = [mean_std([r["final"].get(k) for r in rows]) for _, k in metrics]
        sps = statistics.mean(r["samples_per_s"] for r in rows)
        cmd = " ".join(shlex.quote(c) for c in command(cell, args, "{seed}", f"{args.out_dir}/{cell.key}/seed{{seed}}"))
        ext = [extra[1](cell)] if extra else []
        lines.append(f"| {cell.name} | " + " | ".join(vals + ext) + f" | {sps:.0f} | `{cmd}` |")
    return lines


def render(cells: list[Cell], results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    first = next(iter(results.values()))[0]
    n = first["samples_seen"]
    out = [f"### Samples file `{args.samples}` ({n} samples), seeds {args.seeds}",
           "",
           f"Generated by `{' '.join(shlex.quote(a) for a in [sys.executable.replace(str(ROOT) + '/', ''), *sys.argv])}`; "
           f"batch size {args.batch_size}, device {args.device}, {args.threads} thread(s) per run. Metrics are "
           "cumulative over the whole prequential pass (every sample scored before it was trained on): "
           "click AUC / GAUC / logloss of the served score, and AUC / GAUC of the same score against the "
           "valid-read label (VR). mean ± sample std over the seeds.",
           ""]
    by_part = {p: [c for c in cells if c.part == p] for p in "agcde"}
    if by_part["a"]:
        out += ["#### (a) each backbone with and without CLSD", ""]
        def lift(cell: Cell) -> str:
            if cell.objective != "clsd":
                return ""
            base = results[Cell("a", "", cell.model, "bce").key]
            d = _mean(results[cell.key], "cum_click_auc") - _mean(base, "cum_click_auc")
            return f"{d:+.4f} ({100 * d / _mean(base, 'cum_click_auc'):+.2f}%)"
        out += table(by_part["a"], results, args, extra=("CLSD − BCE AUC", lift)) + [""]
        bce = [c for c in by_part["a"] if c.objective == "bce"]
        baselines = [c for c in bce if c.model != "dumn"]
        if any(c.model == "dumn" for c in bce) and baselines:
            best = max(baselines, key=lambda c: _mean(results[c.key], "cum_click_auc"))
            dumn = _mean(results[Cell("a", "", "dumn", "bce").key], "cum_click_auc")
            b = _mean(results[best.key], "cum_click_auc")
            out += ["#### (b) DUMN against the baselines (BCE rows of (a))", "",
                    f"Best baseline by mean AUC: {best.model} ({b:.4f}). DUMN: {dumn:.4f}, "
                    f"difference {dumn - b:+.4f} ({100 * (dumn - b) / b:+.2f}%).", ""]
    if by_part["g"]:
        out += ["#### (a') CLSD without AdGate (global self-distillation, eq. 2, alpha 1)", ""]
        def lift_g(cell: Cell) -> str:
            base = results.get(Cell("a", "", cell.model, "bce").key)
            if not base:
                return ""
            d = _mean(results[cell.key], "cum_click_auc") - _mean(base, "cum_click_auc")
            return f"{d:+.4f} ({100 * d / _mean(base, 'cum_click_auc'):+.2f}%)"
        out += table(by_part["g"], results, args, extra=("− BCE AUC", lift_g)) + [""]
    if by_part["c"]:
        out += [f"#### (c) click-only vs valid-read vs valid-read + NDT ({by_part['c'][0].model}), "
                "judged by valid-read AUC", ""]
        out += table(by_part["c"], results, args, metrics=(("VR AUC", "cum_vr_auc"), ("VR GAUC", "cum_vr_gauc"),
                                                            ("click AUC", "cum_click_auc"))) + [""]
    if by_part["d"]:
        out += ["#### (d) DUMN ablations (BCE)", ""] + table(by_part["d"], results, args) + [""]
    if by_part["e"]:
        out += [f"#### (e) CLSD alpha sweep ({by_part['e'][0].model})", ""] + table(by_part["e"], results, args) + [""]
    return "\n".join(out)


def write_doc(path: Path, label: str, text: str) -> None:
    begin, end = f"<!-- results:{label} begin -->", f"<!-- results:{label} end -->"
    doc = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", required=True, help="samples file (streamrec build-samples)")
    p.add_argument("--label", required=True, help="name of this grid's block in the doc")
    p.add_argument("--parts", default="abcde", help="subset of 'abcdeg' (g: CLSD without AdGate)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-samples", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--c-model", default="dumn", help="backbone of part (c)")
    p.add_argument("--e-model", default="dumn", help="backbone of part (e)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--quick", action="store_true", help="reduced grid: dumn + deepfm, 3 ablations, alpha 0 and 1")
    p.add_argument("--out-dir", default=None, help="default runs/results/LABEL")
    p.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--keep-checkpoints", action="store_true")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or f"runs/results/{args.label}"
    cells = grid(args.parts, args.c_model, False, args.e_model, args.quick)
    jobs = [(c, s) for c in cells for s in args.seeds]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda cs: (cs[0].key, run_one(cs[0], cs[1], args)), jobs))
    results: dict[str, list[dict]] = {}
    for key, res in done:
        results.setdefault(key, []).append(res)
    write_doc(Path(args.doc), args.label, render(cells, results, args))
    print(f"wrote {len(cells)} cells x {len(args.seeds)} seeds into {args.doc} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
