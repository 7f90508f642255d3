"""The report of ``sdo bench``: bench.md, index.html and the plots, from the results of
:func:`sdo.cli.bench.run_bench`."""

from __future__ import annotations

from .. import report

__all__ = ["write_report"]


def write_report(results: dict, cfg) -> None:
    """bench.md, index.html and the plots of a :func:`sdo.cli.bench.run_bench` run (``cfg``: its BenchConfig)."""
    out, main = cfg.output, results["main"]
    header = ["job", "seconds (min)", "median / max", "x sdo", "forward", "backward", "peak MB", "x sdo (peak)",
              "saved MB", "cos to full", "norm / full"]
    rows = []
    for label, row in main.items():
        fid = results.get("fidelity", {}).get(label, {})
        if label == "full":
            fid = {"cosine": 1.0, "norm_ratio": 1.0}
        ratio = row.get("time_vs_sdo", "-")
        if row.get("below_floor"):
            ratio = f"{ratio:.3f} (noise: no-grad timed above a gradient)" if "time_vs_sdo" in row else "noise"
        rows.append([label, row["seconds"], f"{row['median_seconds']:.3f} / {row['max_seconds']:.3f}", ratio,
                     row.get("forward", "-"), row.get("backward", "-"),
                     row.get("peak_mb", "-"), row.get("peak_vs_sdo", "-"), row.get("saved_mb", "-"),
                     fid.get("cosine", "-"), fid.get("norm_ratio", "-")])
    sweep = results.get("sweep", {})
    ns = sorted(int(k) for k in sweep)
    sweep_header = ["strategy", *[f"s N={m}" for m in ns], *([f"MB N={m}" for m in ns] if cfg.memory else [])]
    sweep_rows = []
    for s in ["nograd", *cfg.strategies] if ns else []:
        sweep_rows.append([s, *[sweep[str(m)][s]["seconds"] for m in ns],
                           *([sweep[str(m)][s].get("peak_mb", "-") for m in ns] if cfg.memory else [])])
    cost_images, sweep_images, depth_images = ["cost.png"], [], []
    strategies = list(cfg.strategies)
    report.plot_bars({"seconds per gradient / SDO's": {s: main[s]["time_vs_sdo"] for s in strategies},
                      **({"peak MB": {s: main[s]["peak_mb"] for s in strategies}} if cfg.memory else {})},
                     out / "cost.png", f"one latent gradient, N={cfg.steps}", reference=None)
    if ns:
        report.plot_curves({s: [sweep[str(m)][s]["seconds"] for m in ns] for s in ["nograd", *strategies]},
                           out / "sweep_time.png", "seconds per gradient", "N (steps)", "seconds", x=ns, log="xy")
        sweep_images.append("sweep_time.png")
        if cfg.memory:
            report.plot_curves({s: [max(sweep[str(m)][s]["peak_mb"], 1e-3) for m in ns]
                                for s in ["nograd", *strategies]},
                               out / "sweep_memory.png", "peak memory", "N (steps)", "MB", x=ns, log="xy")
            sweep_images.append("sweep_memory.png")
    quality = results.get("quality", {})
    quality_header = ["sample", "objective", "mean |x0 - plain x0|", "pixels outside [-1, 1]", "seconds"]
    quality_rows = [[k, v["objective"], v["mean_abs_change"], v["out_of_range"], v["seconds"]]
                    for k, v in quality.items()]
    fid_rows = []
    for m in ns:
        fid = results.get("sweep_fidelity", {}).get(str(m), {})
        adj = fid.get("adjoint", {})
        fid_rows.append([m, fid.get("sdo", {}).get("cosine", "-"), fid.get("sdo", {}).get("norm_ratio", "-"),
                         adj.get("cosine", "-"), min(adj.get("item_cosine", ["-"])),
                         adj.get("reconstruction_error_x_T", "-")])
    fid_header = ["N", "sdo cos", "sdo norm/full", "adjoint cos", "adjoint min item cos", "adjoint |x_T err|/|x_T|"]
    depth = results.get("depth")
    if depth and depth["depths"]:
        report.plot_curves(depth["norms"], out / "depth.png", "gradient norm vs backpropagation depth (Fig. 11a)",
                           "depth (steps backpropagated)", "mean |dJ/dx_t|", x=depth["depths"], log="y")
        depth_images.append("depth.png")
    meta = results["meta"]
    lines = [
        f"# sdo bench: {meta['model']}", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; torch {meta['torch']}, diffusers {meta['diffusers']}",
        (f"- device: {meta['device']} {meta['cuda_device'] or ''} ({meta['cpu']}, {meta['nproc']} cores, "
         f"{meta['torch_threads']} torch threads); {meta['model_params']:,} params; latent {meta['latent_shape']}"),
        f"- memory: {meta['memory']}", "", f"## N = {cfg.steps}", "",
        "```", report.format_table(header, rows), "```", "",
    ]
    if sweep_rows:
        lines += ["## Sweep over N", "", "```", report.format_table(sweep_header, sweep_rows), "```", "",
                  "Gradient agreement with Full against N:", "", "```", report.format_table(fid_header, fid_rows),
                  "```", ""]
    if depth and depth["depths"]:
        depth_rows = [[s, *v] for s, v in depth["norms"].items()]
        lines += ["## Gradient norm vs depth", "", "```",
                  report.format_table(["strategy", *map(str, depth["depths"])], depth_rows),
                  "```", ""]
    if quality_rows:
        lines += ["## One-step guidance against SDO, on quality", "", "```",
                  report.format_table(quality_header, quality_rows), "```", ""]
    lines += ["## Derived", "", *[f"- {k}: {v:.3f}" for k, v in results.get("derived", {}).items()], ""]
    (out / "bench.md").write_text("\n".join(lines))
    report.write_index(out / "index.html", "sdo bench", [
        {"heading": f"N = {cfg.steps}", "text": meta["model"], "table": (header, rows), "images": cost_images},
        {"heading": "sweep over N", "table": (sweep_header, sweep_rows) if sweep_rows else None,
         "images": sweep_images},
        {"heading": "gradient agreement with Full against N", "table": (fid_header, fid_rows) if fid_rows else None},
        {"heading": "gradient norm vs depth", "images": depth_images},
        {"heading": "one-step guidance against SDO, on quality", "table": (quality_header, quality_rows) if quality_rows
         else None, "images": ["quality.png"] if (out / "quality.png").exists() else []},
    ])
    print(f"\n{report.format_table(header, rows)}\n\nwrote {out}/bench.json, bench.md, index.html and plots")

