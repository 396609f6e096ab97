"""build_transform: shapes, determinism, strength, serialization, seeding, sample grid."""

from __future__ import annotations

import pickle
import random

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from feedtune.config import AugmentConfig
from feedtune.feed.augment.per_sample import Transform, build_transform, save_sample_grid
from feedtune.feed.augment.policies import POLICIES

LIBRARIES = ("torchvision", "albumentations")
ORDERS = ("resize_first", "augment_first")
S = 32


def smooth_image(h: int = 96, w: int = 128) -> np.ndarray:
    """Non-square RGB image with gradients and a disc: interpolation-friendly, not symmetric."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (h + w) * 255], axis=-1)
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 4, (255, 40, 90), -1)
    return img.astype(np.uint8)


IMAGE = smooth_image()


def cfg(library: str, policy: str = "basic", **kw: object) -> AugmentConfig:
    return AugmentConfig(library=library, policy=policy, image_size=S, **kw)


# Tiny images: threads only add OpenMP stalls when the (shared) CPU is busy.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded(seed: int) -> None:
    """What a DataLoader worker_init_fn does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("order", ORDERS)
def test_every_pipeline_returns_normalised_square_tensor(library, policy, order):
    torch.manual_seed(0)
    for train in (True, False):
        t = build_transform(cfg(library, policy, order=order, magnitude=1.0), train=train)
        assert isinstance(t, Transform) and t.train is train
        for _ in range(3):
            out = t(IMAGE)
            assert out.dtype == torch.float32 and tuple(out.shape) == (3, S, S)
            assert torch.isfinite(out).all()


def test_rejects_non_rgb_uint8_input():
    t = build_transform(cfg("torchvision"), train=False)
    with pytest.raises(ValueError, match="RGB"):
        t(IMAGE[..., 0])
    with pytest.raises(ValueError, match="uint8"):
        t(IMAGE.astype(np.float32))


@pytest.mark.parametrize("library", LIBRARIES)
def test_eval_is_deterministic_and_none_policy_trains_like_eval(library):
    ev = build_transform(cfg(library, "basic"), train=False)
    none = build_transform(cfg(library, "none", order="augment_first"), train=True)
    first = ev(IMAGE)
    assert torch.equal(first, ev(IMAGE))
    assert torch.equal(first, none(IMAGE))


def test_eval_outputs_agree_across_libraries():
    for h, w in ((96, 128), (300, 200), (150, 600)):
        img = smooth_image(h, w)
        tv = build_transform(cfg("torchvision"), train=False)(img)
        al = build_transform(cfg("albumentations"), train=False)(img)
        # Interpolation differs (antialiased bilinear vs INTER_AREA): small, mostly at edges.
        assert (tv - al).abs().mean().item() < 0.05


def _distance_from_eval(library: str, policy: str, magnitude: float, draws: int = 12) -> float:
    """Mean abs difference from the eval output or its mirror (the flip does not scale)."""
    torch.manual_seed(0)
    reference = build_transform(cfg(library, policy), train=False)(IMAGE)
    t = build_transform(cfg(library, policy, magnitude=magnitude), train=True)
    distances = []
    for _ in range(draws):
        out = t(IMAGE)
        distances.append(
            min((out - ref).abs().mean().item() for ref in (reference, reference.flip(-1)))
        )
    return float(np.mean(distances))


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("none", "basic")])
def test_magnitude_scales_strength(library, policy):
    weak, strong = (_distance_from_eval(library, policy, m) for m in (0.0, 1.0))
    assert strong > weak * 1.2, (weak, strong)


