"""The default feed: ``loader.cache`` and ``augment.where`` are ``auto``, and each run resolves
them to the fastest values that are safe for its data on its machine."""

from __future__ import annotations

import shutil

import pytest

from feedtune.config import Config, ConfigError, load_config
from feedtune.feed.auto import resolve_auto
from feedtune.sources.prepare import prepare_data
from tests.conftest import TINY_RUN, tiny_feed


def _resolved(folder, *overrides, **shm):
    cfg = load_config(None, [f"data.path={folder}", *TINY_RUN, *overrides])
    return resolve_auto(cfg, prepare_data(cfg, progress=False), **shm)


def test_by_default_a_run_caches_resized_images_and_augments_whole_batches(
    tiny_folder, tmp_path, caplog
):
    assert (Config().loader.cache, Config().augment.where) == ("auto", "auto")
    with caplog.at_level("INFO", logger="feedtune.feed.auto"):
        cfg = _resolved(tiny_folder, shm_path=tmp_path)
    assert (cfg.loader.cache, cfg.augment.where) == ("resized", "batch")
    assert "augment.where=auto: batch (policy basic has a batch version)" in caplog.text
    assert "loader.cache=auto: resized (a resized cache of 44 images needs" in caplog.text
    # Resolved once: a resolved config stays as it is.
    assert resolve_auto(cfg, prepare_data(cfg, progress=False)) is cfg
    # The feed a default config builds is the one those values build.
    _, _, feed = tiny_feed(tiny_folder)
    assert feed.policy_on == "loader" and feed.train_set.cache is not None
    assert feed.train_set.cache.mode == "resized" and feed.val_set.cache is not None


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        ("trivialaugment", "resize_first"),
        ("randaugment", "resize_first"),
        ("geometric", "augment_first"),
    ],
)
def test_a_policy_without_a_batch_version_runs_per_sample(tiny_folder, policy, order):
    cfg = _resolved(tiny_folder, f"augment.policy={policy}", f"augment.order={order}")
    assert cfg.augment.where == "sample"


def test_a_cache_that_does_not_fit_the_measured_memory_is_not_used(tiny_folder, tmp_path, caplog):
    free = shutil.disk_usage(tmp_path).free
    with caplog.at_level("WARNING", logger="feedtune.feed.auto"):
        cfg = _resolved(tiny_folder, shm_path=tmp_path, shm_margin_bytes=free)
    assert cfg.loader.cache == "none" and cfg.augment.where == "batch"
    assert "loader.cache=auto: none" in caplog.text and "--shm-size" in caplog.text
    # Asked for explicitly, a value is kept whatever fits: the cache then warns and skips.
    cfg = _resolved(tiny_folder, "loader.cache=decoded", shm_path=tmp_path, shm_margin_bytes=free)
    assert cfg.loader.cache == "decoded"


def test_auto_is_not_a_search_choice():
    for key, values in (("loader.cache", "[auto, none]"), ("augment.where", "[auto, batch]")):
        with pytest.raises(ConfigError, match=f"search.{key}: 'auto' is chosen per run"):
            load_config(None, [f"search.{key}={{choice: {values}}}"])
