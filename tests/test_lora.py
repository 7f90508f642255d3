"""sdo.finetuning.lora: injection, the file format (and diffusers' own loader reading it), exact scale/merge arithmetic
(float64), and the base/scale context managers."""

import copy
import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from sdo.finetuning.lora import (
    DEFAULT_TARGETS,
    add_lora,
    delta_weights,
    load_lora,
    lora_disabled,
    lora_parameters,
    lora_scale,
    lora_state_dict,
    save_lora,
    set_lora_scale,
)
from sdo.finetuning.lora_arithmetic import merge_lora_files, merge_loras, scale_lora, scale_lora_files
from sdo.finetuning.lora_files import config_dict, read_lora, write_lora

FILES = {"pytorch_lora_weights.safetensors", "adapter_config.json"}


def tiny_unet(dtype=torch.float64):
    """A tiny text-conditioned UNet2DConditionModel (SD's denoiser), fixed seed."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval().to(dtype)


def tiny_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.tensor([3, 700]),
            torch.randn(2, 5, 8, generator=g).to(dtype))


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def randomize(model, adapter_name="default", seed=2, std=0.3):
    """Nonzero LoRA weights (B starts at zero), so that the LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, adapter_name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def digits_unet():
    from sdo.embedded import load_digits

    return load_digits().unet


@pytest.fixture
def digits(digits_unet):
    """(a fresh copy of the digits UNet, its inputs)."""
    g = torch.Generator().manual_seed(0)
    return copy.deepcopy(digits_unet), (torch.randn(2, 1, 16, 16, generator=g), torch.tensor([10, 500]),
                                        torch.tensor([1, 3]))


def digits_run(model, inputs):
    x, t, c = inputs
    with torch.no_grad():
        return model(x, t, class_labels=c).sample


def test_add_lora_keeps_output_trains_only_lora_and_seeds_privately(digits):
    model, inputs = digits
    before = digits_run(model, inputs)
    twin = copy.deepcopy(model)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    config = add_lora(model, rank=4, init_seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert config.r == 4 and config.lora_alpha == 4 and set(config.target_modules) == set(DEFAULT_TARGETS)
    assert torch.equal(digits_run(model, inputs), before)  # B = 0
    params = lora_parameters(model)
    assert len(params) == 2 * 4 * 4  # A and B of to_q/k/v/out.0 in 4 attention blocks
    assert [id(p) for p in params] == [id(p) for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if ".lora_" in n]
    assert names == [n for n, p in model.named_parameters() if any(p is q for q in params)]
    add_lora(twin, init_seed=0)  # the same seed draws the same A
    first, second = lora_parameters(model), lora_parameters(twin)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert any(p.abs().sum() > 0 for p in first)
    assert set(lora_state_dict(model)) == {n.replace(".default", "") for n in names}


def test_lora_is_float32_on_a_bfloat16_base():
    model = tiny_unet(torch.bfloat16)
    add_lora(model, target_modules=["to_q", "conv1"], init_seed=0)
    randomize(model, std=0.1)
    params = lora_parameters(model)
    assert {p.dtype for p in params} == {torch.float32} and all(p.requires_grad for p in params)
    assert all(not p.requires_grad for p in model.parameters() if all(p is not q for q in params))
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if ".lora_" not in n)
    x, t, e = tiny_inputs(torch.bfloat16)
    out = model(x, t, e).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params if p.ndim == 4)  # the conv1 LoRA is in the graph


def test_add_lora_errors_name_the_fix():
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"to_q.*conv1|conv1.*to_q|conv_in"):
        add_lora(model, target_modules=["no_such_layer"])
    add_lora(model)
    with pytest.raises(ValueError, match="already has a LoRA adapter 'default'"):
        add_lora(model)
    with pytest.raises(ValueError, match="no LoRA adapter 'other'"):
        lora_parameters(model, "other")


