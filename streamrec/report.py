"""Self-contained HTML run report for `make run`: inline SVG plots, no JavaScript, no external files.

The plots are drawn by the small helpers below (numpy only). Every piece of text that reaches the
page goes through `html.escape`, and the document is well-formed XML so tests can parse it.

>>> import tempfile, numpy as np
>>> d = RunReport(title="run", summary_lines=[], versions=[], joiner_counters={},
...               dwell_ms_of_clicks=np.array([]), x_l_ms=None, ndt_params=(60.0, 20.0, 1.0, 0.0),
...               throughput=[], lag=[])
>>> with tempfile.TemporaryDirectory() as tmp:
...     p = write_report(Path(tmp) / "r.html", d)
...     p.read_text().count("<figcaption>")
5
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RunReport", "write_report", "Scale"]

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 34, 48
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
AUC_KEYS = ("cum_click_auc", "cum_click_gauc", "window_click_auc")
NDT_T_MAX_S = 300.0


@dataclass
class RunReport:
    """Everything the run report shows; see `write_report`."""

    title: str
    summary_lines: list[str]
    versions: list[dict]
    joiner_counters: dict[str, int]
    dwell_ms_of_clicks: np.ndarray
    x_l_ms: float | None
    ndt_params: tuple[float, float, float, float]  # (offset_s, tau_s, A, B)
    throughput: list[tuple[float, float]]
    lag: list[tuple[float, int]]


def _esc(v: object) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: float) -> str:
    """Short tick label.

    >>> [_fmt(v) for v in (0, 0.25, 1000, 1e4, 2.5e6, 1e-4)]
    ['0', '0.25', '1000', '1e4', '2.5e6', '0.0001']
    """
    if v == 0:
        return "0"
    s = f"{v:.2g}" if abs(v) >= 1e5 or abs(v) < 1e-3 else f"{v:.4g}"
    return s.replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


class Scale:
    """Maps a data domain [lo, hi] onto pixels [a, b]; `log=True` maps log10 of the data.

    >>> Scale(0.0, 10.0, 100.0, 200.0)(5.0)
    150.0
    >>> Scale(1.0, 100.0, 0.0, 10.0, log=True)(10.0)
    5.0
    """

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False) -> None:
        if log and (lo <= 0 or hi <= 0):
            raise ValueError(f"log scale needs a positive domain, got lo={lo!r} hi={hi!r}")
        self.lo, self.hi, self.a, self.b, self.log = float(lo), float(hi), float(a), float(b), log
        self._l0 = math.log10(lo) if log else float(lo)
        self._l1 = math.log10(hi) if log else float(hi)
        if self._l1 == self._l0:
            self._l1 = self._l0 + 1.0

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else float(v)
        return self.a + (t - self._l0) / (self._l1 - self._l0) * (self.b - self.a)

    def ticks(self) -> list[float]:
        if self.log:
            return [10.0 ** k for k in range(math.ceil(self._l0 - 1e-9), math.floor(self._l1 + 1e-9) + 1)]
        return _nice_ticks(self.lo, self.hi)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _padded(lo: float, hi: float) -> tuple[float, float]:
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _text(x: float, y: float, s: object, anchor: str = "middle", size: int = 11, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_esc(v)}"' for k, v in attrs.items())
    return (f'<text x="{x:.2f}" y="{y:.2f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f"{_esc(s)}</text>")


def _axes(sx: Scale, sy: Scale, title: str, xlabel: str, ylabel: str,
          x_ticks: bool = True) -> list[str]:
    """Axis lines, ticks with labels, title and axis labels for one plot area."""
    x0, x1, y0, y1 = sx.a, sx.b, sy.a, sy.b  # y0 is the bottom (larger pixel value)
    out = [f'<line x1="{x0:.2f}" y1="{y0:.2f}" x2="{x1:.2f}" y2="{y0:.2f}" stroke="black"/>',
           f'<line x1="{x0:.2f}" y1="{y0:.2f}" x2="{x0:.2f}" y2="{y1:.2f}" stroke="black"/>']
    for t in sx.ticks() if x_ticks else []:
        px = sx(t)
        out.append(f'<line x1="{px:.2f}" y1="{y0:.2f}" x2="{px:.2f}" y2="{y0 + 5:.2f}" stroke="black"/>')
        out.append(_text(px, y0 + 17, _fmt(t)))
    for t in sy.ticks():
        py = sy(t)
        out.append(f'<line x1="{x0 - 5:.2f}" y1="{py:.2f}" x2="{x0:.2f}" y2="{py:.2f}" stroke="black"/>')
        out.append(f'<line x1="{x0:.2f}" y1="{py:.2f}" x2="{x1:.2f}" y2="{py:.2f}" stroke="#eee"/>')
        out.append(_text(x0 - 8, py + 4, _fmt(t), anchor="end"))
    out.append(_text(WIDTH / 2, 18, title, size=13, font_weight="bold"))
    out.append(_text((x0 + x1) / 2, HEIGHT - 8, xlabel))
    out.append(_text(14, (y0 + y1) / 2, ylabel, transform=f"rotate(-90 14 {(y0 + y1) / 2:.2f})"))
    return out


def _svg(parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">' + "".join(parts) + "</svg>")


def _x_range() -> tuple[float, float]:
    return LEFT, WIDTH - RIGHT


def _y_range() -> tuple[float, float]:
    return HEIGHT - BOTTOM, TOP


def _legend(names: list[str]) -> list[str]:
    out = []
    for i, name in enumerate(names):
        y = TOP + 6 + 14 * i
        out.append(f'<rect x="{WIDTH - RIGHT - 150}" y="{y - 8}" width="10" height="10" '
                   f'fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(_text(WIDTH - RIGHT - 135, y + 1, name, anchor="start", size=10))
    return out


def line_plot(series: list[tuple[str, np.ndarray, np.ndarray]], title: str, xlabel: str,
              ylabel: str, y_domain: tuple[float, float] | None = None) -> str | None:
    """One SVG with a polyline and markers per series; non-finite points are skipped.

    Returns None when no series has a finite point.
    """
    clean = []
    for name, xs, ys in series:
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        clean.append((name, xs[ok], ys[ok]))
    all_x = np.concatenate([c[1] for c in clean]) if clean else np.array([])
    all_y = np.concatenate([c[2] for c in clean]) if clean else np.array([])
    if all_x.size == 0:
        return None
    sx = Scale(*_padded(float(all_x.min()), float(all_x.max())), *_x_range())
    sy = Scale(*(y_domain or _padded(float(all_y.min()), float(all_y.max()))), *_y_range())
    parts = _axes(sx, sy, title, xlabel, ylabel)
    for i, (name, xs, ys) in enumerate(clean):
        color = COLORS[i % len(COLORS)]
        pts = " ".join(f"{sx(x):.2f},{sy(y):.2f}" for x, y in zip(xs, ys))
        if xs.size > 1:
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if xs.size <= 50:
            parts.extend(f'<circle cx="{sx(x):.2f}" cy="{sy(y):.2f}" r="2.5" fill="{color}"/>'
                         for x, y in zip(xs, ys))
    if len(clean) > 1:
        parts.extend(_legend([c[0] for c in clean]))
    return _svg(parts)


def bar_plot(labels: list[str], values: list[float], title: str, ylabel: str) -> str:
    """Vertical bars on a [0, 1] axis (rates and shares), each labelled with its value."""
    sy = Scale(0.0, 1.0, *_y_range())
    x0, x1 = _x_range()
    sx = Scale(0.0, float(max(len(values), 1)), x0, x1)
    parts = _axes(sx, sy, title, "", ylabel, x_ticks=False)
    slot = (x1 - x0) / max(len(values), 1)
    for i, (lab, v) in enumerate(zip(labels, values)):
        bx = x0 + i * slot + slot * 0.2
        h = sy.a - sy(min(max(v, 0.0), 1.0)) if math.isfinite(v) else 0.0
        parts.append(f'<rect x="{bx:.2f}" y="{sy.a - h:.2f}" width="{slot * 0.6:.2f}" '
                     f'height="{h:.2f}" fill="{COLORS[i % len(COLORS)]}"/>')
        parts.append(_text(bx + slot * 0.3, sy.a - h - 4, f"{v:.1%}" if math.isfinite(v) else "n/a"))
        parts.append(_text(bx + slot * 0.3, sy.a + 30, lab, size=10))
    return _svg(parts)


def dwell_scale(dwell_ms: np.ndarray, x_l_ms: float | None) -> Scale | None:
    """The log-x scale of the dwell histogram (decade-aligned), or None when there is nothing to plot."""
    d = np.asarray(dwell_ms, dtype=float)
    d = d[np.isfinite(d) & (d > 0)]
    if d.size == 0:
        return None
    lo, hi = float(d.min()), float(d.max())
    if x_l_ms is not None and math.isfinite(x_l_ms) and x_l_ms > 0:
        lo, hi = min(lo, x_l_ms), max(hi, x_l_ms)
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if k1 == k0:
        k1 += 1
    return Scale(10.0 ** k0, 10.0 ** k1, *_x_range(), log=True)


def dwell_histogram(dwell_ms: np.ndarray, x_l_ms: float | None, n_bins: int = 30) -> str | None:
    """Histogram of dwell (ms) on a log-x axis with a labelled vertical line at x_l."""
    sx = dwell_scale(dwell_ms, x_l_ms)
    if sx is None:
        return None
    d = np.asarray(dwell_ms, dtype=float)
    d = d[np.isfinite(d) & (d > 0)]
    edges = np.linspace(math.log10(sx.lo), math.log10(sx.hi), n_bins + 1)  # (n_bins + 1,)
    counts, _ = np.histogram(np.log10(d), bins=edges)  # (n_bins,)
    sy = Scale(0.0, float(max(counts.max(), 1)) * 1.1, *_y_range())
    parts = _axes(sx, sy, "Dwell of clicks", "dwell (ms, log scale)", "clicks")
    for c, e0, e1 in zip(counts, edges[:-1], edges[1:]):
        if c == 0:
            continue
        px0, px1 = sx(10.0 ** e0), sx(10.0 ** e1)
        parts.append(f'<rect x="{px0:.2f}" y="{sy(c):.2f}" width="{max(px1 - px0 - 1, 0.5):.2f}" '
                     f'height="{sy.a - sy(c):.2f}" fill="{COLORS[0]}"/>')
    if x_l_ms is not None and math.isfinite(x_l_ms) and x_l_ms > 0:
        px = sx(x_l_ms)
        parts.append(f'<line class="x-l" x1="{px:.2f}" y1="{sy.a:.2f}" x2="{px:.2f}" y2="{sy.b:.2f}" '
                     f'stroke="{COLORS[1]}" stroke-width="2" stroke-dasharray="5,3"/>')
        parts.append(_text(px + 4, sy.b + 12, f"x_l = {x_l_ms:.0f} ms", anchor="start",
                           fill=COLORS[1]))
    return _svg(parts)


def ndt_curve(params: tuple[float, float, float, float]) -> str | None:
    """T_N(T) = A / (1 + exp(-(T - offset) / tau)) - B over 0..300 s, with the offset marked."""
    offset_s, tau_s, a, b = (float(p) for p in params)
    if not all(math.isfinite(p) for p in (offset_s, tau_s, a, b)) or tau_s <= 0:
        return None
    t = np.linspace(0.0, NDT_T_MAX_S, 301)  # (301,)
    with np.errstate(over="ignore"):
        tn = a / (1.0 + np.exp(-(t - offset_s) / tau_s)) - b  # (301,)
    svg = line_plot([("T_N", t, tn)], "Normalized dwell time T_N(T)", "dwell T (s)", "T_N")
    if svg is None or not 0.0 <= offset_s <= NDT_T_MAX_S:
        return svg
    sx = Scale(0.0, NDT_T_MAX_S, *_x_range())
    px = sx(offset_s)
    mark = (f'<line class="offset" x1="{px:.2f}" y1="{HEIGHT - BOTTOM}" x2="{px:.2f}" y2="{TOP}" '
            f'stroke="{COLORS[1]}" stroke-dasharray="4,3"/>'
            + _text(px + 4, TOP + 12, f"offset = {offset_s:g} s", anchor="start", fill=COLORS[1]))
    return svg[: -len("</svg>")] + mark + "</svg>"


def _note(msg: str) -> str:
    return f'<p class="no-data">{_esc(msg)}</p>'


def _figure(body: str, caption: str) -> str:
    return f"<figure>{body}<figcaption>{_esc(caption)}</figcaption></figure>\n"


def _num(x: object) -> float:
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _metric(v: dict, key: str) -> float:
    return _num((v.get("metrics") or {}).get(key))


def _auc_figure(versions: list[dict]) -> str:
    xs = np.array([_num(v.get("samples_seen")) for v in versions])
    series = [(k, xs, np.array([_metric(v, k) for v in versions])) for k in AUC_KEYS]
    svg = line_plot(series, "Click AUC / GAUC per published version", "samples seen", "AUC")
    body = svg or _note("no data: no published versions with finite AUC")
    return _figure(body, "Prequential click AUC (cumulative, windowed) and GAUC at each published "
                         "model version; versions with a missing metric are skipped for that line.")


def _rate(num: int | None, den: int | None) -> float:
    return num / den if num is not None and den else math.nan


def _rule_figure(c: dict[str, int]) -> str:
    vr = c.get("valid_read")
    labels = ["valid_read / clicked", "rule_t1 / valid_read", "rule_t2 / valid_read",
              "rule_t3 / valid_read"]
    values = [_rate(vr, c.get("clicked"))] + [_rate(c.get(k), vr) for k in ("rule_t1", "rule_t2",
                                                                              "rule_t3")]
    if not any(math.isfinite(v) for v in values):
        body = _note("no data: no clicked samples counted")
    else:
        body = bar_plot(labels, values, "Valid-read rate and rule shares", "fraction")
    return _figure(body, "Share of clicks judged valid reads, and which rule (T1 dwell threshold, "
                         "T2, T3) decided each valid read.")


def _throughput_figure(throughput: list, lag: list) -> str:
    parts = []
    for pts, title, ylabel in ((lag, "Consumer lag", "lag (samples)"),
                               (throughput, "Training throughput", "samples / s")):
        arr = np.asarray(pts, dtype=float).reshape(-1, 2)  # (N, 2)
        svg = line_plot([(ylabel, arr[:, 0], arr[:, 1])], title, "seconds since start", ylabel)
        parts.append(svg or _note(f"no data: {title.lower()}"))
    return _figure("".join(parts), "Consumer lag and samples trained per second over the run.")


def _counters_table(c: dict[str, int]) -> str:
    if not c:
        return _note("no data: no joiner counters")
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in c.items())
    return f"<table><tr><th>counter</th><th>value</th></tr>{rows}</table>\n"


_CSS = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}figure{margin:1.5em 0}"
        "figcaption{font-size:0.9em;color:#444}.no-data{color:#a00;font-style:italic}"
        "td,th{padding:2px 10px;text-align:left}pre{background:#f6f6f6;padding:1em}")


def render(data: RunReport) -> str:
    """The whole report as one HTML string (also well-formed XML)."""
    dwell_svg = dwell_histogram(data.dwell_ms_of_clicks, data.x_l_ms)
    ndt_svg = ndt_curve(data.ndt_params)
    x_l = "unknown" if data.x_l_ms is None else f"{data.x_l_ms:.0f} ms"
    off, tau, a, b = data.ndt_params
    body = [
        f"<h1>{_esc(data.title)}</h1>\n",
        "<pre>" + _esc("\n".join(data.summary_lines)) + "</pre>\n",
        _auc_figure(data.versions),
        _rule_figure(data.joiner_counters),
        _figure(dwell_svg or _note("no data: no clicks with positive dwell"),
                f"Dwell of clicked samples (log x); the dashed line is the valid-read T1 "
                f"threshold x_l = exp(mu - sigma) = {x_l}."),
        _figure(ndt_svg or _note("no data: NDT parameters not usable"),
                f"Normalized dwell time curve, offset = {off:g} s, tau = {tau:g} s, A = {a:g}, "
                f"B = {b:g}."),
        _throughput_figure(data.throughput, data.lag),
        "<h2>Joiner counters</h2>\n",
        _counters_table(data.joiner_counters),
    ]
    return ('<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head>'
            f'<meta charset="utf-8"/><title>{_esc(data.title)}</title><style>{_CSS}</style></head>'
            "<body>\n" + "".join(body) + "</body></html>\n")


def write_report(path: str | Path, data: RunReport) -> Path:
    """Write the report to `path` (parents created) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render(data), encoding="utf-8")
    return p
