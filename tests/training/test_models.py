import time

import pytest
import torch

from feedtune.config import ModelConfig
from feedtune.training.models import (
    StandIn,
    build_model,
    head_parameters,
    num_outputs,
    replace_head,
)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "mobilenet_v3_small"])
def test_build_model_sizes_the_head(name):
    model = build_model(ModelConfig(name=name), num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and num_outputs(model) == 5


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = build_model(ModelConfig(name="small_cnn", freeze="backbone"), num_classes=3)
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        assert p.requires_grad == (id(p) in head)


def test_replace_head_keeps_the_backbone():
    model = build_model(ModelConfig(), num_classes=3)
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    replace_head(model, 7)
    assert num_outputs(model) == 7
    for k, v in model.features.state_dict().items():
        assert torch.equal(v, before[k])


def test_pretrained_without_cached_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_model(ModelConfig(name="resnet18", pretrained=True), num_classes=3)


def test_pretrained_uses_the_local_cache(tmp_path, monkeypatch):
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = get_model("resnet18", weights=None)
    name = get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / name)
    model = build_model(ModelConfig(name="resnet18", pretrained=True), num_classes=4)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert num_outputs(model) == 4


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="small_cnn"):
        build_model(ModelConfig(name="resnet9000"), num_classes=2)


def test_small_cnn_width_sets_its_cost():
    narrow = build_model(ModelConfig(width=16), num_classes=3)
    wide = build_model(ModelConfig(width=32), num_classes=3)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert narrow.features[0].out_channels == 16 and wide.features[0].out_channels == 32
    assert 3.5 < count(wide) / count(narrow) < 4.5  # conv weights grow with width squared


@pytest.mark.parametrize("side", [8, 17, 64, 96])
def test_small_cnn_depth_sets_its_blocks_and_any_image_size_works(side):
    # Five 2x poolings shrink 8 px below 1 px: ceil-mode pooling must keep the map 1x1.
    shallow = build_model(ModelConfig(depth=3), num_classes=4).eval()
    deep = build_model(ModelConfig(depth=5), num_classes=4).eval()
    convs = lambda m: [c for c in m.features if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert len(convs(shallow)) == 3 and len(convs(deep)) == 5
    assert [c.out_channels for c in convs(deep)] == [24, 48, 96, 96, 96]
    with torch.no_grad():
        assert deep(torch.randn(2, 3, side, side)).shape == (2, 4)


def test_a_checkpoint_from_before_model_depth_still_loads(tmp_path):
    # Checkpoints written while small_cnn always had 4 blocks have no model.depth in their
    # config; they must rebuild as 4 blocks, not as today's default, or load_best breaks.
    from feedtune.config import Config
    from feedtune.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    old = build_model(ModelConfig(depth=4, width=8), num_classes=3).eval()
    config = Config().to_dict()
    config["model"].pop("depth")
    config["model"]["width"] = 8
    path = save_checkpoint(
        {"config": config, "classes": ["a", "b", "c"], "model_state": old.state_dict()},
        tmp_path / "old.pt",
    )
    model, _ = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), old(x))


def test_a_stand_in_overlaps_the_host_s_work_with_its_own_as_a_gpu_does():
    # 10 samples at 1,000/s: 10 ms of "device" per step. The host's 4 ms of its own per step
    # (fetching, the optimizer) run while the device works, so 20 steps take ~200 ms, not ~280.
    model = StandIn(3, samples_per_s=1000)
    x = torch.zeros(10, 3, 4, 4)
    model(x)
    start = time.perf_counter()
    for _ in range(20):
        time.sleep(0.004)
        model(x)
    elapsed = time.perf_counter() - start
    assert 0.19 < elapsed < 0.26
    # A host slower than the device sets the pace: the device never makes it wait.
    start = time.perf_counter()
    for _ in range(5):
        time.sleep(0.02)
        model(x)
    assert time.perf_counter() - start < 0.13
