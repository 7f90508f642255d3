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


def t5_tokenizer():
    """A T5 tokenizer without sentencepiece files: a Unigram model over letters and word-initial letters, with
    T5's pad/eos/unk tokens and its ``</s>`` appended to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer, model.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=16)


def _clip_text(tok: CLIPTokenizer, hidden_size: int, projection_dim: int | None = None):
    """A 2-layer CLIP text encoder, seeded; with a text projection (``CLIPTextModelWithProjection``, whose first
    output is the projected pooled embedding) when ``projection_dim`` is given."""
    from transformers import CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=projection_dim or 8,
    )
    torch.manual_seed(0)
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def _t5(tok, d_model: int):
    """A 2-layer T5 encoder, seeded."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _vae(latent_channels: int, **kwargs):
    """A seeded VAE of 8x8 latents for 16x16 images (two blocks: ``vae_scale_factor`` 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), **kwargs,
    )


def save_sdxl(folder: Path) -> Path:
    """A saved StableDiffusionXLPipeline, tiny: a UNet with SDXL's added conditioning (the pooled projection of
    text_encoder_2, 8, plus six 4-wide time ids = 32 inputs), cross-attending to the concatenated penultimate
    hidden states of the two CLIP text encoders (8 + 16 = 24), a VAE of 8x8 latents for 16x16 images, SDXL's
    Euler scheduler."""
    import tempfile

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer(Path(tmp))
    text_encoder, text_encoder_2 = _clip_text(tok, 8), _clip_text(tok, 16, projection_dim=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8 + 16, attention_head_dim=2, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
    )
    StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025, force_upcast=True), text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    ).save_pretrained(folder)
    return folder


def save_sd3(folder: Path) -> Path:
    """A saved StableDiffusion3Pipeline, tiny: a 2-layer MMDiT (2x2 patches of 16-channel 8x8 latents) over the
    concatenated CLIP hidden states (8 + 16 = 24, zero-padded to the T5 width 32) followed by the T5 ones, pooled
    CLIP projections 8 + 8 = 16, SD3's VAE constants and flow-matching Euler scheduler (shift 3)."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer(Path(tmp))
    t5_tok = t5_tokenizer()
    text_encoder, text_encoder_2 = _clip_text(tok, 8, projection_dim=8), _clip_text(tok, 16, projection_dim=8)
    text_encoder_3 = _t5(t5_tok, 32)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=8, pooled_projection_dim=8 + 8,
        pos_embed_max_size=16,
    )
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    ).save_pretrained(folder)
    return folder


def save_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """A saved FluxPipeline, tiny: a FLUX transformer (one double and one single block, guidance-embedded like
    FLUX.1-dev) over 2x2-packed 16-channel 8x8 latents (64 channels, 16 tokens), T5 hidden states (16) and the
    pooled CLIP text output (8), FLUX's VAE constants and dynamically shifted flow-matching Euler scheduler;
    ``guidance_embeds=False``: FLUX.1-schnell's transformer, which takes no guidance input."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer(Path(tmp))
    t5_tok = t5_tokenizer()
    text_encoder, text_encoder_2 = _clip_text(tok, 8), _t5(t5_tok, 16)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    FluxPipeline(
        scheduler=scheduler,
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok,
        transformer=transformer,
    ).save_pretrained(folder)
    return folder
