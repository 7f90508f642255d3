"""Loading the rewards of :mod:`sdo.objectives.preference` offline from local folders, by the command line's
``NAME[:weight],...`` (:func:`load_reward`)."""

from __future__ import annotations

from pathlib import Path

from ..checks import UsageError, check_device, reading
from ..objectives.clip import AestheticScore, ClipPreprocess
from ..objectives.preference import REWARD_NAMES, CLIPScore, LaionAesthetic, PickScore, package_reward
from ..objectives.rewards import WeightedReward, parse_rewards

__all__ = ["check_reward", "load_clip_reward_parts", "load_reward"]

_NEEDS = {"clip": ("clip",), "pickscore": ("pickscore",), "aesthetic": ("clip", "head")}
_PACKAGED = ("hpsv2", "imagereward")


def load_clip_reward_parts(path: str | Path, device="cpu") -> tuple:
    """``(model, tokenizer, preprocess)`` of a local CLIP folder (a ``CLIPModel``, its tokenizer and, where the folder
    has one, its image processor's ``preprocessor_config.json``; without it, CLIPImageProcessor's defaults at the
    model's input size: the shorter side resized to it, then the center square)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such CLIP model folder")
    with reading(path, "the reward's CLIP model"):
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if (path / "preprocessor_config.json").is_file():
            preprocess = ClipPreprocess.from_processor(AutoImageProcessor.from_pretrained(str(path),
                                                                                          local_files_only=True))
        else:
            side = model.config.vision_config.image_size
            preprocess = ClipPreprocess(side, crop=side)
    return model.to(check_device("device", device)).eval().requires_grad_(False), tokenizer, preprocess


def check_reward(spec: str, *, clip=None, pickscore=None, head=None) -> list[tuple[str, float]]:
    """The ``(name, weight)`` terms of ``spec``, each with the folders and files it needs given and present (a
    one-line :class:`~sdo.UsageError` or ``FileNotFoundError`` otherwise); loads nothing."""
    terms = parse_rewards(spec, tuple(REWARD_NAMES))
    given = {"clip": clip, "pickscore": pickscore, "head": head}
    for name, _ in terms:
        if name in _PACKAGED:
            package_reward(name)
        for option in _NEEDS[name]:
            if given[option] is None:
                raise UsageError(f"--reward {name} needs --{option}", option)
            exists = Path(given[option]).is_file() if option == "head" else Path(given[option]).is_dir()
            if not exists:
                raise FileNotFoundError(f"{given[option]}: no such {'file' if option == 'head' else 'folder'} "
                                        f"(--{option})")
    return terms


def load_reward(spec: str, *, clip: str | Path | None = None, pickscore: str | Path | None = None,
                head: str | Path | None = None, device="cpu", models: dict | None = None) -> WeightedReward:
    """The weighted sum of the rewards named in ``spec`` (``"pickscore:1,aesthetic:0.1"``; see
    :data:`~sdo.objectives.preference.REWARD_NAMES`), each model read once from its folder or file: ``clip`` (CLIP
    score; the CLIP ViT-L/14 of the aesthetic predictor), ``pickscore``, ``head`` (the LAION v2 MLP). Every name and
    path is checked before anything loads. ``models``: a dict of the CLIP folders read so far (by their resolved path
    and the device), filled as folders are read; pass the same one to load a reward and its judge, and a folder they
    both name is read once and its (frozen) model shared. Two options naming one folder read it once either way."""
    terms = check_reward(spec, clip=clip, pickscore=pickscore, head=head)
    given = {"clip": clip, "pickscore": pickscore, "head": head}
    models = {} if models is None else models

    def loaded(option: str) -> tuple:
        key = (str(Path(given[option]).resolve()), str(device))
        if key not in models:
            models[key] = load_clip_reward_parts(given[option], device)
        return models[key]

    rewards = []
    for name, weight in terms:
        if name == "clip":
            rewards.append((CLIPScore(*loaded("clip")), weight))
        elif name == "pickscore":
            rewards.append((PickScore(*loaded("pickscore")), weight))
        else:
            model, _, preprocess = loaded("clip")
            rewards.append((LaionAesthetic(model, AestheticScore.load_head(head), preprocess), weight))
    return WeightedReward(rewards)
