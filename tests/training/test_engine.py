"""The training loop's learning-rate schedule: its shape, and that fit follows it per step."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from feedtune.config import TrainConfig
from feedtune.training.engine import build_optimizer, fit, lr_factor


def test_cosine_warms_up_then_decays_to_zero():
    total = 200
    factors = [lr_factor("cosine", s, total, 0.1) for s in range(total)]
    warmup = factors[:20]
    assert warmup == sorted(warmup) and warmup[0] < 0.1
    assert max(factors) == pytest.approx(1.0)
    decay = factors[20:]
    assert decay == sorted(decay, reverse=True)
    assert decay[-1] < 0.01
    assert lr_factor("constant", 150, total, 0.1) == 1.0


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 8)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.features(x)))


def _linear_data() -> TensorDataset:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _fit(
    cfg: TrainConfig, model: nn.Module, data: TensorDataset, *, finetune: bool = False
) -> tuple[list[dict], torch.optim.Optimizer]:
    """``fit`` on CPU in batches of 8 (validation in one batch); (history, optimizer)."""
    optimizer = build_optimizer(model, cfg, finetune=finetune)
    state = fit(
        model,
        DataLoader(data, batch_size=8),
        DataLoader(data, batch_size=64),
        cfg,
        num_classes=2,
        optimizer=optimizer,
        device=torch.device("cpu"),
        progress=False,
    )
    return state.history, optimizer


def test_fit_follows_the_schedule_and_keeps_group_ratios():
    cfg = TrainConfig(epochs=4, lr=0.01, patience=0, lr_schedule="cosine", warmup_frac=0.0)
    lrs = [row["lr"] for row in _fit(cfg, TinyNet(), _linear_data())[0]]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-4
    # 8 steps per epoch, 32 in all: epoch 1 ends at step 7, with the cosine's value there
    assert lrs[0] == pytest.approx(0.01 * lr_factor("cosine", 7, 32, 0.0))

    cfg = TrainConfig(epochs=2, lr=0.01, patience=0, lr_schedule="constant")
    assert [row["lr"] for row in _fit(cfg, TinyNet(), _linear_data())[0]] == [0.01, 0.01]


def test_finetune_backbone_keeps_its_lower_rate_under_the_schedule():
    cfg = TrainConfig(epochs=2, lr=0.01, patience=0, backbone_lr_scale=0.1)
    _, optimizer = _fit(cfg, TinyNet(), _linear_data(), finetune=True)
    backbone, head = optimizer.param_groups
    assert 0 < head["lr"] < 0.01
    assert backbone["lr"] == pytest.approx(0.1 * head["lr"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_model_and_batches(channels_last: bool):
    from feedtune.training.devices import is_channels_last
    from feedtune.training.models import SmallCNN

    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    data = TensorDataset(x, torch.arange(16) % 2)
    model = SmallCNN(2, width=8)
    history, _ = _fit(TrainConfig(epochs=1, patience=0, channels_last=channels_last), model, data)
    assert is_channels_last(model) is channels_last
    assert history[0]["train_loss"] > 0
