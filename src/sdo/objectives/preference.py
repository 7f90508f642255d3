"""Text-image and preference rewards on CLIP models, each ``reward(images in [-1, 1], prompts) -> one score per
image`` (higher is better), differentiable in the images, with the model's own preprocessing done differentiably
(:meth:`~sdo.objectives.clip.ClipPreprocess.from_processor`): the rewards people tune on, loaded offline from local
folders by :func:`sdo.backbones.load_reward`.

- :class:`CLIPScore`: 100 cos(E_img, E_txt) (Hessel et al., 2021, as torchmetrics scales it; without its floor at
  0, so the gradient never vanishes);
- :class:`PickScore`: the PickScore model's logit, exp(logit_scale) cos(E_img, E_txt) (Kirstain et al., 2023);
- :class:`LaionAesthetic`: the LAION aesthetic predictor v2 (an MLP on the normalized CLIP ViT-L/14 image
  embedding; prompts are not read);
- HPSv2.1 and ImageReward ship as packages of their own whose requirements replace the CPU torch build
  (:func:`package_reward` says so).

:func:`~sdo.objectives.rewards.parse_rewards` reads the command line's ``NAME[:weight],...`` of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import UsageError
from .clip import AestheticScore, ClipPreprocess, _image_embeds, encode_texts

__all__ = ["REWARD_NAMES", "CLIPScore", "LaionAesthetic", "PickScore", "package_reward"]

#: the rewards ``--reward`` takes for a pipeline, with what each needs
REWARD_NAMES = {"clip": "--clip (a CLIPModel folder)", "pickscore": "--pickscore (the PickScore CLIPModel folder)",
                "aesthetic": "--clip (CLIP ViT-L/14) and --head (the LAION v2 MLP)",
                "hpsv2": "the hpsv2 package", "imagereward": "the image-reward package"}

_PACKAGES = {"hpsv2": ("hpsv2", "HPSv2.1", "hpsv2"), "imagereward": ("ImageReward", "ImageReward", "image-reward")}


class _CLIPReward:
    """A CLIPModel, its tokenizer and its image preprocessing; text embeddings cached per prompt."""

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.preprocess = preprocess or ClipPreprocess.for_model(model)
        self._texts: dict[str, torch.Tensor] = {}

    def _prompts(self, prompts: str | Sequence[str], batch: int) -> list[str]:
        prompts = [prompts] * batch if isinstance(prompts, str) else [str(p) for p in prompts]
        if len(prompts) == 1:
            prompts = prompts * batch
        if len(prompts) != batch:
            raise UsageError(f"{len(prompts)} prompts for {batch} images: give one, or one per image")
        return prompts

    def _text(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._texts})
        if missing:
            for prompt, embed in zip(missing, encode_texts(self.model, self.tokenizer, missing), strict=True):
                self._texts[prompt] = embed
        return torch.stack([self._texts[p] for p in prompts])

    def cosine(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """cos(E_img, E_txt) per image."""
        text = self._text(self._prompts(prompts, images.shape[0]))
        embeds = _image_embeds(self.model, self.preprocess(images))
        return (embeds * text.to(embeds)).sum(-1).float()


class CLIPScore(_CLIPReward):
    """CLIP score: 100 cos(E_img(image), E_txt(prompt)) per image."""

    def __call__(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        return 100 * self.cosine(images, prompts)


class PickScore(_CLIPReward):
    """PickScore (Kirstain et al., 2023, "Pick-a-Pic"): exp(logit_scale) cos(E_img, E_txt) of the PickScore CLIP
    (ViT-H/14 fine-tuned on Pick-a-Pic), the logit its authors rank images by."""

    def __call__(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


class LaionAesthetic:
    """The LAION aesthetic predictor (v2: an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 on the normalized CLIP ViT-L/14
    image embedding) as a reward: its score per image, clipped to [1, 10] with the gradient kept
    (:meth:`~sdo.objectives.clip.AestheticScore.score`); prompts are not read."""

    def __init__(self, model, head: torch.nn.Module, preprocess: ClipPreprocess | None = None):
        self.scorer = AestheticScore(model, head, preprocess)

    def __call__(self, images: torch.Tensor, prompts: str | Sequence[str] = ()) -> torch.Tensor:
        return self.scorer.score(images).float()


def package_reward(name: str):
    """HPSv2.1 or ImageReward: each is its own pip package (``hpsv2``, ``image-reward``), and on a CPU-only torch
    both resolve to a new CUDA build of torch (torch 2.14.1 with the nvidia-* wheels, torchvision, triton; hpsv2 also
    pins pytest==7.2.0 and protobuf<4), so sdo neither installs nor wraps them: a :class:`~sdo.UsageError` that says
    which, and what to use instead."""
    module, title, pip_name = _PACKAGES[name]
    try:
        __import__(module)
        found = f"{pip_name} is installed, but sdo has no differentiable {title} adapter"
    except ImportError:
        found = f"{pip_name} is not installed"
    raise UsageError(f"{title}: {found}. `pip install {pip_name}` replaces the CPU torch build with a CUDA one "
                     "(torch 2.14.1, torchvision, nvidia-* wheels), so sdo does not wrap it; use --reward pickscore, "
                     "clip or aesthetic", "reward")
