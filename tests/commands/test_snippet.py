"""feeding_snippet: the emitted script runs on its own and feeds like feedtune's pipeline."""

from __future__ import annotations

import itertools
import json
import re
import runpy
import subprocess
import sys

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from feedtune.commands.snippet import config_from_params, feeding_snippet, snippet_from_params
from feedtune.config import Config, parse_override, with_overrides
from feedtune.feed.augment.per_sample import build_transform
from feedtune.feed.augment.policies import POLICIES
from feedtune.feed.dataset import ImageDataset
from feedtune.feed.loader import build_loader
from feedtune.feed.sampling import build_sampler, class_weights

# Different sizes and aspects, one large enough for reduced-size JPEG decoding.
SIZES = [(96, 80), (50, 120), (400, 300), (64, 64), (33, 47), (150, 90)]
LABELS = [0] * 7 + [1] * 3 + [2] * 2  # imbalanced on purpose: the weighted sampler must notice

CASES = {
    "default": [],
    "albumentations-weighted": [
        "augment.library=albumentations",
        "augment.policy=color",
        "sampler.kind=weighted",
        "sampler.weight_power=0.5",
        "loader.batch_size=4",
        # Workers run seed_worker, which the script only has when there are workers.
        "loader.num_workers=2",
    ],
    "randaugment": ["augment.policy=randaugment"],
}

# Imports make_loader from the script, takes one batch and describes it; then runs the script
# as printed, as a user would before filling in the placeholders.
DRIVER = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
import torch
from feeding import make_loader
paths, labels = json.loads(open(sys.argv[2]).read())
torch.manual_seed(0)
loader = make_loader(paths, labels)
images, targets = next(iter(loader))
sampler = loader.sampler
workers_differ = None
if loader.num_workers > 1:  # one image throughout: batch 0 from worker 0, batch 1 from worker 1
    first, second = [x for x, _ in make_loader([paths[0]] * 10, [0] * 10)][:2]
    workers_differ = not torch.equal(first, second)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    runpy.run_path(sys.argv[1] + "/feeding.py", run_name="__main__")
print(json.dumps({
    "shape": list(images.shape),
    "dtype": str(images.dtype),
    "targets_dtype": str(targets.dtype),
    "sampler": type(sampler).__name__,
    "weights": sampler.weights.tolist() if hasattr(sampler, "weights") else None,
    "num_samples": getattr(sampler, "num_samples", None),
    "replacement": getattr(sampler, "replacement", None),
    "workers_differ": workers_differ,
    "as_printed": printed.getvalue(),
    "feedtune_imported": any(m.split(".")[0] == "feedtune" for m in sys.modules),
}))
"""


def config(overrides: list[str]) -> Config:
    return with_overrides(Config(), dict(parse_override(o) for o in overrides))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[int]]:
    root = tmp_path_factory.mktemp("snippet-images")
    rng = np.random.default_rng(0)
    paths = []
    for i, label in enumerate(LABELS):
        w, h = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = root / f"{label}_{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths, LABELS


def feedtune_batch(cfg: Config, paths: list[str], labels: list[int]) -> tuple[torch.Tensor, ...]:
    """One training batch from feedtune's own dataset, transform, sampler and loader."""
    table = pd.DataFrame({"path": paths, "label": labels})
    dataset = ImageDataset(table, sorted(set(labels)), build_transform(cfg.augment, train=True))
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = build_sampler(cfg.sampler, targets=dataset.targets, generator=generator)
    loader = build_loader(dataset, cfg.loader, sampler=sampler, seed=cfg.seed, cuda=False)
    images, targets = next(iter(loader))
    return images, targets, dataset.targets, sampler


