"""The AnomalyDiffusion generator core: tokens, masked loss, blended sampling, attention re-weighting, files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="the generator needs diffusers (pip install defectscope[diffusion])")

from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.generate.attention import (
    AttentionWeights,
    ReweightingProcessor,
    adaptive_weights,
    install_reweighting,
    reweight_probabilities,
)
from defectscope.generate.defects import defect_examples, first_examples, split_examples
from defectscope.generate.denoising import (
    build_unet,
    composite,
    ddim_sample,
    masked_error,
    predicted_clean,
    training_target,
)
from defectscope.generate.generator import DefectGenerator, fit_generator
from defectscope.generate.settings import GeneratorSettings
from defectscope.generate.tokens import DefectTokens, MaskEncoder
from defectscope.nn import diffusion as dm

TINY = {
    "image_size": 32,
    "mask_size": 16,
    "block_channels": [16, 32],
    "mask_block_channels": [8, 16],
    "attention_levels": 1,
    "cross_attention_dim": 16,
    "attention_heads": 2,
    "epochs": 2,
    "mask_epochs": 1,
    "time_budget": None,
    "mask_time_budget": None,
    "sampling_steps": 4,
    "batch_size": 4,
}


# -- settings ---------------------------------------------------------------------------------------
def test_settings_round_trip_and_checks() -> None:
    settings = GeneratorSettings.from_dict(TINY)
    assert settings.block_channels == (16, 32)
    again = GeneratorSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings
    with pytest.raises(DefectscopeError, match="unknown generator setting 'colour'"):
        GeneratorSettings.from_dict({"colour": 1})
    with pytest.raises(DefectscopeError, match="image_size"):
        GeneratorSettings.from_dict({"image_size": "64"})
    with pytest.raises(DefectscopeError, match="divisible by 4"):
        GeneratorSettings(image_size=30)
    with pytest.raises(DefectscopeError, match="outside_weight"):
        GeneratorSettings(outside_weight=2.0)


def test_fit_refuses_defect_types_without_examples(tmp_path: Path) -> None:
    with pytest.raises(DefectscopeError, match=r"defect type\(s\) broken: no labelled defects"):
        fit_generator([tmp_path / "good.png"], {"broken": []}, GeneratorSettings.from_dict(TINY))
    with pytest.raises(DefectscopeError, match="at least one defect type"):
        fit_generator([tmp_path / "good.png"], {}, GeneratorSettings.from_dict(TINY))


# -- tokens -------------------------------------------------------------------------------------------
def test_tokens_select_type_good_context_and_mask_position() -> None:
    torch.manual_seed(0)
    tokens = DefectTokens(n_types=3, dim=8, anomaly_tokens=4, spatial_tokens=4, good_context=True)
    left, right = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    left[..., 8:16, 2:10] = 1
    right[..., 8:16, 22:30] = 1
    masks = torch.cat([left, left, right, left])
    context = tokens(torch.tensor([0, 2, 2, -1]), masks)
    assert context.shape == (4, 8, 8)
    assert torch.equal(context[0, :4], tokens.anomaly[0]) and torch.equal(context[1, :4], tokens.anomaly[2])
    assert tokens.good is not None and torch.equal(context[3], tokens.good)  # good images: the good context
    assert torch.equal(context[0, 4:], context[1, 4:])  # same mask, same spatial tokens (shared encoder)
    assert not torch.allclose(context[1, 4:], context[2, 4:])  # where the mask lies changes them
    plain = DefectTokens(n_types=2, dim=8, anomaly_tokens=4)
    assert plain(torch.tensor([1])).shape == (1, 4, 8)
    with pytest.raises(ValueError, match="good context"):
        plain(torch.tensor([-1]))


def test_mask_encoder_is_resolution_independent() -> None:
    encoder = MaskEncoder(4, 8)
    small = torch.zeros(1, 1, 16, 16)
    small[..., 4:8, 4:8] = 1
    large = small.repeat_interleave(8, -1).repeat_interleave(8, -2)
    assert torch.allclose(encoder(small), encoder(large), atol=1e-6)


# -- the masked loss --------------------------------------------------------------------------------
def test_masked_error_counts_the_mask_on_defects_and_everything_on_goods() -> None:
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1  # 4 of 16 pixels
    error = torch.where(mask > 0, 2.0, 10.0)  # error 2 inside, 10 outside
    defect, good = torch.tensor([0, 1]), torch.tensor([-1, -1])
    assert masked_error(error, mask, defect, 0.0).item() == pytest.approx(2.0)
    assert masked_error(error, mask, good, 0.0).item() == pytest.approx((4 * 2 + 12 * 10) / 16)
    # weight 0.25 outside: (4 * 2 + 12 * 0.25 * 10) / (4 + 12 * 0.25)
    assert masked_error(error, mask, defect, 0.25).item() == pytest.approx(38 / 7)


@pytest.mark.parametrize("prediction", ["sample", "epsilon", "v_prediction"])
def test_a_perfect_prediction_gives_back_the_clean_image(prediction: str) -> None:
    x0, eps = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4)
    abar_t = dm.gather_abar(dm.alphas_cumprod(1000), torch.tensor([0, 500, 999]))
    x_t = dm.add_noise(x0, eps, abar_t)
    target = training_target(x0, eps, abar_t, prediction)
    assert torch.allclose(predicted_clean(target, x_t, abar_t, prediction), x0, atol=1e-4)


# -- blended sampling (eq. 1) ---------------------------------------------------------------------------
def test_blended_sampling_with_an_oracle_lands_on_target_inside_and_good_outside() -> None:
    """A model predicting exactly the noise towards ``target`` makes DDIM end on it; blending keeps the good image."""
    abar = dm.alphas_cumprod(1000)
    target, good = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:5, 1:7] = 1
    mask[1, :, 6:, :] = 1

    def oracle(x: torch.Tensor, t: torch.Tensor, types: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        a = dm.gather_abar(abar, t)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = ddim_sample(oracle, abar, torch.tensor([0, 0]), [1, 2], (3, 8, 8), 10, good=good, mask=mask)
    assert torch.allclose(out, mask * target + (1 - mask) * good, atol=1e-5)
    assert torch.equal(out[mask.expand_as(out) == 0], good[mask.expand_as(out) == 0])


def test_composite_changes_only_mask_pixels_at_full_resolution() -> None:
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = np.zeros((37, 53), bool)
    mask[10:13, 20:31] = True
    mask[30, 5] = True  # a single pixel
    out = composite(good, mask, torch.ones(3, 8, 8))  # white content generated at 8 x 8
    changed = (out != good).any(2)
    assert not changed[~mask].any()
    assert (out[mask] == 255).all()


# -- adaptive attention re-weighting (eq. 7) ---------------------------------------------------------
def test_adaptive_weight_formula_on_a_hand_made_difference_map() -> None:
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, 0, 0, :2] = 1
    mask[0, 0, 1, :2] = 1  # 4 pixels
    d = torch.tensor([[1.0, 1.0, 9.0], [4.0, 4.0, 9.0], [9.0, 9.0, 9.0]])  # squared differences
    x0_hat = torch.stack([d.sqrt()[None], d.sqrt()[None]])  # 1 channel, good image 0
    w = adaptive_weights(x0_hat, torch.zeros_like(x0_hat), mask)
    # f = 1/d = (1, 1, .25, .25) inside, sum 2.5, |M| = 4: w = 1.6, 1.6, .4, .4 -> clipped to [1, 1.5]
    expected = torch.ones(3, 3)
    expected[0, :2] = 1.5
    assert torch.allclose(w[0], expected)
    assert torch.equal(w[1], torch.ones(3, 3))  # an empty mask leaves attention alone
    mild = torch.tensor([[1.0, 1.1], [1.2, 1.3]]).sqrt()[None, None]
    w = adaptive_weights(mild, torch.zeros_like(mild), torch.ones(1, 1, 2, 2))
    f = 1 / torch.tensor([1.0, 1.1, 1.2, 1.3])
    assert torch.allclose(w.flatten(), (4 * f / f.sum()).clamp(1, 1.5))


def test_reweighting_changes_only_anomaly_token_attention_inside_the_mask() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    hidden, context = torch.randn(2, 16, 8), torch.randn(2, 5, 6)  # a 4 x 4 layer, 5 context tokens
    probs = torch.rand(4, 16, 5).softmax(-1)
    weights = torch.ones(2, 16)
    weights[1, 3] = 1.5
    out = reweight_probabilities(probs, weights, heads=2, tokens=slice(1, 3))
    changed = out != probs
    assert changed[2:4, 3, 1:3].all() and changed.sum() == 4  # image 1 (both heads), position 3, tokens 1 and 2
    assert torch.allclose(out[2:4, 3, 1:3], 1.5 * probs[2:4, 3, 1:3])

    state = AttentionWeights(tokens=slice(1, 3))
    processor = ReweightingProcessor(state, AttnProcessor2_0())
    plain = processor(attn, hidden, context)
    state.weights = torch.ones(2, 8, 8)  # at twice the layer's resolution
    assert torch.allclose(processor(attn, hidden, context), plain, atol=1e-6)
    state.weights[0, :2, :2] = 1.5  # one layer position (0, 0) of image 0
    reweighted = processor(attn, hidden, context)
    differs = ~torch.isclose(reweighted, plain, atol=1e-6).all(-1)
    assert differs[0, 0] and differs.sum() == 1


def test_reweighting_on_a_unet_changes_it_only_while_weights_are_set() -> None:
    settings = GeneratorSettings.from_dict(TINY)
    unet = build_unet(settings, 3, 32, settings.block_channels).eval()
    x, t, context = torch.randn(1, 3, 32, 32), torch.tensor([500]), torch.randn(1, 8, 16)
    with torch.no_grad():
        for block in cast(Any, unet).down_blocks[1].attentions:  # a fresh UNet's cross-attention outputs are zero
            torch.nn.init.normal_(block.proj_out.weight)
        before = unet(x, t, context).sample
        state = install_reweighting(unet, slice(0, 4))
        assert torch.allclose(unet(x, t, context).sample, before, atol=1e-5)
        state.weights = torch.full((1, 32, 32), 1.5)
        assert not torch.allclose(unet(x, t, context).sample, before, atol=1e-4)
        state.weights = None
        assert torch.allclose(unet(x, t, context).sample, before, atol=1e-5)


# -- fitting, generating, files (real data) -------------------------------------------------------------
@pytest.fixture(scope="module")
def bottle_defects(bottle_root: Path) -> dict:
    return first_examples(defect_examples(bottle_root), k=2)


@pytest.fixture(scope="module")
def fitted(bottle_root: Path, bottle_defects: dict) -> DefectGenerator:
    good = sorted((bottle_root / "train" / "good").glob("*.png"))[:8]
    return fit_generator(good, bottle_defects, GeneratorSettings.from_dict(TINY))


def _good_and_mask(bottle_root: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    good = sorted((bottle_root / "train" / "good").glob("*.png"))[index]
    held = split_examples(defect_examples(bottle_root)["broken_large"])[1][index]
    return np.array(Image.open(good).convert("RGB")), np.array(Image.open(held.mask)) > 0


def test_fit_records_what_it_trained(fitted: DefectGenerator) -> None:
    assert fitted.defect_types == ["broken_large", "broken_small", "contamination"]
    info = fitted.fit_info
    assert info["good_images"] == 8 and info["defects"] == {"broken_large": 2, "broken_small": 2, "contamination": 2}
    # 8 goods + 6 defects repeated round(8 / 6) = 1 time: 14 items, 3 full batches of 4 + one of 2, 2 epochs
    assert info["image"]["steps"] == 8 and info["image"]["epochs_done"] == 2
    assert info["mask"]["steps"] == 2 and all(np.isfinite(info["image"]["epoch_losses"]))


def test_generate_changes_only_mask_pixels_and_is_seeded_per_image(fitted: DefectGenerator, bottle_root: Path) -> None:
    good_a, mask_a = _good_and_mask(bottle_root, 0)
    good_b, mask_b = _good_and_mask(bottle_root, 1)
    good_b = good_b[100:700, 50:850]  # another size, not square
    mask_b = mask_b[100:700, 50:850]
    out = fitted.generate([good_a, good_b], [mask_a, mask_b], ["broken_large", "contamination"], [3, 4])
    for result, good, mask in zip(out, [good_a, good_b], [mask_a, mask_b]):
        assert result.shape == good.shape and result.dtype == np.uint8
        changed = (result != good).any(2)
        assert not changed[~mask].any()
        assert changed[mask].mean() > 0.5
    alone = fitted.generate([good_b], [mask_b], ["contamination"], [4])
    diff = np.abs(alone[0].astype(int) - out[1].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4  # independent of its batch, up to float rounding
    other_seed = fitted.generate([good_b], [mask_b], ["contamination"], [5])
    assert not np.array_equal(other_seed[0], out[1])
    empty = fitted.generate([good_a], [np.zeros_like(mask_a)], ["broken_large"], [0])
    assert np.array_equal(empty[0], good_a)
    plain = fitted.generate([good_a], [mask_a], ["broken_large"], [3], adaptive_attention=False)
    assert not np.array_equal(plain[0], out[0])  # the re-weighting acts (the default is on)
    with pytest.raises(DefectscopeError, match="known: broken_large, broken_small, contamination"):
        fitted.generate([good_a], [mask_a], ["scratch"], [0])


def test_generate_masks_gives_probability_maps(fitted: DefectGenerator) -> None:
    masks = fitted.generate_masks("broken_small", 3, seed=7, size=40)
    assert len(masks) == 3
    for m in masks:
        assert m.shape == (40, 40) and m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1
    assert np.array_equal(fitted.generate_masks("broken_small", 3, seed=7, size=40)[2], masks[2])
    with pytest.raises(DefectscopeError, match="unknown defect type 'hole'"):
        fitted.generate_masks("hole", 1, 0, 8)


def test_save_and_load_give_the_same_generator(fitted: DefectGenerator, bottle_root: Path, tmp_path: Path) -> None:
    fitted.save(tmp_path / "gen")
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["config.json", "generator.safetensors"]
    loaded = DefectGenerator.load(tmp_path / "gen")
    assert loaded.defect_types == fitted.defect_types and loaded.settings == fitted.settings
    assert loaded.fit_info == fitted.fit_info
    good, mask = _good_and_mask(bottle_root, 0)
    args = ([good], [mask], ["broken_small"], [11])
    assert np.array_equal(loaded.generate(*args), fitted.generate(*args))
    assert np.array_equal(
        loaded.generate_masks("contamination", 2, 1, 16)[1], fitted.generate_masks("contamination", 2, 1, 16)[1]
    )
    on_cpu = DefectGenerator.load(tmp_path / "gen", device="cpu")
    assert on_cpu.device == torch.device("cpu") and on_cpu.to("cpu") is on_cpu
    assert np.array_equal(on_cpu.generate(*args), loaded.generate(*args))


def test_a_device_torch_cannot_use_is_one_clear_error(
    fitted: DefectGenerator, bottle_defects: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    no_gpu = "^device cuda: no CUDA GPU is available to torch here; use --device cpu$"
    with pytest.raises(DefectscopeError, match=no_gpu):
        fit_generator([], bottle_defects, GeneratorSettings.from_dict(TINY), device="cuda")
    fitted.save(tmp_path / "gen")
    with pytest.raises(DefectscopeError, match=no_gpu):
        DefectGenerator.load(tmp_path / "gen", device="cuda")
    with pytest.raises(DefectscopeError, match="no CUDA GPU"):
        fitted.to("cuda:0")
    with pytest.raises(DefectscopeError, match="not a torch device"):
        fitted.to("nope")
    assert fitted.device == torch.device("cpu")


def test_load_refuses_missing_damaged_and_foreign_folders(fitted: DefectGenerator, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such generator folder"):
        DefectGenerator.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="config.json: missing"):
        DefectGenerator.load(tmp_path / "empty")
    fitted.save(tmp_path / "gen")
    tensors = tmp_path / "gen" / "generator.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum does not match"):
        DefectGenerator.load(tmp_path / "gen")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"format": "defectscope-model"}))
    with pytest.raises(ModelFileError, match="not a defectscope generator config"):
        DefectGenerator.load(tmp_path / "foreign")
    (tmp_path / "foreign" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        DefectGenerator.load(tmp_path / "foreign")


def test_fit_resumes_from_its_checkpoints(bottle_root: Path, bottle_defects: dict, tmp_path: Path) -> None:
    good = sorted((bottle_root / "train" / "good").glob("*.png"))[:4]
    settings = GeneratorSettings.from_dict(TINY | {"epochs": 1})
    first = fit_generator(good, bottle_defects, settings, checkpoint_dir=tmp_path)
    with pytest.raises(DefectscopeError, match="holds a checkpoint"):
        fit_generator(good, bottle_defects, settings, checkpoint_dir=tmp_path)
    again = fit_generator(good, bottle_defects, settings, checkpoint_dir=tmp_path, resume=True)
    assert again.fit_info["image"]["resumed_from_epoch"] == 1 and again.fit_info["mask"]["resumed_from_epoch"] == 1
    good_image, mask = _good_and_mask(bottle_root, 2)
    args = ([good_image], [mask], ["broken_large"], [0])
    assert np.array_equal(again.generate(*args), first.generate(*args))
    explicit = fit_generator(good, bottle_defects, settings, device="cpu")
    assert np.array_equal(explicit.generate(*args), first.generate(*args))  # "cpu" is the default, exactly


# -- the pretrained latent diffusion path -------------------------------------------------------------
def _tiny_pipeline(folder: Path) -> Path:
    """A random diffusers latent diffusion folder: UNet, VAE (factor 2), CLIP text encoder + tokenizer, scheduler."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers", reason="the pretrained path needs transformers")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    ).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(folder / "vae")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler"
    )
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {t: i + 2 for i, t in enumerate(letters + [c + "</w>" for c in letters])}
    (folder / "bpe").mkdir(parents=True)
    (folder / "bpe" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "bpe" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "bpe" / "vocab.json"), str(folder / "bpe" / "merges.txt"), model_max_length=16
    )
    tokenizer.save_pretrained(folder / "tokenizer")
    text = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    transformers.CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    return folder


