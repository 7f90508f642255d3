"""The weight memory of SDXL, SD3.5-medium and FLUX.1-dev at full size, computed from their configs (no weights:
the models are built on the meta device with accelerate's ``init_empty_weights``), with the LoRA sdo trains
(rank 4 on the attention projections to_q, to_k, to_v, to_out.0).

    python benchmarks/model_sizes.py --output benchmarks/results/model_sizes   # a few seconds

The denoiser configs are the ones in benchmarks/configs (as the pipelines' config.json files give them); the text
encoders' and VAEs' are written below. Weights only: activations depend on the resolution, the batch and the
gradient method (measured on a GPU by ``sdo bench``, when one is lent)."""

import argparse
import json
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}
CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
          "num_attention_heads": 20, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
          "feed_forward_proj": "gated-gelu"}
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
FAMILIES = {
    "SDXL": ("sdxl_unet", [("CLIP-L", "clip", CLIP_L), ("CLIP-G", "clip-projection", CLIP_G),
                           ("VAE (float32: SDXL's overflows in float16)", "vae4", VAE)]),
    "SD3.5-medium": ("sd35_medium_transformer", [("CLIP-L", "clip-projection", CLIP_L),
                                                 ("CLIP-G", "clip-projection", CLIP_G),
                                                 ("T5-XXL (optional: text_encoder_3=None)", "t5", T5_XXL),
                                                 ("VAE", "vae16", VAE)]),
    "FLUX.1-dev": ("flux1_dev_transformer", [("CLIP-L", "clip", CLIP_L), ("T5-XXL", "t5", T5_XXL),
                                             ("VAE", "vae16", VAE)]),
}


def _count(kind: str, config: dict) -> int:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():
        if kind == "clip":
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
        elif kind == "clip-projection":
            model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config))
        elif kind == "t5":
            model = transformers.T5EncoderModel(transformers.T5Config(**config))
        elif kind.startswith("vae"):
            model = diffusers.AutoencoderKL(latent_channels=int(kind[3:]), **config)
        else:
            config = dict(config)
            model = getattr(diffusers, config.pop("_class_name")).from_config(config)
    if hasattr(model, "tie_weights"):  # T5's token embedding is shared with its encoder's, as in the checkpoints
        model.tie_weights()
    return sum(p.numel() for p in model.parameters()), model


def _lora(model) -> int:
    import torch

    names = ("to_q", "to_k", "to_v", "to_out.0")
    return sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="a new folder for results.json and results.md")
    args = parser.parse_args()
    if args.output.exists() and any(args.output.iterdir()):
        raise SystemExit(f"{args.output} is not empty; give a new folder")
    rows, results = [], {}
    for family, (denoiser, others) in FAMILIES.items():
        n, model = _count("denoiser", json.loads((CONFIGS / f"{denoiser}.json").read_text()))
        parts = {"denoiser": n, "lora_rank4_attention": _lora(model)}
        for label, kind, config in others:
            parts[label] = _count(kind, config)[0]
        results[family] = parts
        for label, count in parts.items():
            width = 4 if label.startswith("VAE (float32") or label == "lora_rank4_attention" else 2
            rows.append(f"| {family} | {label} | {count / 1e6:,.1f} M | {count * width / 2**30:.2f} GiB "
                        f"({'float32' if width == 4 else 'bfloat16'}) |")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = ["| family | part | parameters | weights |", "| --- | --- | --- | --- |", *rows]
    (args.output / "results.md").write_text(
        "# Weight memory at full size, computed from the configs (no GPU; weights only)\n\n"
        "`python benchmarks/model_sizes.py --output benchmarks/results/model_sizes`\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
