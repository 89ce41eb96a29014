"""Self-contained ``report.html`` for a run or a sweep: tables, ROC / PR curves as inline SVG, heatmap gallery.

Opens from disk: inline CSS, images as base64 data URIs, curves drawn here as SVG; no script, no network.
Numbers from random weights or from a subset of categories are flagged next to any published numbers.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmad.metrics.names import METRIC_NAMES
from vlmad.metrics.published import PUBLISHED, lookup
from vlmad.metrics.table import MEAN_ROW, coverage_notes, percent, read_csv
from vlmad.outputs.columns import GROUP_FIELDS, cell, display_columns
from vlmad.outputs.heatmaps import PANEL_REASONS

REPORT = "report.html"
SHOWN = (*METRIC_NAMES, "pixel_aupro_legacy")
KSHOT_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}table.sweep{font-size:.85em}table.sweep td{white-space:nowrap}
small.paper{color:#666}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.mean{font-weight:bold;background:#f3f3f3}tr.paper{color:#666}
.flag{background:#c00;color:#fff;font-weight:bold;padding:2px 6px;border-radius:3px}
.note{color:#555;font-size:.9em}.curves{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figure.panel{margin:0 0 1.5em}figcaption{font-size:.85em;color:#444}
img.panel{max-width:100%;border:1px solid #ddd}
"""


