"""DDAD and GLAD: the diffusion formulas on known tensors, the adaptive choices, and tiny end-to-end runs."""

import json
import sys
from pathlib import Path

import pytest
import torch

from defectscope import load
from defectscope.data import ImageDataset, iterate_batches, mvtec_samples
from defectscope.errors import DefectscopeError
from defectscope.methods.ddad import DDAD
from defectscope.methods.feature_space import feature_stats, grid_features, standardise
from defectscope.methods.glad import GLAD
from defectscope.nn import diffusion as dm
from defectscope.postprocess import gaussian_blur

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install defectscope[diffusion])")

TINY = {"image_size": 32, "unet": "tiny", "epochs": 2, "steps": 3, "batch_size": 4, "time_budget": None}
PIXEL = TINY | {"space": "pixel", "prediction": "epsilon", "layers": ("s4", "s8"), "blur_sigma": 1.0}


def _oracle(x0: torch.Tensor, abar: torch.Tensor) -> dm.NoiseModel:
    """A noise model that knows the clean image: its prediction always leads exactly back to ``x0``."""

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = dm.gather_abar(abar, t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return predict


@pytest.fixture(scope="module")
def abar() -> torch.Tensor:
    return dm.alphas_cumprod()


@pytest.fixture(scope="module")
def test_batch(example_root: Path) -> dict:
    samples = mvtec_samples(example_root, "test")
    return next(iterate_batches(ImageDataset(samples[:2] + samples[-2:], 32), 4))


@pytest.fixture(scope="module")
def ddad(example_root: Path) -> DDAD:
    return DDAD(**PIXEL, da_epochs=1, da_images=4).fit(mvtec_samples(example_root, "train")[:9])


@pytest.fixture(scope="module")
def glad(example_root: Path) -> GLAD:
    return GLAD(**PIXEL, da_epochs=1, da_images=4).fit(mvtec_samples(example_root, "train")[:9])


# -- formulas ------------------------------------------------------------------------------------
def test_schedule_is_ddads_linear_ddpm_schedule(abar: torch.Tensor) -> None:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(abar.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7)
    assert dm.ddim_timesteps(torch.tensor([250]), 10)[:, 0].tolist() == [
        249,
        224,
        199,
        174,
        149,
        124,
        99,
        74,
        49,
        24,
        -1,
    ]
    assert dm.gather_abar(abar, torch.tensor([-1, 0])).flatten().tolist() == [1.0, pytest.approx(1 - 1e-4)]


def test_conditioned_noise_formula_with_a_constant_noise_model() -> None:
    eps = torch.full((1, 3, 2, 2), 0.5)  # what a stub model returning a constant predicts
    x_t, y = torch.full((1, 3, 2, 2), 0.2), torch.full((1, 3, 2, 2), -0.4)
    a = torch.full((1, 1, 1, 1), 0.64)  # sqrt(abar) = 0.8, sqrt(1 - abar) = 0.6
    # y_t = 0.8 * -0.4 + 0.6 * 0.5 = -0.02; eps_hat = 0.5 - w * 0.6 * (-0.02 - 0.2) = 0.5 + 0.132 w
    for w, expected in ((0.0, 0.5), (1.0, 0.632), (4.0, 1.028)):
        torch.testing.assert_close(dm.conditioned_noise(eps, x_t, y, a, w), torch.full_like(eps, expected))
    # where x_t is already the target noised with the predicted noise, there is nothing to correct
    on_target = dm.add_noise(y, eps, a)
    torch.testing.assert_close(dm.conditioned_noise(eps, on_target, y, a, 4.0), eps)


def test_conditioning_pulls_the_reconstruction_towards_the_target(abar: torch.Tensor) -> None:
    """A model whose prior is a grey image reconstructs grey; w pulls the result towards the input."""
    grey = torch.zeros(1, 3, 8, 8)
    y = torch.linspace(-1, 1, 3 * 64).reshape(1, 3, 8, 8)
    errors = [
        (dm.ddim_denoise(_oracle(grey, abar), y, 250, 10, abar, w=w) - y).abs().mean().item() for w in (0.0, 1.0, 4.0)
    ]
    assert errors[0] == pytest.approx(y.abs().mean().item(), rel=1e-4)  # w = 0: the prior's grey image
    assert errors[0] > errors[1] > errors[2]


def test_ddim_step_matches_diffusers_and_recovers_the_clean_image(abar: torch.Tensor) -> None:
    diffusers = pytest.importorskip("diffusers")
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    a_t, a_prev = abar[500].view(1, 1, 1, 1), abar[400].view(1, 1, 1, 1)
    x_t = dm.add_noise(x0, eps, a_t)
    # with the true noise a deterministic step lands on the clean image noised to the earlier level
    torch.testing.assert_close(dm.ddim_step(x_t, eps, a_t, a_prev), dm.add_noise(x0, eps, a_prev))
    torch.testing.assert_close(dm.ddim_step(x_t, eps, a_t, torch.ones_like(a_t)), x0, atol=1e-5, rtol=1e-5)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    scheduler.set_timesteps(10)
    other = torch.randn(2, 3, 4, 4, generator=generator)  # any model output
    expected = scheduler.step(other, 500, x_t, eta=0.0).prev_sample
    torch.testing.assert_close(dm.ddim_step(x_t, other, a_t, a_prev), expected, atol=1e-5, rtol=1e-5)
    # eta = 1: the DDPM posterior variance (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    shift = dm.ddim_step(x_t, eps, a_t, a_prev, eta=1.0, noise=torch.ones_like(x0)) - dm.ddim_step(
        x_t, eps, a_t, a_prev, eta=1.0, noise=torch.zeros_like(x0)
    )
    torch.testing.assert_close(shift, sigma.expand_as(shift))