def test_pretrained_model_stays_frozen_and_only_tokens_are_saved(
    bottle_root: Path, bottle_defects: dict, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    folder = _tiny_pipeline(tmp_path / "ldm")
    before = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    settings = GeneratorSettings.from_dict(TINY | {"image_size": 16, "category": "bottle", "epochs": 3})
    generator = fit_generator([], bottle_defects, settings, pretrained=folder)
    assert generator.settings.beta_schedule == "scaled_linear" and generator.settings.prediction == "epsilon"
    assert generator.fit_info["image"]["steps"] == 6  # 6 defects (no good images), batches of 4 (+2), 3 epochs
    unet = generator.image_model.unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in before.items())  # the pretrained UNet did not train
    assert generator.image_model.prefix is not None and generator.image_model.prefix.shape == (16, 32)
    assert generator.image_model.anomaly_slice == slice(16, 20)  # after the encoded prompt

    good, mask = _good_and_mask(bottle_root, 0)
    out = generator.generate([good], [mask], ["broken_small"], [2])[0]
    changed = (out != good).any(2)
    assert not changed[~mask].any() and changed[mask].mean() > 0.5

    generator.save(tmp_path / "gen")
    stored = load_file(str(tmp_path / "gen" / "generator.safetensors"))
    assert not any(k.startswith("image.unet") for k in stored) and any(k.startswith("image.tokens") for k in stored)
    config = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert config["pretrained"] == str(folder) and config["image_unet"] is None
    loaded = DefectGenerator.load(tmp_path / "gen")
    assert np.array_equal(loaded.generate([good], [mask], ["broken_small"], [2])[0], out)


def test_pretrained_folder_problems_are_clear(bottle_defects: dict, tmp_path: Path) -> None:
    settings = GeneratorSettings.from_dict(TINY | {"image_size": 16})
    with pytest.raises(DefectscopeError, match="no such pretrained model folder"):
        fit_generator([], bottle_defects, settings, pretrained=tmp_path / "nothing")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(DefectscopeError, match="no vae/, text_encoder/, tokenizer/ folder"):
        fit_generator([], bottle_defects, settings, pretrained=tmp_path / "half")
