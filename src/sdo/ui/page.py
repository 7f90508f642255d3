"""The local web page (Gradio): :func:`build_app` lays it out; the work is done by the tab modules' handlers
(:mod:`sdo.ui.edit`), each run in a :class:`~sdo.ui.jobs.Job` so that the page streams its progress and a cancel
stops it. Every run writes into a fresh folder of its own under the page's output folder, so two browser tabs never
share one."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from .. import report
from ..checks import UsageError
from .edit import EditRequest, check_edit, digit_choices, run_edit
from .jobs import CommandJob, Job
from .tune import TuneRequest, read_run, tune_command

__all__ = ["build_app", "run_folder"]

_STRATEGIES = ["sdo", "full", "checkpoint", "truncated", "adjoint", "reversible", "drtune"]
_METRICS = ["strategy", "CLIP before", "CLIP after", "L1 to image", "ink before", "ink after", "label before",
            "label after", "seconds"]


def _tune_methods() -> tuple[str, ...]:
    from ..finetuning.config import methods

    return methods()


def run_folder(root: Path, kind: str) -> Path:
    """A fresh folder for one run: ``<root>/<kind>-<time>-<random>``; never an existing one."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = root / f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    return folder


def _picture(images: torch.Tensor, scale: int = 8) -> np.ndarray:
    """The first image of a batch in [-1, 1] as 8-bit pixels, enlarged ``scale`` times (digits are 16x16)."""
    x = ((images[0].detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).permute(1, 2, 0).numpy()


def _row(name: str, m: dict) -> list:
    first = lambda v: v[0] if isinstance(v, list) else v
    return [name, round(first(m["clip_similarity_before"]), 3), round(first(m["clip_similarity_after"]), 3),
            round(first(m["l1_to_image_after"]), 3), round(first(m["ink_mass_before"]), 1),
            round(first(m["ink_mass_after"]), 1), first(m["label_before"]), first(m["label_after"]),
            round(m["seconds"], 1)]


def _curves(points: list[dict]):
    """The loss of every strategy against the iteration, as a matplotlib figure."""
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    for name in dict.fromkeys(p["strategy"] for p in points):
        mine = [p for p in points if p["strategy"] == name]
        ax.plot([p["iteration"] for p in mine], [p["loss"] for p in mine], label=name)
    ax.set(xlabel="iteration", ylabel="loss")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _one_line(err: BaseException | str) -> str:
    return "error: " + " ".join(str(err).split())


def _rewards(records: list[dict], title: str):
    """The reward of every update against the seconds spent, as a matplotlib figure."""
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    kept = [r for r in records if not r.get("skipped")]
    ax.plot([r["elapsed"] for r in kept], [r["reward_mean"] for r in kept])
    ax.set(xlabel="seconds of updates", ylabel="reward (mean over the batch)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _run_view(folder: Path) -> tuple:
    """(status, reward figure, latest sample grid, guard text) of a fine-tuning run folder."""
    run = read_run(folder)
    records = run["records"]
    guard = run["guard"]
    signal = ("no guard check yet" if guard is None else
              "guard: passed" if not guard.get("failed") else f"guard: FAILED ({'; '.join(guard['failed'])})")
    if run["summary"] is not None:
        status = f"done: {run['summary']['updates']} updates in {folder}"
        if run["summary"].get("keep"):
            status += f"; keep {run['summary']['keep']}"
    elif records:
        status = f"update {records[-1]['update']}: reward {records[-1]['reward_mean']:.3f}"
    else:
        status = "starting (loading the models)…"
    picture = run["final"] if run["summary"] is not None and run["final"] else run["samples"]
    return status, _rewards(records, folder.name), str(picture) if picture else None, signal


def build_app(output: Path, device: str = "cpu"):
    """The page: tabs Edit and Fine-tune (the embedded digits). ``output``: the folder the runs write into."""
    output = Path(output)
    choices = digit_choices()

    def edit(digit, upload, prompt, strategies, iterations, lr, lam, start_t):
        req = EditRequest(prompt=prompt or "", strategies=list(strategies or []), digit=None if upload else digit,
                          image=upload or None, iterations=int(iterations), lr=float(lr), lam=float(lam),
                          start_t=int(start_t))
        try:
            check_edit(req)
        except (UsageError, OSError, TypeError, ValueError) as err:
            yield f"error: {' '.join(str(err).split())}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        folder = run_folder(output, "edit")
        job = Job(run_edit, req, folder)
        points, pictures, rows = [], [], []
        try:
            while True:
                finished = job.done
                for event in job.events(0.3 if not finished else 0.0):
                    if "iteration" in event:
                        points.append({k: event[k] for k in ("iteration", "loss", "strategy")})
                if finished:
                    break
                latest = points[-1] if points else None
                status = (f"running {latest['strategy']}: iteration {latest['iteration'] + 1} of {req.iterations}"
                          if latest else "inverting the digit…")
                yield status, _curves(points), gr.skip(), gr.skip(), gr.skip()
            if job.error is not None:
                yield f"error: {' '.join(str(job.error).split())}", _curves(points), gr.skip(), gr.skip(), gr.skip()
                return
            for entry in job.result:
                if not pictures:
                    pictures.append((_picture(entry["before"]), "before"))
                pictures.append((_picture(entry["after"]), f"after: {entry['strategy']}"))
                rows.append(_row(entry["strategy"], entry))
            yield (f"done: {len(rows)} strategies in {folder}", _curves(points), pictures, rows,
                   str(folder) + ".zip")
        finally:
            if not job.done:
                job.cancel()

    def tune(method, target, regularizer, seconds, lr):
        folder = output / f"finetune-{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        try:
            args = tune_command(TuneRequest(method, int(target), float(regularizer), float(seconds), float(lr)),
                                folder)
        except (UsageError, OSError, TypeError, ValueError) as err:
            yield _one_line(err), gr.skip(), gr.skip(), gr.skip()
            return
        output.mkdir(parents=True, exist_ok=True)
        job = CommandJob(args, output / f"{folder.name}.log")
        try:
            while not job.done:
                job.wait(1.0)
                try:
                    yield _run_view(folder)
                except UsageError:  # the command has not written its first file yet
                    yield "starting (loading the models)…", gr.skip(), gr.skip(), gr.skip()
            if job.error is not None:
                yield _one_line(job.error), gr.skip(), gr.skip(), gr.skip()
                return
            yield _run_view(folder)
        finally:
            if not job.done:
                job.cancel()

    def open_run(path):
        try:
            return _run_view(Path(str(path or "").strip()))
        except (UsageError, OSError) as err:
            return _one_line(err), gr.skip(), gr.skip(), gr.skip()

    with gr.Blocks(title="sdo") as app:
        gr.Markdown("# sdo: backpropagation through diffusion sampling\nLocal and offline: the embedded digits "
                    "models. Each run writes a folder of its own under `" + str(output) + "`.")
        with gr.Tab("Edit", elem_id="tab-edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    gallery = gr.Gallery([(_picture(choices[i : i + 1], 4), str(i)) for i in range(len(choices))],
                                         label="held-out digits (click one)", columns=8, height=260,
                                         elem_id="edit-gallery", allow_preview=False)
                    digit = gr.Number(3, label="held-out digit (0-296)", precision=0, elem_id="edit-digit")
                    upload = gr.Image(type="filepath", label="or upload an image", elem_id="edit-upload", height=160)
                with gr.Column(scale=1):
                    prompt = gr.Textbox("a thick 8", label="the edit", elem_id="edit-prompt")
                    strategies = gr.CheckboxGroup(_STRATEGIES, value=["sdo", "full"], label="strategies (one after "
                                                  "another, from the same inverted latent)", elem_id="edit-strategies")
                    with gr.Row():
                        iterations = gr.Number(50, label="iterations", precision=0, elem_id="edit-iterations")
                        lr = gr.Number(0.01, label="lr", elem_id="edit-lr")
                        lam = gr.Number(0.5, label="λ (fidelity)", elem_id="edit-lam")
                        start_t = gr.Number(600, label="start t", precision=0, elem_id="edit-start-t")
                    with gr.Row():
                        run = gr.Button("Run", variant="primary", elem_id="edit-run")
                        cancel = gr.Button("Cancel", elem_id="edit-cancel")
            status = gr.Markdown("", elem_id="edit-status")
            with gr.Row():
                curves = gr.Plot(_curves([]), label="loss per iteration", elem_id="edit-curves")
                images = gr.Gallery(label="before and after", columns=4, height=300, elem_id="edit-images")
            table = gr.Dataframe(headers=_METRICS, label="metrics", elem_id="edit-metrics", interactive=False)
            download = gr.File(label="the result folder (as sdo edit writes it)", elem_id="edit-download")
        with gr.Tab("Fine-tune", elem_id="tab-tune"):
            with gr.Row():
                method = gr.Dropdown(list(_tune_methods()), value="sdo", label="method (--strategy)",
                                     elem_id="tune-method")
                target = gr.Number(3, label="target digit", precision=0, elem_id="tune-target")
                regularizer = gr.Number(30, label="DRaFT+ penalty weight", elem_id="tune-regularizer")
                seconds = gr.Number(60, label="seconds of updates", elem_id="tune-seconds")
                tune_lr = gr.Number(3e-3, label="lr", elem_id="tune-lr")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="tune-start")
                stop = gr.Button("Stop (keeps the checkpoint)", elem_id="tune-stop")
            with gr.Row():
                folder_box = gr.Textbox(label="or open an existing run folder", elem_id="tune-folder")
                open_button = gr.Button("Open", elem_id="tune-open")
            tune_status = gr.Markdown("", elem_id="tune-status")
            guard = gr.Markdown("", elem_id="tune-guard")
            with gr.Row():
                reward_plot = gr.Plot(label="reward", elem_id="tune-reward")
                grid = gr.Image(type="filepath", label="fixed-seed samples (the latest grid; final.png at the end)",
                                elem_id="tune-samples", height=320)
        def pick(event: gr.SelectData) -> int:
            return event.index

        gallery.select(pick, None, digit)
        started = run.click(edit, [digit, upload, prompt, strategies, iterations, lr, lam, start_t],
                            [status, curves, images, table, download])
        cancel.click(lambda: "cancelled", None, status, cancels=[started])
        training = start.click(tune, [method, target, regularizer, seconds, tune_lr],
                               [tune_status, reward_plot, grid, guard])
        stop.click(lambda: "stopped: the last update's checkpoint is kept", None, tune_status, cancels=[training])
        open_button.click(open_run, folder_box, [tune_status, reward_plot, grid, guard])
    return app
