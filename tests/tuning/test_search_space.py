"""The search space as Optuna sees it: settings that cannot matter are not searched."""

import optuna

from feedtune.config import load_config
from feedtune.tuning import optuna_study as studies
from feedtune.tuning.space import consistent, grid, inert_given, quality_space, speed_space
from tests.conftest import REPO


def _space():
    return load_config(REPO / "experiments" / "default.yaml").search


def _inert(cuda: bool):
    return inert_given(load_config(REPO / "experiments" / "default.yaml").flat(), cuda=cuda)


def test_default_speed_grid_counts_each_distinct_loader_once():
    space = speed_space(_space())
    assert len(grid(space)) == 3 * 2 * 2 * 2 * 3 * 2 * 2  # every combination
    # On CPU pin_memory does nothing; without workers neither do prefetch nor persistence:
    # 0 workers: cache x decoder = 6; 1 or 2 workers: x prefetch x persistent = 24 each; all
    # twice, augmentation per sample or per batch (the default policy has a batch version).
    cells = grid(space, _inert(cuda=False))
    assert len(cells) == (6 + 2 * 24) * 2
    assert all("loader.pin_memory" not in c for c in cells)
    assert all("loader.prefetch_factor" not in c for c in cells if c["loader.num_workers"] == 0)
    assert len(grid(space, _inert(cuda=True))) == 2 * (6 + 2 * 24) * 2


def test_trials_do_not_draw_inert_settings():
    space = _space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(40):
        trial = study.ask()
        params = studies.suggest(
            trial, {**speed_space(space), **quality_space(space)}, _inert(cuda=False)
        )
        study.tell(trial, 0.0)
        drawn.append(params)
    assert all("loader.pin_memory" not in p for p in drawn)
    for p in drawn:
        workers = p["loader.num_workers"] > 0
        assert ("loader.prefetch_factor" in p) is workers
        assert ("sampler.weight_power" in p) is (p["sampler.kind"] == "weighted")
        assert ("augment.magnitude" in p) is (p["augment.policy"] != "none")
    # every relevant branch was explored
    assert {p["loader.num_workers"] for p in drawn} == {0, 1, 2}
    assert {p["sampler.kind"] for p in drawn} == {"random", "weighted"}


def test_first_trial_tries_the_configs_own_values():
    space = quality_space(_space())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    own = {"augment.policy": "color", "augment.magnitude": 0.4, "train.lr": 0.002}
    outside = {"loader.batch_size": 1000}  # not a choice of the space: left to the sampler
    assert studies.enqueue_values(study, space, {**own, **outside})
    trial = study.ask()
    params = studies.suggest(trial, space, _inert(cuda=False))
    study.tell(trial, 0.5)
    assert {k: params[k] for k in own} == own
    assert params["loader.batch_size"] in space["loader.batch_size"].choices
    assert not studies.enqueue_values(study, space, own)  # a resumed study is left alone


def test_where_is_searched_only_for_policies_whose_batch_version_draws_the_same():
    def inert(**values):
        flat = {f"augment.{k}": v for k, v in values.items()}
        return inert_given({}, cuda=False)(flat)

    assert "augment.where" not in inert(policy="basic", order="resize_first")
    assert "augment.where" not in inert(policy="color", order="augment_first")
    assert "augment.where" in inert(policy="randaugment", order="resize_first")
    assert "augment.where" in inert(policy="geometric", order="augment_first")
    assert "augment.library" in inert(policy="basic", where="batch")
    assert "augment.library" not in inert(policy="basic", where="sample")


def test_a_quality_policy_without_a_batch_version_runs_per_sample():
    settings = {"augment.policy": "basic", "augment.order": "resize_first"}
    speed_winner = {"augment.where": "batch"}
    assert consistent(settings, speed_winner) == speed_winner
    drawn = {**speed_winner, "augment.policy": "trivialaugment"}
    assert consistent(settings, drawn)["augment.where"] == "sample"
