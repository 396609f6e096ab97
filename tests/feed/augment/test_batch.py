"""Batch augmentation: shapes, devices, normalisation, parameter distributions against
torchvision's own samplers, and pixels against the per-sample torchvision path."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torch.utils.data import default_collate
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from feedtune.config import AugmentConfig
from feedtune.feed.augment.batch import (
    BATCH_POLICIES,
    BatchParams,
    BatchPolicy,
    ToWorkingUint8,
    build_batch_policy,
)
from feedtune.feed.augment.per_sample import build_transform
from feedtune.feed.augment.policies import TorchvisionOps
from feedtune.feed.geometry import resize_size, working_size

S = 32
N_DRAWS = 4000
KS_P = 1e-3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def smooth_image(h: int = 96, w: int = 128) -> np.ndarray:
    """Asymmetric RGB image with gradients and a soft disc: resampling-friendly."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (h + w) * 255], axis=-1)
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 4, (255, 40, 90), -1)
    return cv2.GaussianBlur(img, (0, 0), 2).astype(np.uint8)


def quadrants(h: int = 96, w: int = 128) -> np.ndarray:
    """Four flat colours: top-left red, top-right green, bottom-left blue, bottom-right grey."""
    img = np.empty((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (200, 0, 0)
    img[: h // 2, w // 2 :] = (0, 200, 0)
    img[h // 2 :, : w // 2] = (0, 0, 200)
    img[h // 2 :, w // 2 :] = (90, 90, 90)
    return img


def cfg(policy: str = "basic", magnitude: float = 1.0, **kw: object) -> AugmentConfig:
    return AugmentConfig(policy=policy, magnitude=magnitude, image_size=S, **kw)


def batch_of(image: np.ndarray, n: int, working: int = working_size(S)):
    """``n`` copies of ``image`` as the loader would collate them."""
    return default_collate([ToWorkingUint8(working)(image) for _ in range(n)])


def resized_size(h: int, w: int) -> tuple[int, int]:
    """What ``v2.Resize(resize_size(S))`` makes of an ``h x w`` image (the crop's canvas)."""
    return tuple(TF.resize(torch.empty(3, h, w), [resize_size(S)], antialias=True).shape[-2:])


def reference(image: np.ndarray, p: BatchParams, i: int, policy: str) -> torch.Tensor:
    """Sample ``i`` through torchvision's per-sample ops with the batch's own parameters."""
    c = cfg(policy)
    x = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [resize_size(S)], antialias=True)
    hr, wr = x.shape[-2:]
    left, top, right, bottom = p.box[i].tolist()
    top_, left_ = round(top * hr), round(left * wr)
    h, w = round(bottom * hr) - top_, round(right * wr) - left_
    x = TF.resized_crop(x, top_, left_, h, w, [S, S], antialias=True)
    if p.flip[i]:
        x = TF.horizontal_flip(x)
    if policy == "geometric":
        x = _affine(x, p, i)
    if policy == "color":
        x = _jitter(x, p, i)
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, c.mean, c.std)


def _affine(x: torch.Tensor, p: BatchParams, i: int) -> torch.Tensor:
    return TF.affine(
        x,
        angle=float(p.angle[i]),
        translate=p.translate[i].tolist(),
        scale=float(p.zoom[i]),
        shear=[float(p.shear[i]), 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=0,
    )


def _jitter(x: torch.Tensor, p: BatchParams, i: int) -> torch.Tensor:
    ops = [
        lambda x: TF.adjust_brightness(x, float(p.brightness[i])),
        lambda x: TF.adjust_contrast(x, float(p.contrast[i])),
        lambda x: TF.adjust_saturation(x, float(p.saturation[i])),
        lambda x: TF.adjust_hue(x, float(p.hue[i])),
    ]
    for j in p.order[i].tolist():
        x = ops[j](x)
    return x


def full_crop(p: BatchParams) -> BatchParams:
    """The same parameters with the whole image as crop and no flip."""
    p.box[:] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=p.box.dtype)
    p.flip[:] = False
    return p


def unnormalize(aug: BatchPolicy, x: torch.Tensor) -> torch.Tensor:
    return x * aug.std.to(x.device) + aug.mean.to(x.device)


# --- shapes, devices, determinism ------------------------------------------------------------


def _check_output(policy: str, train: bool, device: str) -> torch.Tensor:
    aug = build_batch_policy(cfg(policy), train=train)
    images, aspects = batch_of(smooth_image(), 6)
    g = torch.Generator().manual_seed(0)
    out = aug(images.to(device), aspects.to(device), generator=g)
    assert out.shape == (6, 3, S, S)
    assert out.dtype == torch.float32 and out.device.type == device
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("policy", BATCH_POLICIES)
def test_output_shape_cpu(policy: str, train: bool) -> None:
    _check_output(policy, train, "cpu")


@CUDA
@pytest.mark.parametrize("policy", BATCH_POLICIES)
def test_output_cuda_matches_cpu(policy: str) -> None:
    on_gpu = _check_output(policy, True, "cuda")
    on_cpu = _check_output(policy, True, "cpu")  # same seed: same parameters
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-3)


def test_generator_makes_batches_reproducible() -> None:
    aug = build_batch_policy(cfg("color"), train=True)
    images, aspects = batch_of(smooth_image(), 4)
    a = aug(images, aspects, generator=torch.Generator().manual_seed(3))
    b = aug(images, aspects, generator=torch.Generator().manual_seed(3))
    c = aug(images, aspects, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("policy", ["basic", "color", "geometric"])
def test_samples_of_a_batch_get_their_own_parameters(policy: str) -> None:
    aug = build_batch_policy(cfg(policy), train=True)
    images, aspects = batch_of(smooth_image(), 8)
    g = torch.Generator().manual_seed(0)
    p = aug.sample_params(8, g, aspects=aspects)
    assert p.scale.unique().numel() > 1 and p.box.unique(dim=0).shape[0] == 8
    assert 0 < int(p.flip.sum()) < 8
    if policy == "color":
        assert p.brightness.unique().numel() == 8 and p.hue.unique().numel() == 8
        assert p.order.unique(dim=0).shape[0] > 1
    if policy == "geometric":
        assert p.angle.unique().numel() == 8 and p.shear.unique().numel() == 8
    out = aug.apply_params(images, p)
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i))


@pytest.mark.parametrize("policy, train", [("none", True), ("basic", False)])
def test_deterministic_pipelines_repeat_the_centre_crop(policy: str, train: bool) -> None:
    out = _check_output(policy, train, "cpu")
    assert torch.equal(out, out[:1].expand_as(out))


def test_constant_grey_normalises_like_the_sample_path() -> None:
    c = cfg("none", mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    aug = build_batch_policy(c, train=False)
    grey = np.full((40, 70, 3), 100, np.uint8)
    images, aspects = batch_of(grey, 2)
    out = aug(images, aspects)
    want = (100 / 255 - torch.tensor(c.mean)) / torch.tensor(c.std)
    assert torch.allclose(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5)
    sample = build_transform(c, train=False)(grey)
    assert torch.allclose(out[0], sample, atol=1e-5)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "heavy"])