def test_ddim_denoise_recovers_the_image_from_any_start_and_is_batch_independent(abar: torch.Tensor) -> None:
    y = torch.rand(3, 3, 8, 8) * 2 - 1
    out = dm.ddim_denoise(_oracle(y, abar), y, torch.tensor([400, 250, 3]), 10, abar, w=2.0)
    torch.testing.assert_close(out, y, atol=1e-4, rtol=1e-4)
    model = _oracle(torch.zeros(1, 3, 8, 8), abar)
    whole = dm.ddim_denoise(model, y, 250, 5, abar, w=1.0, eta=1.0, seed=3)
    alone = dm.ddim_denoise(model, y[1:2], 250, 5, abar, w=1.0, eta=1.0, seed=3)
    torch.testing.assert_close(whole[1:2], alone)


def test_anomaly_noise_target_leads_back_to_the_normal_image(abar: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(1)
    normal, eps = torch.randn(1, 3, 6, 6, generator=generator), torch.randn(1, 3, 6, 6, generator=generator)
    anomalous = normal.clone()
    anomalous[..., 2:4, 2:4] += 1.5
    a = abar[300].view(1, 1, 1, 1)
    target = dm.anomaly_noise_target(eps, anomalous, normal, a)
    x_t = dm.add_noise(anomalous, eps, a)
    torch.testing.assert_close(dm.predicted_x0(x_t, target, a), normal, atol=1e-5, rtol=1e-5)
    outside = torch.ones(6, 6, dtype=torch.bool)
    outside[2:4, 2:4] = False
    assert torch.equal(target[..., outside], eps[..., outside])  # plain Gaussian noise where the image is normal


def test_spatial_fusion_keeps_the_input_where_the_mask_is_zero() -> None:
    inputs, recon = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[:, :, 2:] = 1.0
    mask[:, 0, 0] = 0.25
    fused = dm.spatial_fusion(inputs, recon, mask)
    assert torch.equal(fused[:, :, :, :2][..., 1:, :], inputs[:, :, 1:, :2])
    assert torch.equal(fused[:, :, :, 2:], recon[:, :, :, 2:])
    assert fused[0, :, 0, 0].tolist() == [0.25] * 3
    assert dm.spatial_fusion(inputs, recon, torch.ones(1, 2, 2)).eq(1).all()  # a coarse mask is resized


def test_adaptive_steps_grow_with_the_distance_to_the_prior_within_the_range() -> None:
    scores = torch.tensor([0.0, 1.0, 1.5, 2.0, 3.0, 50.0])
    steps = dm.adaptive_steps(scores, low=1.0, high=3.0, t_min=100, t_max=400)
    assert steps.tolist() == [100, 100, 175, 250, 400, 400]
    mask = dm.fusion_mask(torch.tensor([[[0.1, 0.2, 0.35, 0.5, 0.9]]]), low=0.2, high=0.5)
    torch.testing.assert_close(mask, torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0]]]))