def test_save_load_round_trip_on_digits(digits, tmp_path):
    model, inputs = digits
    base = copy.deepcopy(model)
    add_lora(model, target_modules=[*DEFAULT_TARGETS, "conv1"], init_seed=0)
    randomize(model, std=0.05)
    trained = digits_run(model, inputs)
    assert not torch.allclose(trained, digits_run(base, inputs))
    save_lora(model, tmp_path)
    assert set(os.listdir(tmp_path)) == FILES  # no temporary files left behind
    loaded = copy.deepcopy(base)
    config = load_lora(loaded, tmp_path, trainable=True)  # same requires_grad: CPU kernels may differ otherwise
    assert config.r == 4 and "conv1" in config.target_modules
    assert torch.equal(digits_run(loaded, inputs), trained)
    frozen = copy.deepcopy(base)
    load_lora(frozen, tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_round_trip_and_diffusers_interop_on_unet2dcondition(tmp_path):
    model = tiny_unet()
    add_lora(model, rank=3, alpha=6, target_modules=[*DEFAULT_TARGETS, "conv1"], init_seed=0)
    randomize(model)
    for p in lora_parameters(model):
        p.requires_grad_(False)
    inputs = tiny_inputs()
    trained = run(model, inputs)
    assert not torch.allclose(trained, run(tiny_unet(), inputs))
    save_lora(model, tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "pytorch_lora_weights.safetensors", framework="pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    # the keys and the config as a pipeline's save_lora_weights files them: under the UNet's component name
    assert metadata["format"] == "pt" and json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 6
    assert keys == {f"unet.{k}" for k in lora_state_dict(model)}
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    ours = tiny_unet()
    load_lora(ours, tmp_path / "ours")
    assert torch.equal(run(ours, inputs), trained)
    theirs = tiny_unet()  # diffusers' own loader reads our folder
    theirs.load_lora_adapter(tmp_path / "ours", prefix="unet", use_safetensors=True, adapter_name="default")
    torch.testing.assert_close(run(theirs, inputs), trained, rtol=0, atol=1e-12)
    theirs.save_lora_adapter(tmp_path / "theirs")  # and we read diffusers' own files: a model's (no prefix) ...
    back = tiny_unet()
    load_lora(back, tmp_path / "theirs")
    torch.testing.assert_close(run(back, inputs), trained, rtol=0, atol=1e-12)
    from diffusers import StableDiffusionPipeline  # ... and a pipeline trainer's, with its config and without

    state = lora_state_dict(model)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "trainer", unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config_dict(model.peft_config["default"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "bare", unet_lora_layers=scale_lora(state, {"r": 3}, 2)[0])
    back = tiny_unet()
    load_lora(back, tmp_path / "trainer")
    torch.testing.assert_close(run(back, inputs), trained, rtol=0, atol=1e-12)
    bare = tiny_unet()  # no config: rank 3 read off the weights, lora_alpha = r as diffusers infers it (scaling 1,
    load_lora(bare, tmp_path / "bare")  # so B scaled by alpha / r = 2 above gives the trained model back)
    torch.testing.assert_close(run(bare, inputs), trained, rtol=1e-5, atol=1e-6)


def test_pipeline_files_keep_their_denoiser_part_and_prefix(tmp_path):
    """A pipeline file with text-encoder LoRAs too: sdo reads the UNet's part and says so; one with text-encoder
    LoRAs only is refused; scale and merge write the keys under the sources' component name."""
    from diffusers import StableDiffusionPipeline

    from sdo import UsageError
    from sdo.finetuning.lora_files import lora_file_prefix

    model = tiny_unet()
    add_lora(model, rank=2, init_seed=0)
    state = lora_state_dict(model)
    te = {"text_model.encoder.layers.0.self_attn.q_proj" + s: torch.ones(*shape) for s, shape in
          ((".lora_A.weight", (2, 8)), (".lora_B.weight", (8, 2)))}
    StableDiffusionPipeline.save_lora_weights(tmp_path / "both", unet_lora_layers=state, text_encoder_lora_layers=te)
    with pytest.warns(UserWarning, match=r"also holds LoRA weights of \['text_encoder'\]; sdo reads its unet part"):
        read, config = read_lora(tmp_path / "both")
    assert read.keys() == state.keys() and config["r"] == 2
    StableDiffusionPipeline.save_lora_weights(tmp_path / "te", text_encoder_lora_layers=te)
    with pytest.raises(UsageError, match="text-encoder LoRA weights only"):
        read_lora(tmp_path / "te")
    save_lora(model, tmp_path / "ours")
    scale_lora_files(tmp_path / "ours", tmp_path / "scaled", 0.5)
    merge_lora_files([tmp_path / "ours", tmp_path / "scaled"], [1.0, 1.0], tmp_path / "merged")
    assert [lora_file_prefix(tmp_path / n) for n in ("ours", "scaled", "merged")] == ["unet"] * 3
    model.save_lora_adapter(tmp_path / "bare")  # a model's own file has no prefix, and its scaled copy neither
    scale_lora_files(tmp_path / "bare", tmp_path / "bare-scaled", 2.0)
    assert lora_file_prefix(tmp_path / "bare-scaled") is None


def test_write_is_atomic(tmp_path, monkeypatch):
    model = tiny_unet()
    add_lora(model, init_seed=0)
    save_lora(model, tmp_path)
    before = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    randomize(model)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora(model, tmp_path)
    assert set(os.listdir(tmp_path)) == FILES
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == before


def test_load_refuses_a_lora_that_does_not_fit(digits, tmp_path):
    model, _ = digits
    add_lora(model, init_seed=0)
    save_lora(model, tmp_path / "digits")
    other = tiny_unet()
    with pytest.raises(ValueError, match="does not fit UNet2DConditionModel.*missing"):
        load_lora(other, tmp_path / "digits")
    assert "default" not in getattr(other, "peft_config", {})  # no half-loaded adapter left
    state, config = read_lora(tmp_path / "digits")
    key = "mid_block.attentions.0.to_q"
    state[key + ".lora_A.weight"] = torch.zeros(4, 33)
    write_lora(tmp_path / "wrong", state, config)
    with pytest.raises(ValueError, match=r"to_q.lora_A.weight: file \(4, 33\), model \(4, 64\)"):
        load_lora(copy.deepcopy(model), tmp_path / "wrong", adapter_name="wrong")


def test_scale_lora_is_theta_plus_alpha_delta(tmp_path):
    model = tiny_unet()
    add_lora(model, rank=2, alpha=5, target_modules=["to_q", "to_out.0", "conv1"], init_seed=0)
    randomize(model)
    save_lora(model, tmp_path / "a")
    scale_lora_files(tmp_path / "a", tmp_path / "scaled", 0.7)
    scaled = tiny_unet()
    load_lora(scaled, tmp_path / "scaled")
    with torch.no_grad():
        want, got = delta_weights(model), delta_weights(scaled)
    targets = {n for n, _ in tiny_unet().named_modules() if n.endswith((".to_q", ".to_out.0", ".conv1"))}
    assert want.keys() == got.keys() == targets
    for name in want:
        torch.testing.assert_close(got[name], 0.7 * want[name], rtol=1e-12, atol=1e-14)
    inputs = tiny_inputs()
    with lora_scale(model, 0.7):
        torch.testing.assert_close(run(scaled, inputs), run(model, inputs), rtol=1e-10, atol=1e-12)
    state, config = read_lora(tmp_path / "a")
    assert scale_lora(state, config, 1.0)[0].keys() == state.keys()


def test_merge_loras_is_the_weighted_sum_of_deltas(tmp_path):
    model = tiny_unet()
    add_lora(model, rank=2, alpha=3, target_modules=["to_q", "to_v"], adapter_name="a", init_seed=0)
    add_lora(model, rank=3, alpha=1.5, target_modules=["to_q", "conv1"], adapter_name="b", init_seed=1)
    randomize(model, "a", seed=3)
    randomize(model, "b", seed=4)
    save_lora(model, tmp_path / "a", adapter_name="a")
    # b with a per-module rank and alpha (rank_pattern, alpha_pattern): conv1 at rank 1, to_q's alpha 6
    state, config = lora_state_dict(model, "b"), model.peft_config["b"].to_dict()
    for key in [k for k in state if ".conv1.lora_" in k]:
        state[key] = state[key][:1] if ".lora_A." in key else state[key][:, :1]
    config.update(rank_pattern={"conv1": 1}, alpha_pattern={"to_q": 6.0})
    write_lora(tmp_path / "b", state, config)
    reference = tiny_unet()  # both adapters active at once, scaled by alpha and beta
    load_lora(reference, tmp_path / "a", adapter_name="a")
    load_lora(reference, tmp_path / "b", adapter_name="b")
    alpha, beta = 0.8, -1.3
    merge_lora_files([tmp_path / "a", tmp_path / "b"], [alpha, beta], tmp_path / "merged")
    _, merged_config = read_lora(tmp_path / "merged")
    assert merged_config["r"] == merged_config["lora_alpha"] == 2 + 3
    assert set(merged_config["target_modules"]) == {"to_q", "to_v", "conv1"}
    merged = tiny_unet()
    load_lora(merged, tmp_path / "merged")
    with torch.no_grad():
        da, db, dm = delta_weights(reference, "a"), delta_weights(reference, "b"), delta_weights(merged)
    assert dm.keys() == da.keys() | db.keys()
    assert da.keys() & db.keys() and da.keys() - db.keys() and db.keys() - da.keys()  # shared and own modules
    for name, got in dm.items():
        want = alpha * da.get(name, 0) + beta * db.get(name, 0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    inputs = tiny_inputs()
    with lora_scale(reference, alpha, "a"), lora_scale(reference, beta, "b"):
        torch.testing.assert_close(run(merged, inputs), run(reference, inputs), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(run(merged, inputs), run(tiny_unet(), inputs))


def test_lora_disabled_gives_the_base_and_restores_grad_state(digits):
    model, inputs = digits
    base = digits_run(model, inputs)
    add_lora(model, target_modules=["to_q", "conv1"], init_seed=0)
    randomize(model, std=0.05)
    params = lora_parameters(model)
    params[0].requires_grad_(False)  # a mixed state must come back exactly
    flags = [p.requires_grad for p in params]
    x, t, c = inputs
    loss = model(x, t, class_labels=c).sample.square().mean()  # a graph built before the context
    with lora_disabled(model):
        assert torch.equal(digits_run(model, inputs), base)
    assert [p.requires_grad for p in params] == flags
    trained = digits_run(model, inputs)
    assert not torch.allclose(trained, base)
    loss.backward()
    grads = [p.grad.clone() for p in params[1:]]
    for p in params:
        p.grad = None
    model(x, t, class_labels=c).sample.square().mean().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params[1:], strict=True))
    with pytest.raises(ValueError, match="no LoRA layers"), lora_disabled(tiny_unet()):
        pass


def test_lora_scale_interpolates_and_restores(digits):
    model, inputs = digits
    base = digits_run(model, inputs)
    add_lora(model, init_seed=0)
    randomize(model, std=0.05)
    trained = digits_run(model, inputs)
    with lora_scale(model, 0.0):
        assert torch.equal(digits_run(model, inputs), base)
    assert torch.equal(digits_run(model, inputs), trained)
    with pytest.raises(RuntimeError), lora_scale(model, 0.5):
        raise RuntimeError
    assert torch.equal(digits_run(model, inputs), trained)
    set_lora_scale(model, 0.0)
    assert torch.equal(digits_run(model, inputs), base)
    set_lora_scale(model, 1.0)
    assert torch.equal(digits_run(model, inputs), trained)


def test_scale_and_merge_refuse_bad_input():
    model = tiny_unet()
    add_lora(model, init_seed=0)
    randomize(model)
    state, config = lora_state_dict(model), model.peft_config["default"].to_dict()
    with pytest.raises(ValueError, match="at least one"):
        merge_loras([])
    with pytest.raises(ValueError, match="finite"):
        merge_loras([(state, config, float("nan"))])
    with pytest.raises(ValueError, match="finite"):
        scale_lora(state, config, float("inf"))
    key = next(iter(state))
    with pytest.raises(ValueError, match="non-finite"):
        merge_loras([({**state, key: state[key] * float("inf")}, config, 1.0)])
    with pytest.raises(ValueError, match="DoRA"):
        merge_loras([(state, {**config, "use_dora": True}, 1.0)])
    with pytest.raises(ValueError, match="DoRA"):
        scale_lora(state, {**config, "use_dora": True}, 2.0)
    with pytest.raises(ValueError, match="not a LoRA"):
        merge_loras([(state, {**config, "peft_type": "LOHA"}, 1.0)])
    wide = {k: torch.cat([v, v], 1) if k.endswith("lora_A.weight") else v for k, v in state.items()}
    with pytest.raises(ValueError, match="incompatible shapes"):
        merge_loras([(state, config, 1.0), (wide, config, 1.0)])
    with pytest.raises(ValueError, match="rank 4 but its weights have rank 2"):
        merge_loras([({k: v[:2] if "lora_A" in k else v[:, :2] for k, v in state.items()}, config, 1.0)])


def test_lora_command_scales_and_merges_like_the_functions(tmp_path, capsys):
    """`sdo lora scale` and `sdo lora merge` write the folders scale_lora_files / merge_lora_files write."""
    from sdo.cli import main

    for name, seed, targets in (("a", 2, DEFAULT_TARGETS), ("b", 3, ("to_q", "conv1"))):
        model = tiny_unet()
        add_lora(model, rank=2, target_modules=targets)
        randomize(model, seed=seed)
        save_lora(model, tmp_path / name)
    assert main(["lora", "scale", str(tmp_path / "a"), str(tmp_path / "cli_scaled"), "--alpha", "0.5"]) == 0
    scale_lora_files(tmp_path / "a", tmp_path / "fn_scaled", 0.5)
    assert main(["lora", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,-0.5",
                 "--output", str(tmp_path / "cli_merged")]) == 0
    merge_lora_files([tmp_path / "a", tmp_path / "b"], [1.0, -0.5], tmp_path / "fn_merged")
    for cli, fn in (("cli_scaled", "fn_scaled"), ("cli_merged", "fn_merged")):
        (s1, c1), (s2, c2) = read_lora(tmp_path / cli), read_lora(tmp_path / fn)
        assert c1 == c2 and s1.keys() == s2.keys()
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert main(["lora", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1",
                 "--output", str(tmp_path / "bad")]) == 2
    assert "one weight per LoRA" in capsys.readouterr().err


def test_lora_command_never_overwrites_a_source_and_asks_before_replacing(tmp_path, capsys):
    """`sdo lora scale X X` once zeroed X in place; `merge --output EXISTING` replaced it. Both are refused before
    any work, naming the reason or the flag, and no file changes; `--force` replaces an output that is not a source."""
    import hashlib

    from sdo.cli import main

    for name, seed in (("a", 2), ("b", 3)):
        model = tiny_unet()
        add_lora(model, rank=2, target_modules=DEFAULT_TARGETS)
        randomize(model, seed=seed)
        save_lora(model, tmp_path / name)

    def digest():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = digest()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cases = [(["lora", "scale", a, a, "--alpha", "0"], "is the source"),
             (["lora", "scale", a, a, "--alpha", "0", "--force"], "is the source"),
             (["lora", "scale", a, str(tmp_path / "a" / "sub"), "--alpha", "0"], "is the source"),
             (["lora", "merge", a, b, "--weights", "1,1", "--output", b, "--force"], "is the source"),
             (["lora", "merge", a, "--weights", "1", "--output", b], "pass --force"),
             (["lora", "scale", a, b, "--alpha", "2"], "pass --force")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
        assert digest() == before, argv
    assert main(["lora", "scale", a, b, "--alpha", "2", "--force"]) == 0
    (scaled, _), (source, _) = read_lora(tmp_path / "b"), read_lora(tmp_path / "a")
    assert any(not torch.equal(scaled[k], source[k]) for k in source)


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    from sdo.finetuning.checkpoints import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644
