"""Report pieces: image grids and curves as PNG (matplotlib), one self-contained ``index.html``, and a mean with
its interval for tables over seeds."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["format_table", "mean_interval", "plot_bars", "plot_curves", "save_grid", "write_index"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(
    rows: Sequence[tuple[str, torch.Tensor]],
    path: str | Path,
    captions: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """One row per ``(label, images)``, images (n, 1 or 3, H, W) in ``value_range``; optional per-image captions."""
    plt = _pyplot()
    ncols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.2 * ncols + 1.2, 1.35 * len(rows) + 0.4), squeeze=False)
    lo, hi = value_range
    for r, (label, images) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            img = ((images[c].detach().float().cpu().clamp(lo, hi) - lo) / (hi - lo)).permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if captions is not None and captions[r] and c < len(captions[r]):
                ax.set_title(captions[r][c], fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(
    curves: dict[str, Sequence[float]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    x: Sequence[float] | None = None,
    log: str = "",
) -> Path:
    """Line plot, one line per named curve, against ``x`` (default 0, 1, ...); ``log``: "x", "y" or "xy"."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, values in curves.items():
        ax.plot(range(len(values)) if x is None else list(x), list(values), label=name,
                marker="o" if x and len(values) <= 30 else None)
    if "x" in log:
        ax.set_xscale("log")
        if x is not None:  # label the measured points, not powers of ten
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xticks(list(x))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
    if "y" in log:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_bars(groups: dict[str, dict[str, float]], path: str | Path, title: str,
              reference: float | None = None) -> Path:
    """Side-by-side bar charts: ``groups`` maps a panel title to ``{bar label: value}``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (panel, values) in zip(axes[0], groups.items(), strict=True):
        ax.bar(list(values), list(values.values()), color="tab:blue")
        if reference is not None:
            ax.axhline(reference, color="gray", lw=0.8, ls="--")
        ax.set_title(panel, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (floats to 3 significant digits)."""
    table = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mean_interval(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± h"``: the mean of ``values`` (e.g. one figure per seed) and the half-width of its 95% Student-t
    interval; the mean alone for one value."""
    import statistics

    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    half = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_index(path: str | Path, title: str, sections: Sequence[dict]) -> Path:
    """One HTML page. Each section: ``heading``, optional ``text``, ``table`` ((header, rows)) and ``images``
    (file names relative to the page)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
         "text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}</style></head><body>"),
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section['heading'])}</h2>")
        if section.get("text"):
            parts.append(f"<p>{html.escape(section['text'])}</p>")
        if section.get("table"):
            parts.append(_html_table(*section["table"]))
        for image in section.get("images", ()):
            parts.append(f"<div><img src='{html.escape(str(image))}' alt='{html.escape(str(image))}'></div>")
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts))
    return Path(path)
