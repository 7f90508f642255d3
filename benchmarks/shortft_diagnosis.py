"""Where a ShortFT run's samples leave the digits: its LoRAs switched on and off by segment, and how far the latent
drifts from the base model's along the chain when only the first segment's LoRA acts.

    python benchmarks/shortft_diagnosis.py RUN --target 7      # RUN: an `sdo shortft` run folder

Prints, for each rule of which LoRAs act at which step, the judge's target and rejection rates and the classifier's
target rate on 64 fixed-seed samples; then, with LoRA 1 in segment 1 only, the RMS change of the model output and the
relative distance of the latent from the base model's at each step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sdo
from sdo.embedded import load_digits
from sdo.embedded.judge import DigitJudge
from sdo.finetuning.shortft import load_shortft, segment_ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    models, judge = load_digits(), DigitJudge()
    tuned = load_shortft(models.unet, args.run / "lora")
    x = torch.randn(args.n, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = {"class_labels": torch.full((args.n,), models.null_class)}
    names = tuned.adapters
    ends = [int(t) for t in tuned.timesteps]

    class Rule(torch.nn.Module):  # the UNet with the adapters active(t) at each call
        def __init__(self, active):
            super().__init__()
            self.active, self.config = active, models.unet.config

        def forward(self, sample, timestep=None, **kwargs):
            on = self.active(float(torch.as_tensor(timestep).reshape(-1)[0]))
            saved = [(m, m._active_adapter) for m in tuned._layers]
            for m, _ in saved:
                m._active_adapter = [a for a in on if a in m.lora_A]
            try:
                return models.unet(sample, timestep, **kwargs)
            finally:
                for m, active in saved:
                    m._active_adapter = active

    seg = tuned.segment
    rules = {
        "inference (LoRAs 1..j over segment j)": lambda t: names[: seg(t) + 1],
        "no LoRA (the base model)": lambda t: [],
        "LoRA 1 everywhere": lambda t: names[:1],
        "LoRA 1 in segment 1 only": lambda t: names[:1] if seg(t) == 0 else [],
        "LoRAs at the segment ends 2..k only": lambda t: names[: seg(t) + 1] if seg(t) > 0 and int(t) in ends else [],
        **{f"inference without LoRA {j + 1}": (lambda j: lambda t: [a for a in names[: seg(t) + 1] if a != names[j]])(j)
           for j in range(1, len(names))},
    }
    print(f"{args.run}: segments end at t = {ends} (steps {list(segment_ends(50, len(names)))})")
    with torch.no_grad():
        for label, active in rules.items():
            x0 = sdo.sample(sdo.Chain.from_diffusers(Rule(active), models.scheduler, 50, cond=cond), x)
            said, read = judge(x0), models.classifier(x0.clamp(-1, 1)).argmax(1)
            print(f"{label:42s} judge {args.target}: {float((said == args.target).float().mean()):.2f}  rejected: "
                  f"{float((said < 0).float().mean()):.2f}  classifier {args.target}: "
                  f"{float((read == args.target).float().mean()):.2f}")
        base = sdo.Chain.from_diffusers(Rule(lambda t: []), models.scheduler, 50, cond=cond)
        first = sdo.Chain.from_diffusers(Rule(rules["LoRA 1 in segment 1 only"]), models.scheduler, 50, cond=cond)
        xb, xt, sb, st = x, x, base.init_state(x), first.init_state(x)
        print("\nLoRA 1 in segment 1 only: step, t, RMS(eps_tuned - eps_base) on the tuned path, |x - x_base| / |x_base|")
        for i in range(50):
            change = float((first.denoise(i, xt) - base.denoise(i, xt)).pow(2).mean().sqrt())
            xb, sb = base.step(i, xb, sb)
            xt, st = first.step(i, xt, st)
            if i % 6 == 0 or i in (11, 12, 49):
                print(f"{i:3d} {int(base.timesteps[i]):4d} {change:.3f} {float((xt - xb).norm() / xb.norm()):.3f}")


if __name__ == "__main__":
    main()
