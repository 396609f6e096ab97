"""timm/<name> and module.path:callable models: built, trained, checkpointed, rebuilt, and a
factory named only by a checkpoint never imported."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from feedtune.config import ModelConfig
from feedtune.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_args_of,
    model_from_checkpoint,
)
from feedtune.training.models import (
    build_model,
    head_parameters,
    model_args,
    num_outputs,
    replace_head,
)
from feedtune.training.trainer import BEST, new_model, train_model
from tests.conftest import tiny_feed

timm = pytest.importorskip("timm")

# A user's model file: it records every import in a side file, so a test can prove that a
# refused checkpoint never imported it.
FACTORY_MODULE = """
from pathlib import Path

from torch import nn

Path(__file__).with_suffix(".imported").write_text("imported")


class TinyNet(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def make(num_classes, width=4, tag="x"):
    return TinyNet(num_classes, width)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``userzoo_<n>.py`` on sys.path (a fresh module name per test: no import is cached)."""
    name = f"userzoo_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / "pkgs"
    folder.mkdir()
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    yield path
    sys.modules.pop(name, None)


def _factory_name(module: Path) -> str:
    return f"{module.stem}:make"


def test_a_timm_model_is_sized_by_timm_and_its_head_is_timm_s_classifier():
    model = build_model(ModelConfig(name="timm/test_resnet"), num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert num_outputs(model) == 3
    assert {id(p) for p in head_parameters(model)} == {
        id(p) for p in model.get_classifier().parameters()
    }
    replace_head(model, 5)
    assert num_outputs(model) == 5 and model.get_classifier().out_features == 5


def test_a_frozen_timm_model_trains_only_its_head():
    model = build_model(ModelConfig(name="timm/test_vit", freeze="backbone"), num_classes=2)
    head = {id(p) for p in head_parameters(model)}
    assert head
    for param in model.parameters():
        assert param.requires_grad == (id(param) in head)


def test_timm_kwargs_reach_create_model_and_are_recorded():
    cfg = ModelConfig(name="timm/test_resnet", kwargs={"drop_rate": 0.3})
    model = build_model(cfg, num_classes=2)
    assert model.drop_rate == 0.3
    assert model_args(cfg) == {
        "name": "timm/test_resnet",
        "width": cfg.width,
        "depth": cfg.depth,
        "kwargs": {"drop_rate": 0.3},
        "source": "timm",
    }


def test_unknown_timm_names_and_missing_timm_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown timm model 'no_such_net'.*list_models"):
        build_model(ModelConfig(name="timm/no_such_net"), num_classes=2)
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` sees when absent
    with pytest.raises(ValueError, match=r'pip install "feedtune\[timm\]"') as info:
        build_model(ModelConfig(name="timm/test_resnet"), num_classes=2)
    assert "\n" not in str(info.value)


def _write_hf_cache(root: Path, repo_id: str, state: dict[str, torch.Tensor]) -> None:
    """Hugging Face's hub cache layout: refs/main names the snapshot holding the file."""
    from safetensors.torch import save_file

    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


def test_pretrained_timm_weights_come_from_the_local_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="timm/test_resnet", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not in the local cache") as info:
        build_model(cfg, num_classes=3)
    message = str(info.value)
    assert "timm/test_resnet.r160_in1k" in message and str(tmp_path / "hub") in message
    assert "\n" not in message

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False)  # 1000 classes, as published
    _write_hf_cache(tmp_path / "hub", "timm/test_resnet.r160_in1k", source.state_dict())
    model = build_model(cfg, num_classes=3)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert num_outputs(model) == 3  # timm drops the published head for another class count


def test_a_timm_model_trains_and_its_checkpoint_rebuilds_it(tiny_folder, tmp_path):
    cfg, _, feed = tiny_feed(
        tiny_folder, "model.name=timm/test_resnet", "train.epochs=1", "train.amp=false"
    )
    trained = new_model(cfg, len(feed.classes))
    train_model(cfg, feed, model=trained, folder=tmp_path, progress=False)
    payload = load_checkpoint(tmp_path / BEST)
    assert payload["model_args"]["source"] == "timm"
    model, saved = model_from_checkpoint(payload)
    assert saved.model.name == "timm/test_resnet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), trained.cpu().eval()(x), atol=1e-5)


def test_a_user_factory_trains_and_reloads_when_the_caller_names_it(
    tiny_folder, tmp_path, user_module
):
    name = _factory_name(user_module)
    cfg, _, feed = tiny_feed(
        tiny_folder, f"model.name={name}", "model.kwargs={width: 6, tag: '1e-3'}", "train.epochs=1"
    )
    assert cfg.flat()["model.kwargs.width"] == 6
    trained = new_model(cfg, len(feed.classes))
    train_model(cfg, feed, model=trained, folder=tmp_path, progress=False)
    payload = load_checkpoint(tmp_path / BEST)
    assert payload["model_args"]["source"] == "factory"
    assert model_args_of(payload)["kwargs"] == {"width": 6, "tag": "1e-3"}
    model, _ = model_from_checkpoint(payload, allowed_factory=name)
    assert model.fc.in_features == 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), trained.cpu().eval()(x), atol=1e-5)
    frozen, _ = model_from_checkpoint(payload, allowed_factory=name, freeze="backbone")
    assert [p.requires_grad for p in frozen.parameters()] == [False, False, True, True]
    replace_head(frozen, 7)
    assert num_outputs(frozen) == 7


def test_a_checkpoint_naming_a_factory_the_caller_did_not_name_is_refused_unimported(
    tmp_path, user_module
):
    name = _factory_name(user_module)
    cfg = ModelConfig(name=name, kwargs={"width": 3})
    # Written as a checkpoint from elsewhere would be, without importing the module here.
    payload = {
        "model_state": {},
        "model_args": {**dataclasses.asdict(cfg), "source": "factory"},
        "classes": ["a", "b"],
        "config": {"model": dataclasses.asdict(cfg)},
    }
    for allowed in (None, "small_cnn", "other.module:make"):
        with pytest.raises(CheckpointError, match=f"--set model.name={name}") as info:
            model_from_checkpoint(payload, allowed_factory=allowed)
        assert "\n" not in str(info.value)
    assert not user_module.with_suffix(".imported").exists()
    assert user_module.stem not in sys.modules


def test_factory_names_that_cannot_be_used_are_one_line_errors(user_module):
    for name, match in [
        ("no_such_pkg_xyz:make", "cannot import 'no_such_pkg_xyz'"),
        (f"{user_module.stem}:missing", "has no 'missing'"),
        ("a b:c", "not module.path:callable"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_model(ModelConfig(name=name), num_classes=2)
    with pytest.raises(ValueError, match="model.kwargs: only timm/<name>"):
        build_model(ModelConfig(kwargs={"width": 3}), num_classes=2)


def test_checkpoints_without_kwargs_in_their_model_args_still_load(tmp_path):
    from feedtune.config import Config
    from feedtune.training.checkpoint import save_checkpoint

    old = build_model(ModelConfig(width=8), num_classes=3).eval()
    config = Config().to_dict()
    config["model"].pop("kwargs")
    config["model"]["width"] = 8
    args = {"name": "small_cnn", "width": 8, "depth": 5}  # as written before kwargs existed
    path = save_checkpoint(
        {
            "config": config,
            "model_args": args,
            "classes": ["a", "b", "c"],
            "model_state": old.state_dict(),
        },
        tmp_path / "old.pt",
    )
    model, _ = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), old(x))
