"""Tiny text-to-image parts built from config with fixed seeds, as plain functions: the fixtures of conftest.py
and the bad-input survey (benchmarks/bad_inputs_survey.py, which runs outside pytest) both build them here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer: every letter, alone and word-final, and no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.model_max_length = 16
    return tok


def clip(tok: CLIPTokenizer) -> CLIPModel:
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4},
        projection_dim=8,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval().requires_grad_(False)


def stable_diffusion(tok: CLIPTokenizer):
    """Stable Diffusion's parts, tiny: a text-conditioned UNet, a VAE (8x8 latents for 16x16 images) and a text
    encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval().requires_grad_(False)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        scaling_factor=0.18215,
    ).eval().requires_grad_(False)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval().requires_grad_(False)
    return unet, vae, text_encoder


def save_pipeline(parts, tok: CLIPTokenizer, folder: Path) -> Path:
    """The tiny parts saved as a diffusers StableDiffusionPipeline folder (with SD's default PNDM scheduler)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    unet, vae, text_encoder = parts
    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def save_classifier(folder: Path) -> Path:
    """A tiny ViT image classifier (3 classes, 16x16 input) saved with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32,
                                        num_labels=3)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
