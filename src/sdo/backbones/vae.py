"""Latent-space chains: the VAE decoder inside the graph, so an objective on images reaches a latent
diffusion model's latents (Stable Diffusion, PixArt, LCM). Prompt encoding is conditioning
(:func:`sdo.backbones.conditioning.encode_prompts`).

    decode = sdo.VAEDecoder(vae, checkpoint=True)
    objective = sdo.decoded(clip_objective, decode)        # latent x0 -> image -> loss
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..checks import UsageError

__all__ = ["VAEDecoder", "decoded"]


class VAEDecoder:
    """``decoder(latents) -> images`` in [-1, 1], differentiable: ``vae.decode(latents / scaling_factor +
    shift_factor)``, with the scaling (and, where the config has one, shift) factor of the VAE's config (SD's
    0.18215), or the ones given.

    ``checkpoint=True`` recomputes the decoder's activations in backward (torch's non-reentrant checkpoint)
    instead of storing them: at 512x512 the decoder's graph is several GB. ``slicing=True`` decodes one sample at a
    time, each under its own checkpoint when ``checkpoint`` is set, so a batch's decode (or its recomputation in
    backward) holds one image's activations at a time: what a batch of 1024x1024 SDXL/SD3/FLUX images needs.
    ``tiling=True`` decodes in overlapping tiles (diffusers' ``enable_tiling``) for images larger than memory
    allows. The VAE is used as it is: freeze it (``requires_grad_(False)``) when only the latent's gradient is
    wanted.
    """

    def __init__(self, vae, scaling_factor: float | None = None, shift_factor: float | None = None,
                 checkpoint: bool = False, tiling: bool = False, slicing: bool = False):
        config = getattr(vae, "config", None)
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else getattr(config, "scaling_factor", 1.0))
        shift = shift_factor if shift_factor is not None else getattr(config, "shift_factor", None)
        self.shift_factor = float(shift or 0.0)
        if self.scaling_factor <= 0:
            raise UsageError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        self.checkpoint, self.slicing = bool(checkpoint), bool(slicing)
        if tiling:
            if not hasattr(vae, "enable_tiling"):
                raise UsageError(f"{type(vae).__name__} has no enable_tiling()")
            vae.enable_tiling()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the diffusion model's latents (the posterior mean, shifted and scaled), without a
        graph: the starting point of DDIM inversion."""
        with torch.no_grad():
            posterior = self.vae.encode(images.to(next(self.vae.parameters()).dtype)).latent_dist
        return (posterior.mean - self.shift_factor) * self.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(latents / self.scaling_factor + self.shift_factor)
        return getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(next(self.vae.parameters()).dtype)
        parts = latents.split(1) if self.slicing else (latents,)
        if self.checkpoint and torch.is_grad_enabled():
            return torch.cat([torch_checkpoint(self._decode, part, use_reentrant=False) for part in parts])
        return torch.cat([self._decode(part) for part in parts])


def decoded(objective: Callable[[torch.Tensor], torch.Tensor], decoder: Callable[[torch.Tensor], torch.Tensor]):
    """``objective`` on decoded images, as an objective on latents: ``x0 -> objective(decoder(x0))``."""

    def on_latents(x0: torch.Tensor) -> torch.Tensor:
        return objective(decoder(x0).float())

    on_latents.__name__ = getattr(objective, "__name__", None) or type(objective).__name__  # errors name it
    return on_latents
