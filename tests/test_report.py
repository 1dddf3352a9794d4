import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from streamrec.report import RunReport, Scale, dwell_scale, write_report

SVG = "{http://www.w3.org/2000/svg}"
XHTML = "{http://www.w3.org/1999/xhtml}"


def _full(**over) -> RunReport:
    rng = np.random.default_rng(0)
    data = dict(
        title="run <smoke> & co",
        summary_lines=["samples=1000 clicked=120", "final cum_click_auc=0.71"],
        versions=[
            {"version": i, "samples_seen": 1000 * (i + 1), "created_at_ms": 1_700_000_000_000 + i,
             "metrics": {"cum_click_auc": 0.6 + 0.01 * i, "cum_click_gauc": 0.55 + 0.01 * i,
                         "window_click_auc": 0.62, "cum_vr_auc": 0.58}}
            for i in range(5)
        ],
        joiner_counters={"samples": 1000, "clicked": 120, "valid_read": 80, "rule_t1": 50,
                         "rule_t2": 20, "rule_t3": 10, "late": 3, "orphan": 1, "duplicate": 0,
                         "dead_letter": 0},
        dwell_ms_of_clicks=rng.lognormal(mean=9.0, sigma=1.0, size=500),
        x_l_ms=math.exp(8.0),
        ndt_params=(60.0, 20.0, 1.2, 0.1),
        throughput=[(float(t), 500.0 + t) for t in range(0, 60, 5)],
        lag=[(float(t), 100 - t) for t in range(0, 60, 5)],
    )
    data.update(over)
    return RunReport(**data)


def _write(tmp_path, data: RunReport) -> tuple[str, ET.Element]:
    text = write_report(tmp_path / "sub" / "report.html", data).read_text()
    return text, ET.fromstring(text)


def _svgs(root: ET.Element) -> list[ET.Element]:
    return list(root.iter(f"{SVG}svg"))


def test_full_report_is_well_formed_with_five_figures(tmp_path):
    data = _full()
    text, root = _write(tmp_path, data)
    assert text.count("<svg") == text.count("</svg>") == 6  # lag and throughput are two panels
    assert len(list(root.iter(f"{XHTML}figcaption"))) == 5
    assert root.find(f"{XHTML}head/{XHTML}title").text == data.title
    pre = root.find(f"{XHTML}body/{XHTML}pre").text
    assert pre.splitlines() == data.summary_lines
    assert "no data" not in text
    assert "<script" not in text
    for svg in _svgs(root):
        assert svg.find(f"{SVG}text") is not None  # title and tick labels
        assert svg.find(f"{SVG}line") is not None  # axes
    titles = [t.text for svg in _svgs(root) for t in svg.iter(f"{SVG}text")]
    assert "Dwell of clicks" in titles and "Normalized dwell time T_N(T)" in titles


def test_x_l_line_at_scale_position(tmp_path):
    data = _full()
    _, root = _write(tmp_path, data)
    lines = [ln for svg in _svgs(root) for ln in svg.iter(f"{SVG}line") if ln.get("class") == "x-l"]
    assert len(lines) == 1
    sx = dwell_scale(data.dwell_ms_of_clicks, data.x_l_ms)
    assert float(lines[0].get("x1")) == pytest.approx(sx(data.x_l_ms), abs=0.01)
    assert sx.a <= float(lines[0].get("x1")) <= sx.b
    assert any("x_l = 2981 ms" == (t.text or "") for svg in _svgs(root) for t in svg.iter(f"{SVG}text"))


def test_scale_linear_and_log():
    assert Scale(0, 10, 100, 200)(2.5) == pytest.approx(125)
    s = Scale(10, 10_000, 0, 300, log=True)
    assert s(100) == pytest.approx(100)
    assert s.ticks() == [10, 100, 1000, 10_000]
    with pytest.raises(ValueError):
        Scale(0, 10, 0, 1, log=True)


def test_ndt_offset_marked(tmp_path):
    _, root = _write(tmp_path, _full(ndt_params=(75.0, 10.0, 1.0, 0.0)))
    marks = [ln for svg in _svgs(root) for ln in svg.iter(f"{SVG}line") if ln.get("class") == "offset"]
    assert len(marks) == 1
    assert float(marks[0].get("x1")) == pytest.approx(Scale(0, 300, 64, 540)(75.0), abs=0.01)