def test_policies_without_a_batch_version_are_refused(policy: str) -> None:
    with pytest.raises(ValueError, match=r"augment\.policy.*none, basic, color, geometric"):
        build_batch_policy(cfg(policy), train=True)


def test_geometric_needs_resize_first() -> None:
    with pytest.raises(ValueError, match=r"augment\.order"):
        build_batch_policy(cfg("geometric", order="augment_first"), train=True)
    build_batch_policy(cfg("basic", order="augment_first"), train=True)


def test_cpu_generator_required() -> None:
    aug = build_batch_policy(cfg("basic"), train=True)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            aug.sample_params(2, torch.Generator(device="cuda"))
    assert aug.sample_params(2, torch.Generator()).scale.shape == (2,)


# --- loader side ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(96, 128), (20, 30), (120, 30), (30, 120), (46, 46)])
def test_to_working_uint8_squashes_and_records_the_aspect(shape: tuple[int, int]) -> None:
    h, w = shape
    to_working = pickle.loads(pickle.dumps(ToWorkingUint8(46)))
    tensor, aspect = to_working(smooth_image(h, w))
    assert tensor.shape == (3, 46, 46) and tensor.dtype == torch.uint8
    assert aspect == pytest.approx(w / h)
    # Squashing keeps fractional positions: the quadrant colours stay in their quadrants.
    q, _ = to_working(quadrants(h, w))
    assert q[:, 5, 5].tolist() == [200, 0, 0] and q[:, 40, 40].tolist() == [90, 90, 90]
    assert q[:, 5, 40].tolist() == [0, 200, 0] and q[:, 40, 5].tolist() == [0, 0, 200]


