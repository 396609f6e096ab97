import json

import pandas as pd
import pytest

from feedtune.config import SplitConfig
from feedtune.sources.split import make_split


def _table(n_groups_per_class: dict[str, int], per_group: int = 5) -> pd.DataFrame:
    rows = []
    for label, n_groups in n_groups_per_class.items():
        for g in range(n_groups):
            for i in range(per_group):
                rows.append(
                    {"path": f"/data/{label}/{g}_{i}.jpg", "label": label, "group": f"{label}-{g}"}
                )
    return pd.DataFrame(rows)


def test_grouped_split_has_no_leak_and_is_stratified():
    table = _table({"a": 40, "b": 20, "c": 5})
    split = make_split(table, SplitConfig(val_fraction=0.2), seed=1)
    assert not set(split.train["group"]) & set(split.val["group"])
    assert len(split.train) + len(split.val) == len(table)
    for label in ("a", "b", "c"):
        assert (split.val["label"] == label).any() and (split.train["label"] == label).any()
    frac = len(split.val) / len(table)
    assert 0.15 < frac < 0.25


def test_split_is_deterministic_and_seed_dependent():
    table = _table({"a": 30, "b": 12})
    one = make_split(table, SplitConfig(), seed=3)
    two = make_split(table.sample(frac=1, random_state=0), SplitConfig(), seed=3)
    other = make_split(table, SplitConfig(), seed=4)
    assert one.digest == two.digest
    assert list(one.val["path"]) == list(two.val["path"])
    assert other.digest != one.digest


def test_ungrouped_split_when_no_group_column():
    table = _table({"a": 10, "b": 10}).drop(columns="group")
    split = make_split(table, SplitConfig(val_fraction=0.25), seed=0)
    assert split.summary["grouped"] is False
    assert len(split.val) == 25


def test_grouped_false_ignores_groups_and_leaks():
    table = _table({"a": 30, "b": 30})
    split = make_split(table, SplitConfig(grouped=False), seed=0)
    assert set(split.train["group"]) & set(split.val["group"])  # why grouping matters


def test_write_produces_contract_files(tmp_path):
    split = make_split(_table({"a": 10, "b": 10}), SplitConfig(), seed=0)
    files = {p.name for p in split.write(tmp_path)}
    assert files == {"train.csv", "val.csv", "summary.json"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["digest"] == split.digest
    assert set(summary["class_counts"]["val"]) == {"a", "b"}
    train = pd.read_csv(tmp_path / "train.csv")
    assert not train["path"].str.startswith("/").any()  # relative to the data root


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="groups"):
        make_split(_table({"a": 1, "b": 1}), SplitConfig(val_fraction=0.2), seed=0)