@pytest.mark.parametrize("case", CASES)
def test_script_runs_alone_and_batches_like_feedtune(case, images, tmp_path):
    cfg = config(CASES[case])
    text = feeding_snippet(cfg)
    assert not re.search(r"^\s*(import|from)\s+feedtune\b", text, re.MULTILINE)
    (tmp_path / "feeding.py").write_text(text)
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "data.json").write_text(json.dumps(images))
    done = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(tmp_path / "data.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert not got["feedtune_imported"]
    assert "Fill in paths and labels" in got["as_printed"]
    # Forked workers must not repeat each other's augmentations (albumentations needs seeding).
    assert got["workers_differ"] is (True if cfg.loader.num_workers > 1 else None)

    want, want_targets, targets, sampler = feedtune_batch(cfg, *images)
    assert got["shape"] == list(want.shape)
    assert got["dtype"] == str(want.dtype) == "torch.float32"
    assert got["targets_dtype"] == str(want_targets.dtype)
    assert got["sampler"] == {"random": "RandomSampler", "weighted": "WeightedRandomSampler"}.get(
        cfg.sampler.kind, "SequentialSampler"
    )
    if cfg.sampler.kind == "weighted":
        assert got["weights"] == class_weights(targets, cfg.sampler.weight_power).tolist()
        assert got["num_samples"] == sampler.num_samples == len(LABELS)
        assert got["replacement"] == sampler.replacement


def test_default_script_is_short():
    assert len(feeding_snippet(Config()).splitlines()) <= 80


def test_scripts_are_lint_clean_and_formatted(tmp_path):
    """Users paste the script into their code: it should pass the same checks as ours."""
    pytest.importorskip("ruff")
    for case, overrides in CASES.items():
        (tmp_path / f"{case}.py").write_text(feeding_snippet(config(overrides)))
    ruff = [sys.executable, "-m", "ruff"]
    rules = ["--isolated", "--line-length", "100"]
    for command in (["check", *rules, "--select", "E,F,W,I,B,UP"], ["format", *rules, "--check"]):
        done = subprocess.run([*ruff, *command, str(tmp_path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("library", "order"),
    itertools.product(("torchvision", "albumentations"), ("resize_first", "augment_first")),
)
def test_transforms_are_feedtunes_to_the_parameter(library, order, tmp_path):
    """torchvision: the same output image for the same torch seed; albumentations: the same
    serialised pipeline. Every policy, train and eval, at a magnitude that is no round number."""
    image = np.random.default_rng(1).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    for policy in POLICIES:
        cfg = config(
            [f"augment.library={library}", f"augment.policy={policy}", f"augment.order={order}"]
            + ["augment.magnitude=0.7"]
        )
        script = tmp_path / f"{policy}.py"
        script.write_text(feeding_snippet(cfg))
        defined = runpy.run_path(str(script))
        for train in (True, False):
            ours = build_transform(cfg.augment, train=train)
            theirs = defined["train_transform" if train else "eval_transform"]
            if library == "albumentations":
                assert A.to_dict(theirs) == A.to_dict(ours.pipeline), (policy, train)
                continue
            for seed in range(3):
                torch.manual_seed(seed)
                expected = ours(image)
                torch.manual_seed(seed)
                assert torch.equal(theirs(image), expected), (policy, train, seed)


def test_weighted_sampler_options_are_literal():
    text = feeding_snippet(
        config(["sampler.kind=weighted", "sampler.num_samples=7", "sampler.replacement=false"])
    )
    assert "num_samples=7, replacement=False" in text
    assert "shuffle=" not in text
    assert "shuffle=False" in feeding_snippet(config(["sampler.kind=sequential"]))


def test_loader_settings_and_pin_memory(tmp_path):
    text = feeding_snippet(
        config(["loader.num_workers=3", "loader.pin_memory=true", "loader.prefetch_factor=4"])
    )
    assert "pin_memory=torch.cuda.is_available() and True" in text
    assert "prefetch_factor=4" in text and "worker_init_fn=seed_worker" in text
    quiet = feeding_snippet(Config())
    assert "pin_memory=torch.cuda.is_available() and False" in quiet
    assert "prefetch_factor" not in quiet and "seed_worker" not in quiet  # need workers


def test_snippet_from_params_reads_params_as_mlflow_stores_them():
    cfg = config(
        [
            "augment.library=albumentations",
            "augment.policy=color",
            "sampler.kind=weighted",
            "sampler.weight_power=0.5",
            "loader.batch_size=4",
            "train.lr=1e-05",
        ]
    )
    cfg = with_overrides(
        cfg, {"experiment": "2024"}
    )  # YAML reads an int: the text is kept, as a string key
    # What mlflow_store.log_config logs: every value a string, None as "null".
    params = {k: "null" if v is None else str(v) for k, v in cfg.flat().items()}
    params["study.trial"] = "3"  # not a setting: skipped
    assert params["sampler.num_samples"] == "null" and params["augment.mean"].startswith("[")

    assert config_from_params(params).flat() == cfg.flat()
    assert snippet_from_params(params) == feeding_snippet(cfg)
    assert config_from_params({"loader.num_workers": "2"}).loader.num_workers == 2