def test_feature_distance_and_map_combination() -> None:
    a = torch.zeros(1, 2, 4, 4)
    a[:, 0] = 1.0
    b = torch.zeros(1, 2, 4, 4)
    b[:, 1] = 1.0
    df = dm.feature_distance([a, a], [a, b], (8, 8), pool=1)  # layer 1 identical, layer 2 orthogonal
    torch.testing.assert_close(df, torch.ones(1, 8, 8))
    dp = dm.pixel_distance(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5))
    torch.testing.assert_close(dm.combine_distances(dp, df, v=2.0, ratio=3.0, sigma=0), torch.full((1, 8, 8), 4.0))


def test_missing_diffusers_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without it looks like
    with pytest.raises(DefectscopeError, match=r"pip install defectscope\[diffusion\]"):
        dm.build_unet("tiny", 32)


# -- the methods -----------------------------------------------------------------------------------
def test_glad_chooses_larger_steps_for_images_far_from_the_prior(glad: GLAD, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a prior that is a mid-grey image, the further an image is from grey, the later its start step."""
    monkeypatch.setattr(glad, "noise_model", lambda: _oracle(torch.zeros(1, 3, 32, 32), glad.abar))
    monkeypatch.setattr(glad, "probe_distance", "pixel")
    monkeypatch.setattr(glad, "_stats", torch.tensor([0.1, 0.5, 0.0, 1.0]))
    images = torch.stack([torch.full((3, 32, 32), 0.5 + d) for d in (0.0, 0.05, 0.1, 0.15, 0.3)])
    steps = glad.adaptive_steps(images).tolist()  # discrepancies 2d in model space: 0, 0.1, 0.2, 0.3, 0.6
    assert steps == [100, 100, 175, 250, 400]
    assert glad.step_range == (100, 400)
    # the default feature-space probe: a flat grey image is the prior itself, a textured one is far from it
    monkeypatch.setattr(glad, "probe_distance", "feature")
    flat, textured = torch.full((3, 32, 32), 0.5), torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    d, score = glad._probe(torch.stack([flat, textured]) * 2 - 1, torch.stack([flat, textured]))
    assert d[0].abs().max() < 1e-5 < score[1]


def test_glad_fusion_keeps_normal_regions_of_the_input(glad: GLAD, monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(2, 3, 32, 32)
    stats = glad.stats.clone()
    monkeypatch.setattr(glad, "_stats", torch.tensor([stats[0], stats[1], 1e3, 2e3]))  # mask 0 everywhere
    torch.testing.assert_close(glad.reconstruct(images), images, atol=1e-5, rtol=0)
    monkeypatch.setattr(glad, "_stats", torch.tensor([stats[0], stats[1], -2.0, -1.0]))  # mask 1 everywhere
    t_start = glad.adaptive_steps(images)
    plain = dm.ddim_denoise(glad.noise_model(), images * 2 - 1, t_start, glad.steps, glad.abar, seed=glad.seed)
    torch.testing.assert_close(glad.reconstruct(images), ((plain + 1) / 2).clamp(0, 1))


@pytest.mark.parametrize("name", ["ddad", "glad"])
def test_reconstructions_and_batch_independent_scores(
    name: str, request: pytest.FixtureRequest, test_batch: dict
) -> None:
    det = request.getfixturevalue(name)
    pred = det.predict(test_batch)
    assert pred.reconstructions is not None and pred.reconstructions.shape == (4, 3, 32, 32)
    assert pred.reconstructions.min() >= 0 and pred.reconstructions.max() <= 1
    torch.testing.assert_close(det.reconstruct(test_batch["image"]), pred.reconstructions)
    alone = det.predict(test_batch["image"][2:3])  # a score does not depend on the rest of the batch
    torch.testing.assert_close(alone.scores, pred.scores[2:3], atol=1e-5, rtol=1e-5)
    assert det.fit_info["train_steps"] == 4


@pytest.mark.parametrize("name", ["ddad", "glad"])
def test_the_feature_extractor_is_domain_adapted_and_kept(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    det = request.getfixturevalue(name)
    assert det.fit_info["domain_adaptation"]["images"] == 4
    changed = [
        not torch.equal(a, b)
        for a, b in zip(det.feature_extractor.state_dict().values(), det.extractor.state_dict().values())
    ]
    assert any(changed)
    loaded = load(det.save(tmp_path / name))
    for key, value in det.feature_extractor.state_dict().items():
        assert torch.equal(loaded.feature_extractor.state_dict()[key], value), key


def test_glad_adapts_on_its_own_reconstructions(glad: GLAD, test_batch: dict) -> None:
    images = test_batch["image"]
    torch.testing.assert_close(glad._adaptation_reconstruction(images), glad.reconstruct(images))


def test_baseline_is_plain_ddim_with_the_pixel_distance(
    ddad: DDAD, test_batch: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ddad, "w", 0.0)
    monkeypatch.setattr(ddad, "distance", "pixel")
    images = test_batch["image"]
    plain = dm.ddim_denoise(ddad.noise_model(), images * 2 - 1, ddad.t_start, ddad.steps, ddad.abar, seed=ddad.seed)
    recon = ((plain + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(ddad.reconstruct(images), recon)
    expected = gaussian_blur((images - recon).abs().mean(1), ddad.blur_sigma)
    torch.testing.assert_close(ddad.predict(images).maps, expected)


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(DefectscopeError, match="unknown unet"):
        DDAD(unet="huge")
    with pytest.raises(DefectscopeError, match="step_range"):
        GLAD(step_range=(400, 100))
    with pytest.raises(DefectscopeError, match="distance"):
        DDAD(distance="l2")
    with pytest.raises(DefectscopeError, match="probe_distance"):
        GLAD(probe_distance="l2")


def test_glad_accepts_a_pretrained_unet_and_autoencoder(example_root: Path, tmp_path: Path) -> None:
    """A user's diffusers folders: GLAD fine-tunes the UNet in the autoencoder's latent space and round-trips."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(tmp_path / "vae")
    unet = dm.build_unet("tiny", 16, channels=4)
    unet.save_pretrained(tmp_path / "unet")
    det = GLAD(**PIXEL | {"epochs": 1}, pretrained_unet=str(tmp_path / "unet"), pretrained_vae=str(tmp_path / "vae"))
    det.fit(mvtec_samples(example_root, "train")[:5])
    images = torch.rand(2, 3, 32, 32)
    pred = det.predict(images)
    assert pred.maps.shape == (2, 32, 32) and pred.reconstructions.shape == (2, 3, 32, 32)
    loaded = load(det.save(tmp_path / "run"))
    torch.testing.assert_close(loaded.predict(images).scores, pred.scores)
    with pytest.raises(DefectscopeError, match="channels"):
        GLAD(**PIXEL, pretrained_unet=str(tmp_path / "unet")).fit(mvtec_samples(example_root, "train")[:3])


# -- feature space (the CPU default) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def feature_ddad(example_root: Path) -> DDAD:
    return DDAD(**TINY).fit(mvtec_samples(example_root, "train")[:9])


def test_sample_prediction_converts_to_the_noise_that_leads_to_it(abar: torch.Tensor) -> None:
    x0 = torch.rand(2, 5, 4, 4) * 2 - 1

    class Clean(torch.nn.Module):  # a "UNet" whose clean-sample prediction is always x0
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> object:
            return type("Out", (), {"sample": x0})()

    model = dm.sample_noise_model(Clean(), abar)
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 400])
    torch.testing.assert_close(model(dm.add_noise(x0, noise, dm.gather_abar(abar, t)), t), noise, atol=1e-4, rtol=1e-4)
    out = dm.ddim_denoise(model, x0 + 0.3, 300, 5, abar)  # every step predicts x0: DDIM ends there
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    a = dm.gather_abar(abar, t)
    zeros = torch.zeros(2, 1, 1, 1)
    weight = dm.prediction_loss(torch.ones(2, 1, 1, 1), zeros, zeros, a, "sample")
    torch.testing.assert_close(weight, (a / (1 - a)).clamp(max=5))
    assert weight[0].item() == 5.0  # high signal-to-noise steps are capped