# ------------------------------------------------------------------------------------------------ helpers
def _esc(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return percent(value, std)


def _page(title: str, body: list[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a browser never opens a half-written report
    return path


def flags(pretrained: Any, categories: Any, published: Any = None) -> list[str]:
    """Loud warnings for numbers that must not be read as method quality or as comparable to a paper's mean.

    Args:
        pretrained: the backbone's weights tag (None / "None": random weights).
        categories: the explicit category list of the run (None: the dataset's full set).
        published: the run's ``published`` id, if any.

    Returns:
        Flag texts (empty when none apply).
    """
    out = []
    if pretrained in (None, "None", "null", ""):
        out.append("RANDOM WEIGHTS: pipeline check, not method quality")
    if categories not in (None, "None", "", []):
        names = categories if isinstance(categories, str) else ",".join(map(str, categories))
        full = PUBLISHED[published].per_category if published in PUBLISHED else {}
        if not full or set(names.split(",")) != set(full):
            out.append(f"SUBSET OF CATEGORIES ({names}): a paper mean covers the full dataset")
    return out


def _flag_html(texts: Sequence[str]) -> str:
    return " ".join(f'<span class="flag">{_esc(t)}</span>' for t in texts)


# ------------------------------------------------------------------------------------------------- curves
def roc_pr_points(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC and PR curves of image scores (one point per distinct score, ties together).

    Args:
        scores: (N,) image scores.
        labels: (N,) 1 = anomalous.

    Returns:
        fpr (M+1,), tpr (M+1,) from (0, 0); precision (M,) at recall = tpr[1:].
    """
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(labels, np.float64)[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    pos, neg = max(y.sum(), 1.0), max((1 - y).sum(), 1.0)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], tp / np.maximum(tp + fp, 1.0)


def svg_plot(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float] = (0.0, 1.0),
    ylim: tuple[float, float] = (0.0, 1.0),
    errors: Sequence[Sequence[float] | None] | None = None,
    diagonal: bool = False,
    xticks: Sequence[float] | None = None,
) -> str:
    """An inline SVG line plot with axes, ticks and a legend.

    Args:
        series: (name, xs, ys) per line.
        title: drawn above the plot.
        xlabel: x axis label.
        ylabel: y axis label.
        xlim: x range.
        ylim: y range.
        errors: optional ± error per point of each series (error bars).
        diagonal: draw the chance diagonal (ROC).
        xticks: the x tick values (e.g. the integer k of a k-shot curve); None: five evenly spaced ticks.

    Returns:
        ``<svg ...>...</svg>``.
    """
    w, h, left, bottom, top, right = 300, 250, 42, 36, 22, 10
    pw, ph = w - left - right, h - top - bottom

    def px(x: float) -> float:
        return left + pw * (x - xlim[0]) / ((xlim[1] - xlim[0]) or 1.0)

    def py(y: float) -> float:
        return top + ph * (1 - (y - ylim[0]) / ((ylim[1] - ylim[0]) or 1.0))

    parts = [
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><title>{_esc(title)}</title>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>',
        f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="12">{_esc(title)}</text>',
        f'<text x="{left + pw / 2}" y="{h - 4}" text-anchor="middle" font-size="11">{_esc(xlabel)}</text>',
        f'<text x="11" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 11 {top + ph / 2})">{_esc(ylabel)}</text>',
    ]
    ticks = list(xticks) if xticks is not None else [xlim[0] + i * (xlim[1] - xlim[0]) / 4 for i in range(5)]
    for xv in ticks:
        parts.append(f'<text x="{px(xv):.1f}" y="{top + ph + 12}" font-size="9" text-anchor="middle">{xv:g}</text>')
    for i in range(5):
        yv = ylim[0] + i * (ylim[1] - ylim[0]) / 4
        parts.append(f'<text x="{left - 3}" y="{py(yv) + 3:.1f}" font-size="9" text-anchor="end">{yv:.2g}</text>')
    if diagonal:
        parts.append(f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#bbb" stroke-dasharray="4"/>')
    for k, (name, xs, ys) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        for j, err in enumerate((errors[k] if errors else None) or []):
            if err is not None and not math.isnan(err):
                x, y = px(xs[j]), ys[j]
                parts.append(
                    f'<line x1="{x:.1f}" y1="{py(y - err):.1f}" x2="{x:.1f}" y2="{py(y + err):.1f}" stroke="{colour}"/>'
                )
        parts.append(f'<text x="{left + 6}" y="{top + 14 + 13 * k}" font-size="10" fill="{colour}">{_esc(name)}</text>')
    return "".join(parts) + "</svg>"


# ----------------------------------------------------------------------------------------------- run page
def read_predictions(path: Path) -> dict[str, tuple[list[float], list[int]]]:
    """{category: (image scores, labels)} from a ``predictions.csv`` ({} when the file is missing)."""
    out: dict[str, tuple[list[float], list[int]]] = {}
    if not path.exists():
        return out
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            scores, labels = out.setdefault(row["category"], ([], []))
            scores.append(float(row["image_score"]))
            labels.append(int(row["label"]))
    return out


def _run_table(rows: dict[str, dict[str, float]], paper: dict[str, dict[str, float]], flag_texts: list[str]) -> str:
    columns = [c for c in SHOWN if any(c in r for r in rows.values())]
    out = ["<table><tr><th>category</th>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>"]
    for name, row in rows.items():
        cls = ' class="mean"' if name == MEAN_ROW else ""
        out.append(f"<tr{cls}><td>{_esc(name)}</td>" + "".join(f"<td>{_pct(row.get(c))}</td>" for c in columns))
        if name in paper:
            label = f"{name} (paper) {_flag_html(flag_texts)}"
            cells = "".join(f"<td>{_pct(paper[name][c]) if c in paper[name] else ''}</td>" for c in columns)
            out.append(f'<tr class="paper"><td>{label}</td>{cells}</tr>')
    return "\n".join(out) + "</table>"


def _curves(predictions: dict[str, tuple[list[float], list[int]]], rows: dict[str, dict[str, float]]) -> str:
    figures = []
    for category, (scores, labels) in predictions.items():
        fpr, tpr, precision = roc_pr_points(scores, labels)
        auroc, ap = rows.get(category, {}).get("image_auroc"), rows.get(category, {}).get("image_ap")
        roc = svg_plot([("ROC", fpr, tpr)], f"{category}: image ROC (AUROC {_pct(auroc)})", "FPR", "TPR", diagonal=True)
        pr = svg_plot([("PR", tpr[1:], precision)], f"{category}: image PR (AP {_pct(ap)})", "recall", "precision")
        figures.append(f'<div id="curves-{_esc(category)}">{roc}{pr}</div>')
    return '<div class="curves">' + "".join(figures) + "</div>" if figures else "<p>(no predictions.csv)</p>"


def _data_uri(png: Path, quality: int = 88) -> str:
    """A panel as an inline JPEG (about 5x smaller than the PNG: a report of hundreds of panels stays light)."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(png) as image:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def panel_caption(name: str) -> str:
    """``false positive (highest-scoring normal image): 00_fp_good_004.png`` for a panel file named by
    ``CategoryOutputs.save_panels`` (``NN_<reason>_<defect type>_<stem>.png``); the bare name otherwise."""
    rest = name.split("_", 1)[-1]
    reason = next((r for r in sorted(PANEL_REASONS, key=len, reverse=True) if rest.startswith(f"{r}_")), None)
    return f"{PANEL_REASONS[reason]}: {name}" if reason else name


def _gallery(run_dir: Path, categories: Sequence[str]) -> str:
    out = []
    for category in categories:
        pngs = sorted((run_dir / "heatmaps" / category).glob("*.png"))
        if not pngs:
            continue
        out.append(f"<h3>{_esc(category)}</h3>")
        for png in pngs:  # the caption above its own panel, a gap before the next
            out.append(
                f'<figure class="panel"><figcaption>{_esc(panel_caption(png.name))}</figcaption>'
                f'<img class="panel" alt="{_esc(png.stem)}" src="{_data_uri(png)}"></figure>'
            )
    return "\n".join(out) or "<p>(no heatmap panels saved)</p>"


def _thresholds_note(run_dir: Path) -> str:
    path = run_dir / "thresholds.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())

    def num(value: Any) -> str:
        return "none" if value is None else f"{value:.4g}"

    items = "".join(
        f"<li>{_esc(c)}: image {num(t.get('image_threshold'))}, pixel {num(t.get('pixel_threshold'))}"
        f" ({_esc(t.get('source'))})</li>"
        for c, t in data.items()
    )
    return f"<h2>Thresholds (per-image decisions in predictions.csv)</h2><ul>{items}</ul>"


def _paper_note(published: str | None) -> str:
    if published not in PUBLISHED:
        return "no published setting for this run (no paper rows)."
    return f"(paper) rows: {_esc(PUBLISHED[published].source)} ({_esc(published)})."


def run_title(info: dict[str, Any]) -> str:
    """Method, data, k-shot and backbone [weights] of a run from its ``run.json``."""
    weights = info.get("pretrained") or "random weights"
    return (
        f"{info.get('method')} k_shot={info.get('k_shot')} on {info.get('eval_set')} | "
        f"{info.get('backbone')} [{weights}] | {info.get('image_size')}px"
        + (f" | {info['protocol']}" if info.get("protocol") else "")
    )


def write_run_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.html`` from its ``metrics.csv``, ``run.json``, ``predictions.csv`` and ``heatmaps/``.

    Returns:
        The report's path.
    """
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    rows = read_csv(run_dir / "metrics.csv")
    paper = lookup(info.get("published"))
    flag_texts = flags(info.get("pretrained"), info.get("eval_categories"), info.get("published"))
    title = run_title(info)
    body = [
        f"<h1>{_esc(title)}</h1>",
        f"<p>{_flag_html(flag_texts)}</p>" if flag_texts else "",
        f'<p class="note">run folder {_esc(run_dir.name)}; values in percent; F1-max is an oracle (threshold on '
        f"the test labels); {_paper_note(info.get('published'))}</p>",
        "<h2>Per-category metrics</h2>",
        _run_table(rows, paper, flag_texts),
        *(f'<p class="note">{_esc(n)}</p>' for n in coverage_notes(rows)),
        "<h2>Image-level ROC and PR curves</h2>",
        _curves(read_predictions(run_dir / "predictions.csv"), rows),
        _thresholds_note(run_dir),
        "<h2>Heatmaps</h2>",
        _gallery(run_dir, [c for c in rows if c != MEAN_ROW]),
    ]
    return _write(run_dir / REPORT, _page(title, body))


# --------------------------------------------------------------------------------------------- sweep page
def _defined(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _metric_cell(row: dict[str, Any], column: str) -> str:
    """``91.1 ±0.2`` with the std small and, under it, the published number when there is one."""
    value, std, paper = row.get(column), row.get(f"{column}_std"), row.get(f"{column} (paper)")
    if not _defined(value):
        return "n/a"
    text = _esc(percent(value)) + (f"<small> ±{_esc(percent(std))}</small>" if _defined(std) else "")
    return text + (f'<br><small class="paper">paper {_esc(percent(paper))}</small>' if _defined(paper) else "")


def _group_cell(row: dict[str, Any], column: str) -> str:
    """A setting's cell; a data root as its folder name (the full path in the tooltip), not an absolute path."""
    text = cell(row, column)
    if column.endswith("_root") and _defined(row.get(column)) and str(row[column]) not in ("None", ""):
        return f'<span title="{_esc(row[column])}">{_esc(Path(str(row[column])).name)}</span>'
    return _esc(text)


def _sweep_table(rows: list[dict[str, Any]]) -> str:
    """Settings, then one column per metric (mean ±std, the paper's number beneath); flags only where rows differ.

    The page states flags shared by every row once, at the top; a ``flags`` column appears only when they differ.
    """
    group_cols, metric_cols = display_columns(rows)
    own = [c for c in metric_cols if not c.endswith("(paper)")]
    texts = [flags(r.get("pretrained"), r.get("eval_categories"), r.get("published")) for r in rows]
    differ = len({tuple(t) for t in texts}) > 1
    names = [*group_cols, *own, *(["flags"] if differ else [])]
    head = "".join(f"<th>{_esc(c).replace('_', '_<wbr>')}</th>" for c in names)
    out = [f'<table class="sweep"><tr>{head}</tr>']
    for row, row_flags in zip(rows, texts, strict=True):
        cells = "".join(f"<td>{_group_cell(row, c)}</td>" for c in group_cols)
        cells += "".join(f"<td>{_metric_cell(row, c)}</td>" for c in own)
        if differ:
            cells += f"<td>{_esc(', '.join(t.split(':')[0].split(' (')[0] for t in row_flags))}</td>"
        cls = ' class="mean"' if row.get("category") == MEAN_ROW else ""
        out.append(f"<tr{cls}>{cells}</tr>")
    return "\n".join(out) + "</table>"


def kshot_series(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, list[tuple[int, float, float]]]]]:
    """Mean rows grouped by every setting but ``k_shot`` (and its ``published`` id), where k_shot varies.

    Returns:
        [(group label, {metric: [(k, mean, std), ...] sorted by k})].
    """
    fields = [f for f in GROUP_FIELDS if f not in ("k_shot", "published")]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in (r for r in rows if r.get("category") == MEAN_ROW):
        groups.setdefault(tuple(str(row.get(f)) for f in fields), []).append(row)
    out = []
    for members in groups.values():
        if len({int(m.get("k_shot") or 0) for m in members}) < 2:
            continue
        first = members[0]
        weights = first.get("pretrained") if _defined(first.get("pretrained")) else "random weights"
        who = first.get("member") or first.get("method")
        label = f"{who} on {first.get('eval_set')} | {first.get('backbone')} [{weights}]"
        curves = {}
        for metric in KSHOT_METRICS:
            points = [(int(m.get("k_shot") or 0), m.get(metric), m.get(f"{metric}_std")) for m in members]
            points = [(k, v, s if s is not None else math.nan) for k, v, s in points if v is not None]
            if points and not all(math.isnan(v) for _, v, _ in points):
                curves[metric] = sorted(points)
        out.append((label, curves))
    return out


def _kshot_plots(rows: list[dict[str, Any]]) -> str:
    plots = []
    for label, curves in kshot_series(rows):
        ks = [k for points in curves.values() for k, _, _ in points]
        series = [(m, [k for k, _, _ in p], [v for _, v, _ in p]) for m, p in curves.items()]
        errors = [[s for _, _, s in p] for p in curves.values()]
        values = [v for _, _, ys in series for v in ys if not math.isnan(v)]
        low = max(0.0, math.floor(10 * min(values)) / 10) if values else 0.0
        svg = svg_plot(
            series,
            "k-shot curve",
            "k_shot",
            "mean ± std",
            (min(ks), max(ks)),
            (low, 1.0),
            errors,
            xticks=sorted(set(ks)),
        )
        plots.append(f"<figure><figcaption>{_esc(label)}</figcaption>{svg}</figure>")  # the label may be long
    return '<div class="curves">' + "".join(plots) + "</div>" if plots else "<p>(k_shot does not vary)</p>"


def write_sweep_report(root: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write ``root/report.html``: mean ± std per setting, the k-shot curve, failed jobs, links to run reports.

    Args:
        root: the sweep folder.
        result: what ``vlmad.outputs.report.report`` returns (``rows``, ``runs``, ``failed``).

    Returns:
        The report's path.
    """
    root = Path(root)
    rows, runs, failed = result["rows"], result["runs"], result["failed"]
    all_flags = sorted({t for r in rows for t in flags(r.get("pretrained"), r.get("eval_categories"))})
    title = f"Sweep {root.name}: {len(runs)} finished run(s)"
    links = "".join(
        f'<li><a href="{_esc(Path(r["dir"]) / REPORT)}">{_esc(r["dir"])}</a></li>'
        for r in runs
        if (root / r["dir"] / REPORT).exists()
    )
    body = [
        f"<h1>{_esc(title)}</h1>",
        f"<p>{_flag_html(all_flags)}</p>" if all_flags else "",
        '<p class="note">mean ± std over seeds (reference draws), percent; (paper) = published numbers.</p>',
        "<h2>Mean ± std per setting</h2>",
        _sweep_table(rows) if rows else "<p>(no finished runs)</p>",
        "<h2>k-shot curve</h2>",
        _kshot_plots(rows),
    ]
    if failed:
        items = "".join(f"<li>{_esc(f['dir'])}: {_esc(f['reason'])}</li>" for f in failed)
        body.append(f"<h2>Failed or incomplete ({len(failed)})</h2><ul>{items}</ul>")
    if links:
        body.append(f"<h2>Run reports</h2><ul>{links}</ul>")
    return _write(root / REPORT, _page(title, body))


# ------------------------------------------------------------------------------------------- predict page
PREDICT_GALLERY = 48  # panels inlined in a predict report (highest scores first); all are in heatmaps/


def write_predict_report(
    run_dir: str | os.PathLike,
    title: str,
    rows: Sequence[dict[str, Any]],
    threshold: dict[str, Any],
    notes: Sequence[str],
) -> Path:
    """Write ``run_dir/report.html`` of ``vlmad predict``: thresholds, every image's decision, the panels.

    Args:
        run_dir: the predict run folder.
        title: method, backbone and backend.
        rows: the ``predictions.csv`` rows (``path``, ``image_score``, ``max_pixel_score``, ``decision``) with
            ``overlay``, the panel's path.
        threshold: the thresholds used (``image_threshold``, ``pixel_threshold``, ``source``, ...).
        notes: lines written under the title (inputs, skipped files, colour scale).

    Returns:
        The report's path.
    """
    run_dir = Path(run_dir)

    def text(value: Any) -> str:  # a file name that is not UTF-8 shows its bytes as \xNN escapes
        return _esc(os.fsencode(str(value)).decode("utf-8", errors="backslashreplace"))

    n_ng = sum(r["decision"] == "NG" for r in rows)
    table = ["<table><tr><th>image</th><th>image score</th><th>max pixel</th><th>decision</th></tr>"]
    table += [
        f"<tr><td>{text(Path(r['path']).name)}</td><td>{r['image_score']:.4f}</td><td>{r['max_pixel_score']:.4f}</td>"
        f"<td>{_esc(r['decision'])}</td></tr>"
        for r in rows
    ]
    shown = sorted((r for r in rows if r.get("overlay")), key=lambda r: -r["image_score"])[:PREDICT_GALLERY]
    gallery = [
        f'<figure><img class="panel" alt="{text(Path(r["overlay"]).stem)}" src="{_data_uri(Path(r["overlay"]))}">'
        f"<figcaption>{text(Path(r['overlay']).relative_to(run_dir))}</figcaption></figure>"
        for r in shown
    ]
    more = len([r for r in rows if r.get("overlay")]) - len(shown)
    body = [
        f"<h1>{_esc(title)}</h1>",
        f"<p>{len(rows)} images scored, {n_ng} NG (anomalous), {len(rows) - n_ng} OK.</p>",
        *(f'<p class="note">{_esc(n)}</p>' for n in notes),
        "<h2>Thresholds</h2>",
        f"<ul><li>image {threshold.get('image_threshold'):.4g}, pixel {threshold.get('pixel_threshold'):.4g} "
        f"({text(threshold.get('source'))})</li></ul>",
        "<h2>Decisions (predictions.csv)</h2>",
        "\n".join(table) + "</table>",
        "<h2>Heatmaps</h2>",
        "\n".join(gallery) or "<p>(no panels)</p>",
        f'<p class="note">{more} more panels in heatmaps/ (highest image scores shown here).</p>' if more > 0 else "",
    ]
    return _write(run_dir / REPORT, _page(title, body))
