"""One digits fine-tuning run with a variant of the DRaFT+ penalty, to compare what each variant lets through.

    python benchmarks/penalty_variants.py OUT --method shortft --penalty eps --target 7 --regularizer 10

``--penalty``: ``eps`` (DRaFT+'s mean||out - out_base||^2 alone, sdo's penalty before 2026-12), ``x0`` (the change
of the denoised sample alone) or ``both`` (their sum, sdo's penalty). The other settings are the README's: lr 3e-3,
LoRA rank 4 on attention and conv1/conv2, batch 8, ``--budget`` seconds of updates (150). Prints the evaluation of
64 fixed-seed samples at LoRA scales 0 and 1 (the judge's target and rejection rates, diversity).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdo.finetuning.anchor import Anchored
from sdo.finetuning import FinetuneConfig, finetune
from sdo.recipes.finetune_tasks import digits_task


def _variant(kind: str):
    def penalty(self, record):
        if not record:
            return None
        return torch.stack([{"eps": out, "x0": x0, "both": out + x0}[kind] for out, x0 in self.terms(record)]).mean()

    return penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--method", default="shortft")
    parser.add_argument("--penalty", choices=("eps", "x0", "both"), default="both")
    parser.add_argument("--target", type=int, default=7)
    parser.add_argument("--regularizer", type=float, default=10.0)
    parser.add_argument("--budget", type=float, default=150.0)
    args = parser.parse_args()
    Anchored.penalty = _variant(args.penalty)
    cfg = FinetuneConfig(output=args.output, strategy=args.method, regularizer=args.regularizer, lr=3e-3,
                         time_budget=args.budget, updates=100_000, eval_scales=(0.0, 1.0), progress=False,
                         target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"))
    result = finetune(digits_task("class", target=args.target), cfg)
    print(json.dumps({"penalty": args.penalty, "method": args.method, "updates": result.updates,
                      "evaluation": result.evaluation}, indent=1))


if __name__ == "__main__":
    main()