def test_feature_statistics_standardise_the_training_features(feature_ddad: DDAD, example_root: Path) -> None:
    images = next(iterate_batches(ImageDataset(mvtec_samples(example_root, "train")[:9], 32), 9))["image"]
    assert feature_ddad.to_model_space(images).shape == (9, 40 + 112, 4, 4)  # s8 + s16 on the s8 grid of 32 px
    extractor = feature_ddad.extractor
    stats = feature_stats(extractor, [images[:4], images[4:]])  # accumulated over batches
    y = standardise(grid_features(extractor, images), stats)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(152), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(152), atol=1e-3, rtol=0)


def test_feature_space_maps_scores_and_round_trip(feature_ddad: DDAD, test_batch: dict, tmp_path: Path) -> None:
    pred = feature_ddad.predict(test_batch)
    assert pred.maps.shape == (4, 32, 32) and pred.reconstructions is None
    assert torch.isfinite(pred.scores).all() and (pred.maps >= 0).all()
    y = feature_ddad.to_model_space(test_batch["image"])
    recon = feature_ddad._denoise(y, test_batch["image"])
    distance = 1 - torch.nn.functional.cosine_similarity(y, recon, dim=1)
    assert not torch.allclose(recon, y)  # the UNet changed the features
    expected = gaussian_blur(
        torch.nn.functional.interpolate(distance[:, None], size=(32, 32), mode="bilinear")[:, 0],
        feature_ddad.blur_sigma,
    )
    torch.testing.assert_close(pred.maps, expected, atol=1e-5, rtol=1e-4)
    alone = feature_ddad.predict(test_batch["image"][1:2])
    torch.testing.assert_close(alone.scores, pred.scores[1:2], atol=1e-5, rtol=1e-5)
    loaded = load(feature_ddad.save(tmp_path / "ddad"))
    torch.testing.assert_close(loaded.predict(test_batch).scores, pred.scores)
    assert "domain_adaptation" not in feature_ddad.fit_info  # nothing to adapt: no image reconstructions
    with pytest.raises(DefectscopeError, match="reconstructs backbone features, not images"):
        feature_ddad.reconstruct(test_batch["image"])


