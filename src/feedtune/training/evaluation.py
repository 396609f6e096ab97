"""Evaluation: loss, accuracy, macro-F1 and per-class recall of a model on a loader, gathered
across processes when one evaluation is shared by several."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, recall_score
from torch import nn

from feedtune.feed.device_loader import on_device
from feedtune.progress import progress_bar
from feedtune.training.devices import autocast, is_channels_last
from feedtune.training.distributed import Dist


@dataclass
class EvalResult:
    loss: float
    acc: float
    f1_macro: float
    per_class_recall: list[float]
    confusion: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: nn.Module,
    *,
    device: torch.device,
    num_classes: int,
    amp: bool = False,
    progress: bool = True,
    dist: Dist | None = None,
) -> EvalResult:
    """Loss, accuracy, macro-F1 (what matters on imbalanced data) and per-class recall.

    ``loader``: the feed's ``val`` (device-ready batches), or any loader of float batches.
    With ``dist`` of several processes, it is this process's share of the validation set
    (``feed.build_feed``): every process gathers the predictions of all and
    computes the metrics on their union, so they are those of one process evaluating it all.
    ``model`` must then be the plain module, not its ``DistributedDataParallel`` wrapper (whose
    forward may synchronise buffers, a collective the processes need not reach alike)."""
    model.eval()
    loader = on_device(loader, device, channels_last=is_channels_last(model))
    total_loss, count = 0.0, 0
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    batches = progress_bar(
        loader, desc="val", unit="batch", enabled=progress, leave=False, bar_only=True
    )
    for images, targets in batches:
        with autocast(device, amp):
            logits = model(images)
        total_loss += loss_fn(logits.float(), targets).item() * targets.shape[0]
        count += targets.shape[0]
        y_true.append(targets.cpu().numpy())
        y_pred.append(logits.argmax(1).cpu().numpy())
    true = np.concatenate(y_true) if y_true else np.zeros(0, dtype=np.int64)
    pred = np.concatenate(y_pred) if y_pred else np.zeros(0, dtype=np.int64)
    if dist is not None and dist.enabled:
        total_loss, count, true, pred = _gathered(dist, total_loss, count, true, pred)
    labels = list(range(num_classes))
    return EvalResult(
        loss=total_loss / max(1, count),
        acc=float((true == pred).mean()) if count else 0.0,
        f1_macro=float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        per_class_recall=[
            float(r) for r in recall_score(true, pred, labels=labels, average=None, zero_division=0)
        ],
        confusion=confusion_matrix(true, pred, labels=labels),
        y_true=true,
        y_pred=pred,
    )


def _gathered(
    dist: Dist, total_loss: float, count: int, true: np.ndarray, pred: np.ndarray
) -> tuple[float, int, np.ndarray, np.ndarray]:
    """The summed loss, count, targets and predictions of every process's share. Process r
    evaluated samples r, r + W, r + 2W, ... in order: interleaving the shares back restores the
    validation set's order (unless a process skipped a bad image; then they are concatenated)."""
    shares = dist.all_gather((total_loss, count, true, pred))
    total = sum(s[1] for s in shares)
    sizes = [len(s[2]) for s in shares]
    in_order = all(n == -(-(total - r) // dist.world_size) for r, n in enumerate(sizes))
    if in_order:
        true_all = np.zeros(total, dtype=true.dtype)
        pred_all = np.zeros(total, dtype=pred.dtype)
        for r, share in enumerate(shares):
            true_all[r :: dist.world_size] = share[2]
            pred_all[r :: dist.world_size] = share[3]
    else:
        true_all = np.concatenate([s[2] for s in shares])
        pred_all = np.concatenate([s[3] for s in shares])
    return float(sum(s[0] for s in shares)), total, true_all, pred_all