def test_summary_and_title_are_escaped(tmp_path):
    data = _full(summary_lines=["<script>alert(1)</script>", "a & b"], title="<script>x</script>",
                 joiner_counters={"<script>": 1, "clicked": 2, "valid_read": 1})
    text, root = _write(tmp_path, data)
    assert "<script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert root.find(f"{XHTML}body/{XHTML}pre").text.splitlines() == data.summary_lines


def test_nan_metrics_are_skipped(tmp_path):
    versions = _full().versions
    versions[1]["metrics"]["cum_click_auc"] = float("nan")
    versions[2]["metrics"]["cum_click_auc"] = None
    del versions[3]["metrics"]["window_click_auc"]
    text, root = _write(tmp_path, _full(versions=versions))
    assert "nan" not in text.lower().replace("nanosecond", "")
    auc_svg = _svgs(root)[0]
    polylines = list(auc_svg.iter(f"{SVG}polyline"))
    n_points = [len(p.get("points").split()) for p in polylines]
    assert n_points == [3, 5, 4]  # cum_click_auc, cum_click_gauc, window_click_auc
    for p in polylines:
        for xy in p.get("points").split():
            assert all(math.isfinite(float(v)) for v in xy.split(","))


def test_all_metrics_nan_gives_no_data(tmp_path):
    versions = [{"version": 0, "samples_seen": 10, "created_at_ms": 0,
                 "metrics": {k: float("nan") for k in ("cum_click_auc", "cum_click_gauc")}}]
    text, _ = _write(tmp_path, _full(versions=versions))
    assert "no data: no published versions with finite AUC" in text


@pytest.mark.parametrize(
    "over, note",
    [
        ({"versions": []}, "no data: no published versions"),
        ({"joiner_counters": {}}, "no data: no clicked samples counted"),
        ({"joiner_counters": {"clicked": 0, "valid_read": 0}}, "no data: no clicked samples counted"),
        ({"dwell_ms_of_clicks": np.array([])}, "no data: no clicks with positive dwell"),
        ({"dwell_ms_of_clicks": np.array([0.0, -1.0, np.nan])}, "no data: no clicks with positive dwell"),
        ({"ndt_params": (60.0, 0.0, 1.0, 0.0)}, "no data: NDT parameters not usable"),
        ({"throughput": []}, "no data: training throughput"),
        ({"lag": []}, "no data: consumer lag"),
    ],
)
def test_empty_inputs_give_no_data_notes(tmp_path, over, note):
    text, root = _write(tmp_path, _full(**over))
    assert note in text
    assert len(list(root.iter(f"{XHTML}figcaption"))) == 5
    assert text.count("<svg") == text.count("</svg>")


def test_everything_empty(tmp_path):
    data = RunReport(title="", summary_lines=[], versions=[], joiner_counters={},
                     dwell_ms_of_clicks=np.array([]), x_l_ms=None,
                     ndt_params=(float("nan"), 1.0, 1.0, 0.0), throughput=[], lag=[])
    text, root = _write(tmp_path, data)
    assert len(list(root.iter(f"{XHTML}figcaption"))) == 5
    assert "<svg" not in text
    assert len(re.findall(r'class="no-data"', text)) == 7  # 4 figures + 2 panels + counters


def test_x_l_none_draws_histogram_without_line(tmp_path):
    text, root = _write(tmp_path, _full(x_l_ms=None))
    assert 'class="x-l"' not in text
    assert "Dwell of clicks" in text


def test_single_point_series_do_not_crash(tmp_path):
    data = _full(versions=_full().versions[:1], throughput=[(0.0, 5.0)], lag=[(0.0, 0)],
                 dwell_ms_of_clicks=np.array([1000.0]))
    text, _ = _write(tmp_path, data)
    assert text.count("<svg") == 6


def test_module_doctests():
    import doctest

    import streamrec.report as report_module

    assert doctest.testmod(report_module).failed == 0