def test_to_working_uint8_rejects_other_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ToWorkingUint8(16)(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        ToWorkingUint8(16)(np.zeros((8, 8), np.uint8))


# --- parameter distributions against torchvision's samplers -----------------------------------


def _ks(
    a: torch.Tensor | list[float], b: torch.Tensor | list[float], what: str, *, tails: bool = True
) -> None:
    """Same distribution (two-sample KS) and, with ``tails``, the same range (KS barely sees
    the tails; crop centres have rare extremes, so they skip that part)."""
    # Rounded: equal values computed along different float paths must tie.
    a, b = (np.round(np.asarray(v, dtype=np.float64), 9) for v in (a, b))
    result = ks_2samp(a, b)
    assert result.pvalue > KS_P, f"{what}: KS p={result.pvalue:.2g}"
    if not tails:
        return
    spread = b.max() - b.min()
    assert abs(a.min() - b.min()) <= 0.01 * spread, f"{what}: min {a.min()} vs {b.min()}"
    assert abs(a.max() - b.max()) <= 0.01 * spread, f"{what}: max {a.max()} vs {b.max()}"


# Landscape, portrait, and a panorama whose crops often fall back to the central crop.
@pytest.mark.parametrize("h, w", [(96, 128), (128, 96), (60, 120)])
def test_crop_distribution_matches_random_resized_crop(h: int, w: int) -> None:
    m = 0.7
    aug = build_batch_policy(cfg("basic", m), train=True)
    aspects = torch.full((N_DRAWS,), w / h, dtype=torch.float64)
    p = aug.sample_params(N_DRAWS, torch.Generator().manual_seed(0), aspects=aspects)
    hr, wr = resized_size(h, w)
    canvas = [torch.empty(3, hr, wr)]
    crop = TorchvisionOps().random_resized_crop(S, m)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = [crop.make_params(canvas) for _ in range(N_DRAWS)]
    area = [r["height"] * r["width"] / (hr * wr) for r in ref]
    _ks(p.scale, area, "crop area fraction")
    _ks(p.ratio, [r["width"] / r["height"] for r in ref], "crop aspect")
    # Crop centres, as left + right in canvas pixels (integers: no float ties broken).
    px = torch.round(p.box * torch.tensor([wr, hr, wr, hr], dtype=p.box.dtype))
    ref_x = [2 * r["left"] + r["width"] for r in ref]
    ref_y = [2 * r["top"] + r["height"] for r in ref]
    _ks(px[:, 0] + px[:, 2], ref_x, "crop centre x", tails=False)
    _ks(px[:, 1] + px[:, 3], ref_y, "crop centre y", tails=False)
    assert abs(p.flip.double().mean().item() - 0.5) < 0.03


def test_jitter_distribution_matches_color_jitter() -> None:
    m = 0.8
    aug = build_batch_policy(cfg("color", m), train=True)
    p = aug.sample_params(N_DRAWS, torch.Generator().manual_seed(1))
    jitter = TorchvisionOps().color_jitter(m)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ref = [jitter.make_params([]) for _ in range(N_DRAWS)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        _ks(getattr(p, name), [r[f"{name}_factor"] for r in ref], name)
    # Every op equally likely at every step, as with torch.randperm(4).
    for k in range(4):
        freq = torch.bincount(p.order[:, k], minlength=4).double() / N_DRAWS
        ref_freq = torch.bincount(torch.stack([r["fn_idx"][k] for r in ref]), minlength=4)
        assert torch.allclose(freq, ref_freq.double() / N_DRAWS, atol=0.04)
        assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)


def test_affine_distribution_matches_random_affine() -> None:
    m = 0.6
    aug = build_batch_policy(cfg("geometric", m), train=True)
    p = aug.sample_params(N_DRAWS, torch.Generator().manual_seed(2))
    affine = TorchvisionOps().affine(m)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        ref = [affine.make_params([torch.empty(3, S, S)]) for _ in range(N_DRAWS)]
    _ks(p.angle, [r["angle"] for r in ref], "angle")
    _ks(p.zoom, [r["scale"] for r in ref], "zoom")
    _ks(p.shear, [r["shear"][0] for r in ref], "shear")
    _ks(p.translate[:, 0], [r["translate"][0] for r in ref], "translate x")
    _ks(p.translate[:, 1], [r["translate"][1] for r in ref], "translate y")
    assert all(r["shear"][1] == 0 for r in ref)


# --- pixels ---------------------------------------------------------------------------------


def test_whole_image_crop_reproduces_the_resized_image() -> None:
    image = smooth_image()
    aug = build_batch_policy(cfg("basic"), train=True)
    images, aspects = batch_of(image, 2)
    p = full_crop(aug.sample_params(2, torch.Generator().manual_seed(0), aspects=aspects))
    p.flip[1] = True
    out = unnormalize(aug, aug.apply_params(images, p))
    want = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [S, S], antialias=True) / 255
    assert (out[0] - want).abs().mean() < 1.5 / 255 and (out[0] - want).abs().max() < 12 / 255
    assert torch.allclose(out[1], out[0].flip(-1), atol=1e-5)


