"""A fingerprint of short fine-tuning runs on the embedded digits model, to show that a change moved code without
changing what it computes: the SHA-256 of every LoRA file a run writes, its evaluation at LoRA scales 0, 0.3 and 1,
every metrics record but the timings, and the list of files written. Four runs of five updates: SDO with DRaFT+'s
penalty, DRaFT-2, ShortFT with the hacking guard checking every second update, and ShortFT without progressive
stages (its few-step model a copy of the teacher, so that steps = 8 is allowed).

    PYTHONPATH=<checkout>/src python benchmarks/finetune_fingerprint.py OUT.json   # about 20 s on 2 cores

Run it on two checkouts and compare the files (``cmp``); equal files mean equal LoRAs, bit for bit."""

import argparse
import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

import sdo
from sdo.recipes.finetune_tasks import digits_task

SMALL = {"steps": 8, "segments": 4, "batch_size": 2, "sample_every": 0, "eval_count": 4, "sample_count": 2,
         "eval_scales": (0.0, 0.3, 1.0), "progress": False, "cpu": True, "lr": 1e-2}
RUNS = {"sdo": {"strategy": "sdo", "regularizer": 0.5}, "truncated-2": {"strategy": "truncated", "k": 2},
        "shortft-guard": {"strategy": "shortft", "guard_every": 2, "guard_count": 4},
        "shortft-one-stage": {"strategy": "shortft", "progressive": False}}


def fingerprint(name: str, over: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        task = digits_task()
        task.few_step = copy.deepcopy(task.model)
        result = sdo.finetune(task, sdo.FinetuneConfig(output=folder, updates=5, **{**SMALL, **over}))
        files = sorted(f for f in folder.rglob("*") if f.is_file() and "checkpoints" not in f.parts)
        digest = hashlib.sha256()
        for f in (f for f in files if f.suffix == ".safetensors"):
            for key, value in sorted(load_file(str(f)).items()):
                digest.update(key.encode())
                digest.update(value.numpy().tobytes())
        return {"lora_sha256": digest.hexdigest(), "evaluation": result.evaluation,
                "metrics": [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in result.metrics],
                "files": [str(f.relative_to(folder)) for f in files]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the JSON file to write (must not exist)")
    args = parser.parse_args()
    if args.output.exists():
        sys.exit(f"{args.output} exists; give a new file")
    out = {name: fingerprint(name, over) for name, over in RUNS.items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print({name: r["lora_sha256"][:16] for name, r in out.items()})


if __name__ == "__main__":
    main()
