"""The figures of docs/tasks.md: text-guided editing (Eq. 23) of held-out digits with the embedded models, at the
paper's settings (50 DDIM steps, start t ~ 600, Adam lr 0.01, 50 iterations, lambda 0.5 for attribute edits).

For each attribute edit ("a thick <n>", "a thin <n>", "a slanted <n>", "an upright <n>", n the digit's own
number) on the first ``--images`` held-out digits, it records the CLIP score (the embedded DigitCLIP) and the L1
distance to the image before and after, and, measured on the pixels independently of the model that drove the
edit, the change of ink mass and slant and whether the classifier keeps the digit's label; then SDO against
Full backpropagation on the "thick" edit (time per edit, same figures). Writes results.json, results.md and
one PNG grid per edit to benchmarks/results/digit_edit/ (or ``--output``).

    python benchmarks/digit_edit.py                  # about 10 min on 2 CPU cores
    python benchmarks/digit_edit.py --images 2 --iterations 5 --output /tmp/edit-smoke
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sdo import report
from sdo.recipes import latent_tasks as tasks
from sdo.embedded import load_digit_clip, load_digits
from sdo.embedded.digit_clip import NUMBER_WORDS
from sdo.embedded.digits import load_dataset

EDITS = {"thick": "a thick {}", "thin": "a thin {}", "slanted": "a slanted {}", "upright": "an upright {}"}
EXPECTED = {"thick": ("ink_mass", 1), "thin": ("ink_mass", -1), "slanted": ("slant", 1), "upright": ("slant", -1)}


def summarize(name: str, m: dict, labels: list[int], seconds: float) -> dict:
    key, sign = EXPECTED[name]
    change = [a - b for a, b in zip(m[f"{key}_after"], m[f"{key}_image"], strict=True)]
    return {
        "clip_before": statistics.mean(m["clip_similarity_before"]),
        "clip_after": statistics.mean(m["clip_similarity_after"]),
        "clip_raised": statistics.mean(float(a > b) for a, b in zip(m["clip_similarity_after"], m["clip_similarity_before"], strict=True)),
        "l1_before": statistics.mean(m["l1_to_image_before"]),
        "l1_after": statistics.mean(m["l1_to_image_after"]),
        "attribute": key,
        "attribute_moved_as_asked": statistics.mean(float(sign * c > 0) for c in change),
        "attribute_change_mean": statistics.mean(change),
        "label_kept": statistics.mean(float(a == b) for a, b in zip(m["label_after"], labels, strict=True)),
        "inversion_round_trip_error": m["inversion_round_trip_error"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "digit_edit")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    models, clip = load_digits(), load_digit_clip()
    images, labels = load_dataset("test")
    images, labels = images[: args.images], labels[: args.images].tolist()
    settings = dict(steps=args.steps, iterations=args.iterations, lr=args.lr, models=models, clip=clip, progress=False)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "output"}, "torch_threads": torch.get_num_threads(),
               "edits": {}, "strategies": {}}  # strategies: the "thick" edit
    runs = [(name, "sdo") for name in EDITS] + [("thick", "full")]
    for name, strategy in runs:
        prompts = [EDITS[name].format(NUMBER_WORDS[c]) for c in labels]
        began = time.perf_counter()
        out = tasks.edit_digits(images, prompts, strategy=strategy, **settings)
        summary = summarize(name, out.metrics, labels, time.perf_counter() - began)
        print(f"{name:8s} {strategy:5s}", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
        if name == "thick":
            results["strategies"][strategy] = summary
        if strategy == "sdo":
            results["edits"][name] = summary
            report.save_grid([("image", images), ("before", out.before), ("after", out.after)],
                             args.output / f"edit_{name}.png", title=EDITS[name].format("<n>") + " (SDO, Eq. 23)")
        (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    header = ["edit", "CLIP before", "CLIP after", "raised", "L1 before", "L1 after", "attribute", "moved as asked",
              "label kept", "s/edit"]
    rows = [[EDITS[n].format("<n>"), s["clip_before"], s["clip_after"], s["clip_raised"], s["l1_before"], s["l1_after"],
             s["attribute"], s["attribute_moved_as_asked"], s["label_kept"], s["seconds"]]
            for n, s in results["edits"].items()]
    rows_strategy = [[k, s["seconds"], s["clip_after"], s["l1_after"], s["attribute_moved_as_asked"]]
                     for k, s in results["strategies"].items()]
    text = (f"images: {args.images} held-out digits, {args.steps} DDIM steps, {args.iterations} Adam iterations, lr {args.lr}\n\n"
            + report.format_table(header, rows) + "\n\n"
            + report.format_table(["strategy (thick edit)", "s/edit", "CLIP after", "L1 after", "moved as asked"], rows_strategy) + "\n")
    (args.output / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
