#!/usr/bin/env bash
# One SDO latent gradient and one SDO LoRA fine-tuning gradient against Full with checkpointing and DRaFT-1, on an
# SDXL UNet, an SD3.5-medium transformer and a FLUX.1-dev transformer built from their configs with random weights
# (benchmarks/configs; real-size costs without a download), at 1024 px in bfloat16, batch 1, 28 steps: seconds and
# peak memory (max_memory_allocated). Each model runs twice: as it is, and with checkpointing inside its blocks.
#
#   bash benchmarks/gpu_families.sh [OUTPUT]     # a CUDA machine; default OUTPUT benchmarks/results/gpu_families
#
# Rows: "sdo" / "checkpoint" (Full, every call recomputed in backward) / "truncated" (DRaFT-1) for the latent's
# gradient; the same with "+params" for the gradient of a rank-4 LoRA on the attention (what one fine-tuning update
# pays, without the optimizer step). No fidelity (Full's stored graph does not fit at this size), no sweep.
set -euo pipefail
out=${1:-benchmarks/results/gpu_families}
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then echo "$out is not empty; give a new folder" >&2; exit 2; fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures GPU costs')"
for model in sdxl_unet sd35_medium_transformer flux1_dev_transformer; do
  for blocks in "" "--block-checkpointing"; do
    name=$model${blocks:+-blocks}
    echo "== $name" >&2
    sdo bench --model "benchmarks/configs/$model.json" --device cuda --dtype bfloat16 --steps 28 --batch 1 \
      --strategies sdo,checkpoint,truncated --lora 4 $blocks --no-fidelity --sweep none --guidance-scales none \
      --quality-iterations 0 --repeats 2 --output "$out/$name" --no-progress
  done
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["| model | blocks checkpointed | row | seconds | x SDO | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
for path in sorted(out.glob("*/bench.json")):
    r = json.loads(path.read_text())
    for label in ("sdo", "checkpoint", "truncated", "sdo+params", "checkpoint+params", "truncated+params"):
        row = r["main"][label]
        lines.append(f"| {path.parent.name.removesuffix('-blocks')} | {path.parent.name.endswith('-blocks')} | {label} "
                     f"| {row['seconds']:.3g} | {row.get('time_vs_sdo', float('nan')):.3g} | {row['peak_mb'] / 1024:.3g} |")
device = json.loads(next(out.glob("*/bench.json")).read_text())["meta"]["cuda_device"]
(out / "results.md").write_text(f"# SDXL, SD3.5-medium, FLUX.1-dev (random weights), {device}\n\n"
                                "`bash benchmarks/gpu_families.sh`\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
PY
