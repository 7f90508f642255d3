"""Shared fixtures: one intra-op thread, and tiny text-to-image parts built from config with fixed seeds (a CLIP
tokenizer written by the test, CLIP, Stable Diffusion's UNet/VAE/text encoder, a saved StableDiffusionPipeline
folder, a ViT image classifier folder). Module-scoped: each test module builds its own."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))  # for `import helpers` and `import tiny`
import tiny


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread beats two (thread start-up dominates)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A character-level CLIP BPE tokenizer: every letter, alone and word-final, and no merges."""
    return tiny.tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def clip(tokenizer):
    return tiny.clip(tokenizer)


@pytest.fixture(scope="module")
def tiny_sd(tokenizer):
    """Stable Diffusion's parts, tiny: a text-conditioned UNet, a VAE (8x8 latents for 16x16 images) and a text
    encoder, all built from config with fixed seeds."""
    return tiny.stable_diffusion(tokenizer)


@pytest.fixture(scope="module")
def pipeline_folder(tiny_sd, tokenizer, tmp_path_factory):
    """The tiny parts saved as a diffusers StableDiffusionPipeline folder (with SD's default PNDM scheduler)."""
    return tiny.save_pipeline(tiny_sd, tokenizer, tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    """A tiny ViT image classifier (3 classes, 16x16 input) saved with its image processor."""
    return tiny.save_classifier(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def digits():
    """The embedded digits models (fine-tuning tests copy the UNet before adding LoRAs to it)."""
    from sdo.embedded import load_digits

    return load_digits()


@pytest.fixture(scope="module")
def judge():
    """The k-NN digit judge of the fine-tuning tasks."""
    from sdo.embedded.judge import DigitJudge

    return DigitJudge()


@pytest.fixture
def head(tmp_path):
    """A LAION-style aesthetic head file (a linear layer on 8-dim CLIP image embeddings) for the aesthetic task."""
    path = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(1, 8, generator=torch.Generator().manual_seed(0)), "bias": torch.tensor([5.0])},
              str(path))
    return path
