"""``sdo ui``: serve the local web page (:mod:`sdo.ui`) on 127.0.0.1 (never a public share link)."""

from __future__ import annotations

import os
from pathlib import Path

from ..checks import UsageError
from .options import device, folder, output_folder, positive_int

__all__ = ["add_ui_parser", "run_ui"]


def add_ui_parser(sub) -> None:
    t = sub.add_parser("ui", help="a local web page: edit, attack, cost and fine-tune, the methods side by side, live",
                       description="Serve sdo's page (Gradio) on this machine only, on the embedded digits models "
                       "or a local pipeline (--model --clip, and --classifier for Adversarial): Edit (several "
                       "strategies side by side, live), Adversarial, Cost (sdo bench) and Fine-tune (a short run, "
                       "live; Stop keeps the checkpoint). Needs the ui extra: pip install -e '.[ui]'.")
    t.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    t.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    t.add_argument("--output", type=folder, default=None, help="folder the runs write into (default: a fresh "
                   "sdo-ui-<time>)")
    t.add_argument("--overwrite", action="store_true", help="use an --output that is not empty")
    t.add_argument("--model", default=None, help="a local diffusers pipeline folder (needs --clip): Edit edits an "
                   "uploaded image with it (sdo edit --model), Cost times its denoiser (sdo bench on its config), "
                   "Fine-tune tunes it over prompts on the CLIP score (sdo finetune --model --reward clip)")
    t.add_argument("--clip", default=None, help="with --model: a local transformers CLIPModel folder, with its "
                   "tokenizer")
    t.add_argument("--classifier", default=None, help="with --model: a local transformers image-classification "
                   "folder that Adversarial attacks the pipeline's generations against (sdo adversarial --model "
                   "--classifier); without it Adversarial stays on the digits")
    t.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")


def run_ui(args) -> None:
    if args.port > 65535:
        raise UsageError(f"--port must be 1-65535, got {args.port}", "port")
    if (args.model is None) != (args.clip is None):
        raise UsageError("--model and --clip go together: the Edit tab edits with the pipeline and scores with CLIP",
                         "model" if args.model is None else "clip")
    if args.classifier is not None and args.model is None:
        raise UsageError("--classifier needs --model: Adversarial attacks the pipeline's generations against it",
                         "model")
    for name in ("model", "clip", "classifier"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"--{name} {path}: no such folder")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports (read at import)
    try:
        import gradio  # noqa: F401 - the extra's presence, checked before any work
    except ImportError:
        raise UsageError("sdo ui needs Gradio: pip install -e '.[ui]'") from None
    from ..ui.page import build_app

    out = output_folder(args, "sdo-ui")
    app = build_app(out, args.device, args.model, args.clip, args.classifier)
    print(f"sdo ui: http://{args.host}:{args.port} (runs write into {out}); Ctrl-C stops it", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                       show_error=True, quiet=True)