def test_feature_space_glad_trains_on_synthetic_anomalies_and_scores(example_root: Path, test_batch: dict) -> None:
    glad = GLAD(**TINY).fit(mvtec_samples(example_root, "train")[:9])
    steps = glad.adaptive_steps(test_batch["image"])
    assert ((steps >= glad.step_range[0]) & (steps <= glad.step_range[1])).all()
    pred = glad.predict(test_batch)
    assert pred.maps.shape == (4, 32, 32) and torch.isfinite(pred.scores).all()
    with pytest.raises(DefectscopeError, match="space='pixel'"):
        GLAD(pretrained_vae="somewhere")


@pytest.mark.parametrize("name", ["ddad", "glad"])
def test_models_saved_before_the_feature_space_load_as_pixel_models(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, test_batch: dict
) -> None:
    det = request.getfixturevalue(name)
    folder = det.save(tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    for key in ("space", "prediction") + (("da_epochs", "da_images", "da_lambda", "da_lr") if name == "glad" else ()):
        del config["params"][key]
    (folder / "config.json").write_text(json.dumps(config))
    old = load(folder)
    assert (old.space, old.prediction) == ("pixel", "epsilon")
    if name == "ddad":
        torch.testing.assert_close(old.predict(test_batch).scores, det.predict(test_batch).scores)
    else:
        assert old.da_epochs == 0


def test_a_feature_grid_the_unet_cannot_halve_is_a_clear_error(example_root: Path) -> None:
    with pytest.raises(DefectscopeError, match="image_size 48: with space='features'.*use a multiple of 32"):
        DDAD(image_size=48, epochs=1, time_budget=None).fit(mvtec_samples(example_root, "train")[:4])
