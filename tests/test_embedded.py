"""The shipped digits models: they load offline, meet a loose version of the model card's bar, and the
training code that made them is deterministic."""

import json

import pytest
import torch
from safetensors.torch import load_file

import sdo
from sdo.embedded import load_digits, weights_dir
from sdo.embedded.digits import DigitClassifier, TrainConfig, load_dataset, train_digits


@pytest.fixture(scope="module")
def models():
    return load_digits()


def test_loader_returns_frozen_models(models):
    assert models.image_size == 16 and models.num_classes == 10 and models.null_class == 10
    assert type(models.scheduler).__name__ == "DDIMScheduler" and models.scheduler.config.clip_sample is False
    assert isinstance(models.classifier, DigitClassifier)
    for model in (models.unet, models.classifier):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.zeros(2, 1, 16, 16)
    assert models.classifier(x).shape == (2, 10)
    assert models.unet(x, torch.tensor([500, 500]), class_labels=torch.tensor([3, 10])).sample.shape == (2, 1, 16, 16)


def test_shipped_files_are_small_safetensors():
    root = weights_dir()
    sizes = {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
    assert {"digits_unet.safetensors", "digits_classifier.safetensors", "digits_scheduler.json",
            "digits_card.json"} <= set(sizes)
    assert sum(sizes.values()) <= 20 * 2**20
    assert len(load_file(str(root / "digits_unet.safetensors"))) > 50


def test_model_card_sample_figures_are_recomputed(models):
    """The card's sample figures, recomputed with a hand-written loop over diffusers' own DDIMScheduler (not sdo's
    solver): the same 1,000 class-conditional draws (seed 0, batches of 250, labels cycling 0-9), 50 DDIM steps; the
    share the classifier reads as their class with probability > 0.9, and its accuracy. Then the card's bar."""
    card = models.card["samples"]
    assert (card["samples"], card["ddim_steps"]) == (1000, 50)
    scheduler = type(models.scheduler).from_config(models.scheduler.config)
    scheduler.set_timesteps(50)
    gen, confident, correct = torch.Generator().manual_seed(0), 0, 0
    with torch.no_grad():
        for labels in (torch.arange(1000) % 10).split(250):
            x = torch.randn(len(labels), 1, 16, 16, generator=gen)
            for t in scheduler.timesteps:
                x = scheduler.step(models.unet(x, t, class_labels=labels).sample, t, x).prev_sample
            probs = models.classifier(x.clamp(-1, 1)).softmax(-1)
            confident += int((probs[torch.arange(len(labels)), labels] > 0.9).sum())
            correct += int((probs.argmax(-1) == labels).sum())
    # float32 round-off between the two loops may flip a sample at the 0.9 threshold
    assert confident / 1000 == pytest.approx(card["confident_correct"], abs=0.003)
    assert correct / 1000 == pytest.approx(card["accuracy"], abs=0.003)
    assert card["confident_correct"] >= 0.90 and models.card["classifier"]["test_accuracy"] >= 0.97


def test_classifier_accuracy_on_held_out_split(models):
    images, labels = load_dataset("test")
    assert len(labels) == 297
    with torch.no_grad():
        accuracy = (models.classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(models.card["classifier"]["test_accuracy"], abs=1e-6)


def test_class_conditional_samples_are_recognized(models):
    """A loose version of the card's bar: 30 samples (20 DDIM steps), >= 80% confidently their class."""
    labels = torch.arange(30) % 10
    chain = sdo.Chain.from_diffusers(models.unet, models.scheduler, 20, cond={"class_labels": labels})
    x = torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        probs = models.classifier(sdo.sample(chain, x).clamp(-1, 1)).softmax(-1)
    confident = (probs[torch.arange(30), labels] > 0.9).float().mean().item()
    assert confident >= 0.8, confident


def test_dataset_splits_are_disjoint_and_scaled():
    train, _ = load_dataset("train")
    test, _ = load_dataset("test")
    assert len(train) + len(test) == 1797 and train.shape[1:] == (1, 16, 16)
    assert train.min() >= -1 and train.max() <= 1 and train.min() == -1
    flat_test = {tuple(t.flatten().tolist()) for t in test}
    assert sum(tuple(t.flatten().tolist()) in flat_test for t in train[:300]) < 5  # different images
    with pytest.raises(ValueError):
        load_dataset("validation")


def test_training_is_deterministic(tmp_path):
    cfg = TrainConfig(classifier_epochs=1, unet_steps=3, eval_samples=10, eval_steps=2)
    cards = [train_digits(tmp_path / str(k), cfg, progress=False) for k in range(2)]
    for name in ("digits_unet.safetensors", "digits_classifier.safetensors"):
        a, b = (load_file(str(tmp_path / str(k) / name)) for k in range(2))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert cards[0]["samples"] == cards[1]["samples"]
    card = json.loads((tmp_path / "0" / "digits_card.json").read_text())
    assert card["config"]["unet_steps"] == 3 and card["seconds"]["total"] > 0