def test_crop_lands_on_the_expected_quadrant() -> None:
    aug = build_batch_policy(cfg("basic"), train=True)
    images, aspects = batch_of(quadrants(), 4)
    p = aug.sample_params(4, torch.Generator().manual_seed(0), aspects=aspects)
    p.flip[:] = False
    p.box[:] = torch.tensor(
        [[0.1, 0.1, 0.4, 0.4], [0.6, 0.1, 0.9, 0.45], [0.05, 0.6, 0.3, 0.9], [0.55, 0.55, 1, 1]],
        dtype=p.box.dtype,
    )
    out = unnormalize(aug, aug.apply_params(images, p)) * 255
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]
    for i, colour in enumerate(colours):
        want = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand(3, S, S)
        assert torch.allclose(out[i], want, atol=1e-3), f"crop {i}"


@pytest.mark.parametrize("policy, tolerance", [("basic", 1.5), ("geometric", 1.5), ("color", 2.5)])
def test_batch_matches_the_sample_ops_with_the_same_parameters(
    policy: str, tolerance: float
) -> None:
    """Mean |difference| in uint8 steps, from the squash, bilinear sampling, uint8 rounding."""
    image = smooth_image(128, 80)
    aug = build_batch_policy(cfg(policy), train=True)
    images, aspects = batch_of(image, 8)
    p = aug.sample_params(8, torch.Generator().manual_seed(5), aspects=aspects)
    out = aug.apply_params(images, p)
    ref = torch.stack([reference(image, p, i, policy) for i in range(8)])
    diff = (unnormalize(aug, out) - unnormalize(aug, ref)).abs() * 255
    assert diff.mean() < tolerance


def test_eval_crop_matches_the_sample_eval_transform() -> None:
    for h, w in [(96, 128), (128, 80)]:
        image = smooth_image(h, w)
        aug = build_batch_policy(cfg("basic"), train=False)
        images, aspects = batch_of(image, 1)
        out = aug(images, aspects)[0]
        want = build_transform(cfg("basic"), train=False)(image)
        diff = (unnormalize(aug, out[None]) - unnormalize(aug, want[None])).abs() * 255
        assert diff.mean() < 1.0, (h, w)


def test_jitter_ops_equal_torchvision_on_float_images() -> None:
    """Whole-image crop of an S x S input is the identity, leaving only the colour ops."""
    aug = build_batch_policy(cfg("color"), train=True)
    g = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (32, 3, S, S), dtype=torch.uint8, generator=g)
    p = full_crop(aug.sample_params(32, g))
    out = unnormalize(aug, aug.apply_params(images, p))
    ref = torch.stack([_jitter(images[i] / 255, p, i) for i in range(32)])
    assert torch.allclose(out, ref, atol=1e-4)


def test_affine_equals_torchvision_including_the_zero_fill() -> None:
    aug = build_batch_policy(cfg("geometric"), train=True)
    g = torch.Generator().manual_seed(7)
    images = torch.randint(1, 256, (32, 3, S, S), dtype=torch.uint8, generator=g)
    p = full_crop(aug.sample_params(32, g))
    out = unnormalize(aug, aug.apply_params(images, p))
    ref = torch.stack([_affine(images[i] / 255, p, i) for i in range(32)])
    assert (ref == 0).any(), "some pixels should be filled"
    assert torch.allclose(out, ref, atol=1e-4)