@pytest.mark.parametrize("library", LIBRARIES)
def test_magnitude_scales_crop_zoom(library):
    # basic's only magnitude knob is the crop's smallest area (the framing differs from eval
    # even at full scale, so a pixel distance does not show it reliably).
    def crop_scale(m: float) -> list[float]:
        d = build_transform(cfg(library, "basic", magnitude=m), train=True).to_dict()
        stack = [d["transform"]]
        while stack:
            node = stack.pop()
            if node.get("name", node.get("__class_fullname__")) == "RandomResizedCrop":
                return node.get("params", node)["scale"]
            stack += node.get("transforms", [])
        raise AssertionError("no RandomResizedCrop")

    assert crop_scale(0.0) == pytest.approx([0.9, 1.0])
    assert crop_scale(1.0) == pytest.approx([0.35, 1.0])


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_steps_in_sequence_equal_call(library, policy):
    t = build_transform(cfg(library, policy, magnitude=0.8), train=True)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = t(IMAGE)
        torch.manual_seed(seed)
        x = IMAGE
        for name, step in t.steps:
            assert isinstance(name, str) and callable(step)
            x = step(x)
        assert torch.equal(x, expected)
    assert t.steps[-1][0] == "to_tensor_normalize"


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("order", ORDERS)
def test_same_seeds_reproduce_and_other_seeds_differ(library, order):
    def run(seed: int) -> list[torch.Tensor]:
        t = build_transform(cfg(library, "heavy", order=order, magnitude=1.0), train=True)
        seeded(seed)
        t.reseed(seed)
        return [t(IMAGE) for _ in range(4)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_albumentations_follows_torch_rng_not_its_own_state():
    # A copy of the transform (as in a forked or spawned worker) must not replay the parent's
    # augmentations: output depends on torch's RNG only.
    t = build_transform(cfg("albumentations", "color", magnitude=1.0), train=True)
    clone = pickle.loads(pickle.dumps(t))
    t(IMAGE)  # advance the original's albumentations state
    torch.manual_seed(5)
    x = t(IMAGE)
    torch.manual_seed(5)
    assert torch.equal(x, clone(IMAGE))
    torch.manual_seed(6)
    assert not torch.equal(x, clone(IMAGE))


@pytest.mark.parametrize("library", LIBRARIES)
def test_pickle_round_trip(library):
    t = build_transform(cfg(library, "randaugment", magnitude=0.7), train=True)
    t2 = pickle.loads(pickle.dumps(t))
    assert (t2.library, t2.policy, t2.train) == (library, "randaugment", True)
    torch.manual_seed(3)
    x = t(IMAGE)
    torch.manual_seed(3)
    assert torch.equal(x, t2(IMAGE))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("order", ORDERS)
def test_albumentations_dict_round_trip(policy, order, tmp_path):
    t = build_transform(cfg("albumentations", policy, order=order, magnitude=0.6), train=True)
    d = t.to_dict()
    meta = (d["library"], d["policy"], d["order"], d["image_size"])
    assert meta == ("albumentations", policy, order, S)
    t.save(tmp_path / "t.yaml")
    rebuilt = [A.from_dict(d), A.load(tmp_path / "t.yaml", data_format="yaml")]
    for other in rebuilt:
        assert A.to_dict(other) == A.to_dict(t.pipeline)
        for seed in range(3):
            t.pipeline.set_random_seed(seed)
            other.set_random_seed(seed)
            assert torch.equal(t.pipeline(image=IMAGE)["image"], other(image=IMAGE)["image"])


EXPECTED_TV = {
    "none": ["Resize", "CenterCrop"],
    "basic": ["Resize", "RandomResizedCrop", "RandomHorizontalFlip"],
    "color": ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"],
    "geometric": ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "RandomAffine"],
    "randaugment": ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "RandAugment"],
    "trivialaugment": [
        "Resize", "RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWideUpTo",
    ],
    "heavy": [
        "Resize", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomAffine",
        "RandomApply", "GaussianBlur", "RandomGrayscale", "RandomErasing",
    ],
}  # fmt: skip


def _names(node: dict) -> list[str]:
    return [node["name"]] + [n for child in node.get("transforms", []) for n in _names(child)]


@pytest.mark.parametrize("policy", POLICIES)
def test_torchvision_description_lists_transforms(policy, tmp_path):
    t = build_transform(cfg("torchvision", policy), train=True)
    d = t.to_dict()
    names = _names(d["transform"])
    assert names == ["Compose", "NumpyToImage", *EXPECTED_TV[policy], "ToDtype", "Normalize"]
    path = t.save(tmp_path / "tv.yaml")
    loaded = yaml.safe_load(path.read_text())
    assert loaded == d and loaded["policy"] == policy
    crop = next(
        n for n in d["transform"]["transforms"] if n["name"] in ("CenterCrop", "RandomResizedCrop")
    )
    assert crop["params"]["size"] == [S, S]


def test_sample_grid_png_size(tmp_path):
    t = build_transform(cfg("albumentations", "heavy"), train=True)
    images = [IMAGE, smooth_image(300, 200)]
    path = tmp_path / "grid.png"
    out = save_sample_grid(images, t, path, n_augmentations=3, mean=t.cfg.mean, std=t.cfg.std)
    assert out == path
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == ((1 + 3) * 120, 2 * 120 + 40)


@pytest.mark.parametrize("library", LIBRARIES)
def test_dataloader_workers_differ_and_reproduce(library):
    """Default DataLoader seeding alone (no worker_init_fn) gives distinct, repeatable draws."""
    if "fork" not in torch.multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    t = build_transform(cfg(library, "color", magnitude=1.0), train=True)

    class Same(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> torch.Tensor:
            return t(IMAGE)

    def epoch(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            Same(), batch_size=1, num_workers=2, multiprocessing_context="fork", generator=generator
        )
        return torch.cat(list(loader))

    a, b = epoch(0), epoch(0)
    assert torch.equal(a, b)
    # Items 0 and 1 go to different workers: they must not be the same augmentation.
    assert not torch.equal(a[0], a[1])
