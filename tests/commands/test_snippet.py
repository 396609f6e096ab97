"""feeding_snippet: the emitted script runs on its own and feeds like feedtune's pipeline."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import runpy
import subprocess
import sys
import types

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from feedtune.commands import best
from feedtune.commands.snippet import config_from_params, feeding_snippet, snippet_from_params
from feedtune.config import Config, parse_override, with_overrides
from feedtune.feed.augment.mixing import StepCollate, build_mix
from feedtune.feed.augment.per_sample import build_transform
from feedtune.feed.augment.policies import POLICIES
from feedtune.feed.dataset import ImageDataset
from feedtune.feed.loader import build_loader
from feedtune.feed.sampling import build_sampler, class_weights
from feedtune.training.trainer import EpochSeeding

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
    "cutmix": ["augment.mix=cutmix"],
}

# Runs trained under torchrun on 2 processes: the script feeds one process its share.
DISTRIBUTED_CASES = {
    "random": [],
    "weighted": ["sampler.kind=weighted", "sampler.weight_power=0.5", "augment.mix=mixup"],
}

# Further scripts that must be lint clean: (overrides, world size).
LINT_CASES = {
    **{case: (overrides, 1) for case, overrides in CASES.items()},
    **{f"torchrun-{case}": (overrides, 2) for case, overrides in DISTRIBUTED_CASES.items()},
    "torchrun-sequential": (["sampler.kind=sequential"], 4),
    "torchrun-albumentations-weighted-mix": (
        [*CASES["albumentations-weighted"], "augment.mix=mixup_or_cutmix"],
        2,
    ),
    "albumentations-mix": (["augment.library=albumentations", "augment.mix=mixup_or_cutmix"], 1),
}

# Imports make_loader from the script, takes one batch and describes it; then runs the script
# as printed, as a user would before filling in the placeholders.
DRIVER = """
import contextlib, io, json, pickle, runpy, sys
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
    "targets": targets.tolist(),
    "collate_pickles": pickle.loads(pickle.dumps(loader.collate_fn)) is not None,
    "sampler": type(sampler).__name__,
    "weights": sampler.weights.tolist() if hasattr(sampler, "weights") else None,
    "num_samples": getattr(sampler, "num_samples", None),
    "replacement": getattr(sampler, "replacement", None),
    "workers_differ": workers_differ,
    "as_printed": printed.getvalue(),
    "feedtune_imported": any(m.split(".")[0] == "feedtune" for m in sys.modules),
}))
"""


# Run with RANK and WORLD_SIZE as torchrun sets them: one epoch of this process, then each
# process's share of epochs 0 and 1 (RANK changed in between: the script reads it from the env).
DISTRIBUTED_DRIVER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from feeding import make_loader
paths, labels = json.loads(open(sys.argv[2]).read())
loader = make_loader(paths, labels)
seen = sum(len(targets) for _, targets in loader)
shares = {}
for epoch in (0, 1):
    for rank in range(int(os.environ["WORLD_SIZE"])):
        os.environ["RANK"] = str(rank)
        sampler = make_loader(paths, labels).sampler
        sampler.set_epoch(epoch)
        shares[f"{epoch}/{rank}"] = list(sampler)
print(json.dumps({
    "sampler": type(loader.sampler).__name__,
    "rank": loader.sampler.rank,
    "num_replicas": loader.sampler.num_replicas,
    "seen": seen,
    "shares": shares,
    "initialized": torch.distributed.is_initialized(),
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
    classes = sorted(set(labels))
    dataset = ImageDataset(table, classes, build_transform(cfg.augment, train=True))
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = build_sampler(cfg.sampler, targets=dataset.targets, generator=generator)
    mix = build_mix(cfg.augment, num_classes=len(classes))
    collate = StepCollate(mix) if mix is not None else None
    loader = build_loader(
        dataset, cfg.loader, sampler=sampler, seed=cfg.seed, cuda=False, collate_fn=collate
    )
    images, targets = next(iter(loader))
    return images, targets, dataset.targets, sampler


def run_driver(
    driver: str,
    text: str,
    images: tuple[list[str], list[int]],
    folder,
    env: dict[str, str] | None = None,
) -> dict:
    """Runs ``driver`` over the script ``text`` (as feeding.py) in a fresh interpreter."""
    assert not re.search(r"^\s*(import|from)\s+feedtune\b", text, re.MULTILINE)
    (folder / "feeding.py").write_text(text)
    (folder / "driver.py").write_text(driver)
    (folder / "data.json").write_text(json.dumps(images))
    done = subprocess.run(
        [sys.executable, str(folder / "driver.py"), str(folder), str(folder / "data.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_script_runs_alone_and_batches_like_feedtune(case, images, tmp_path):
    cfg = config(CASES[case])
    got = run_driver(DRIVER, feeding_snippet(cfg), images, tmp_path)
    assert not got["feedtune_imported"]
    assert "Fill in paths and labels" in got["as_printed"]
    # Forked workers must not repeat each other's augmentations (albumentations needs seeding).
    assert got["workers_differ"] is (True if cfg.loader.num_workers > 1 else None)

    want, want_targets, targets, sampler = feedtune_batch(cfg, *images)
    assert got["shape"] == list(want.shape)
    assert got["dtype"] == str(want.dtype) == "torch.float32"
    assert got["targets_dtype"] == str(want_targets.dtype)
    assert got["collate_pickles"]  # workers started by spawn can take it
    targets_got = torch.tensor(got["targets"])
    assert targets_got.shape == want_targets.shape
    if cfg.augment.mix == "none":
        assert got["targets_dtype"] == "torch.int64"
    else:  # soft targets [B, K]: rows of class weights, some of them blends of two classes
        assert got["targets_dtype"] == "torch.float32"
        assert targets_got.shape == (got["shape"][0], len(set(LABELS)))
        assert torch.allclose(targets_got.sum(dim=1), torch.ones(len(targets_got)))
        assert (targets_got.max(dim=1).values < 1).any()
    assert got["sampler"] == {"random": "RandomSampler", "weighted": "WeightedRandomSampler"}.get(
        cfg.sampler.kind, "SequentialSampler"
    )
    if cfg.sampler.kind == "weighted":
        assert got["weights"] == class_weights(targets, cfg.sampler.weight_power).tolist()
        assert got["num_samples"] == sampler.num_samples == len(LABELS)
        assert got["replacement"] == sampler.replacement


def test_default_script_is_short():
    text = feeding_snippet(Config())
    assert len(text.splitlines()) <= 80
    assert "MixCollate" not in text and "rank_and_world_size" not in text  # only when asked


def test_scripts_are_lint_clean_and_formatted(tmp_path):
    """Users paste the script into their code: it should pass the same checks as ours."""
    pytest.importorskip("ruff")
    for case, (overrides, world_size) in LINT_CASES.items():
        (tmp_path / f"{case}.py").write_text(feeding_snippet(config(overrides), world_size))
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
    assert snippet_from_params(params, world_size=2) == feeding_snippet(cfg, world_size=2)
    assert config_from_params({"loader.num_workers": "2"}).loader.num_workers == 2


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "mixup_or_cutmix"])
def test_mix_is_feedtunes_to_the_parameter(mix, tmp_path):
    """The script's MixCollate and feedtune's StepCollate(build_mix): the same soft targets and
    mixed images for the same torch seed, skipping a None sample alike."""
    cfg = config([f"augment.mix={mix}", "augment.mix_alpha=0.7"])
    script = tmp_path / "feeding.py"
    script.write_text(feeding_snippet(cfg))
    theirs = runpy.run_path(str(script))["MixCollate"](4)
    ours = StepCollate(build_mix(cfg.augment, num_classes=4))
    gen = torch.Generator().manual_seed(0)
    batch = [(torch.randn(3, 16, 16, generator=gen), i % 3) for i in range(6)]
    batch.insert(2, None)  # a bad image, skipped by feedtune's dataset
    assert theirs([None]) is None
    for seed in range(4):
        torch.manual_seed(seed)
        images, targets = ours(batch)
        torch.manual_seed(seed)
        got_images, got_targets = theirs(batch)
        assert torch.equal(got_images, images) and torch.equal(got_targets, targets), seed
        assert targets.shape == (6, 4)  # the class count given, not the labels seen


@pytest.mark.parametrize("case", DISTRIBUTED_CASES)
def test_torchrun_script_feeds_this_process_its_share(case, images, tmp_path):
    """Run as process 0 of 2 (the env torchrun sets, no process group): half the epoch, and
    each process's share of epochs 0 and 1 as feedtune's sampler draws it, reseeded by epoch
    as feedtune's trainer does."""
    cfg = config(DISTRIBUTED_CASES[case])
    text = feeding_snippet(cfg, world_size=2)
    weighted = cfg.sampler.kind == "weighted"
    if weighted:
        assert "class DistributedWeightedSampler(Sampler):" in text
        assert "DistributedSampler(" not in text
    else:
        assert "DistributedSampler(\n        train_set," in text and "shuffle=True" in text
    assert "set_epoch(epoch)" in text and "batch_size is per process" in text
    got = run_driver(
        DISTRIBUTED_DRIVER, text, images, tmp_path, env={"RANK": "0", "WORLD_SIZE": "2"}
    )
    assert not got["initialized"]
    assert (got["rank"], got["num_replicas"]) == (0, 2)
    assert got["sampler"] == ("DistributedWeightedSampler" if weighted else "DistributedSampler")
    assert got["seen"] == len(LABELS) // 2

    for epoch in (0, 1):
        draws = []
        for rank in (0, 1):
            generator = torch.Generator().manual_seed(cfg.seed)
            sampler = build_sampler(
                cfg.sampler,
                targets=LABELS,
                generator=generator,
                seed=cfg.seed,
                rank=rank,
                world_size=2,
            )
            EpochSeeding([generator], cfg.seed, sampler=sampler, rank=rank).on_epoch_start(epoch)
            draws.append(list(sampler))
            assert got["shares"][f"{epoch}/{rank}"] == draws[-1], (epoch, rank)
        if not weighted:  # shuffled: the two shares are the epoch, each image once
            assert sorted(draws[0] + draws[1]) == list(range(len(LABELS)))
    assert got["shares"]["0/0"] != got["shares"]["1/0"]  # a new draw each epoch


def test_emit_python_feeds_each_process_of_a_torchrun_run(monkeypatch):
    params = {"sampler.kind": "weighted", "augment.mix": "cutmix"}
    tags: dict[str, str] = {}
    run = types.SimpleNamespace(data=types.SimpleNamespace(params=params, tags=tags))
    monkeypatch.setattr(best, "find_best_run", lambda experiment: run)
    monkeypatch.setattr(best.mlflow_store, "use_store", contextlib.nullcontext)
    cfg = config(["sampler.kind=weighted", "augment.mix=cutmix"])
    assert best.emit_python("x") == feeding_snippet(cfg)  # no tag: one process
    tags["feedtune.world_size"] = "2"
    assert best.emit_python("x") == feeding_snippet(cfg, world_size=2)
