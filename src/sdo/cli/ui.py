"""``sdo ui``: serve the local web page (:mod:`sdo.ui`) on 127.0.0.1 (never a public share link)."""

from __future__ import annotations

import os

from ..checks import UsageError
from .options import folder, output_folder, positive_int

__all__ = ["add_ui_parser", "run_ui"]


def add_ui_parser(sub) -> None:
    t = sub.add_parser("ui", help="a local web page: edit, attack, cost and fine-tune, the methods side by side, live",
                       description="Serve sdo's page (Gradio) on this machine only, on the embedded digits models: "
                       "Edit (several strategies side by side, live), Adversarial, Cost (sdo bench) and Fine-tune "
                       "(a short run, live; Stop keeps the checkpoint). Needs the ui extra: pip install -e '.[ui]'.")
    t.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    t.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    t.add_argument("--output", type=folder, default=None, help="folder the runs write into (default: a fresh "
                   "sdo-ui-<time>)")
    t.add_argument("--overwrite", action="store_true", help="use an --output that is not empty")


def run_ui(args) -> None:
    if args.port > 65535:
        raise UsageError(f"--port must be 1-65535, got {args.port}", "port")
    try:
        import gradio  # noqa: F401 - the extra's presence, checked before any work
    except ImportError:
        raise UsageError("sdo ui needs Gradio: pip install -e '.[ui]'") from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports
    from ..ui.page import build_app

    out = output_folder(args, "sdo-ui")
    app = build_app(out)
    print(f"sdo ui: http://{args.host}:{args.port} (runs write into {out}); Ctrl-C stops it", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                       show_error=True, quiet=True)
