"""The MLflow UI in a real browser: a study logged to a real ``mlflow server``, looked at with
headless Chromium (the system one, driven by Playwright) on the page ``feedtune tune``'s closing
lines name. The screenshot lands in the test's ``tmp_path``."""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import feedtune_in_process, tune_command, write_image_folder

pytestmark = pytest.mark.slow

STUDY = "ui-study"
# Both stages, two trials each, one epoch, no extra runs: speed trials log train_samples_per_s,
# quality trials val_f1_macro and the bottleneck too (the UI shows a column only for a key
# some run has).
TINY = """
experiment: ui-browser
augment: {image_size: 32}
loader: {batch_size: 8}
train: {epochs: 1, measure_batches: 2, patience: 0}
search:
  data.decoder: {choice: [pil, opencv]}
  train.lr: {float: [1.0e-3, 1.0e-2], log: true}
  speed_steps: 3
  speed_skip_wait_frac: 0
  pruner: none
  noise_seeds: 0
  anchors: []
  calibration_trials: 0
  recheck_seeds: 0
"""
UI_TIMEOUT_MS = 60_000  # the React app loads its bundle and queries the server
COLUMNS = ("val_f1_macro", "train_samples_per_s", "feedtune.bottleneck")


def test_the_printed_ui_address_shows_the_study_its_trials_and_their_figures(
    tmp_path, mlflow_server_store, chromium_browser
):
    data = write_image_folder(tmp_path / "imgs", {"red": 16, "green": 12}, size=(40, 32))
    cfg_path = tmp_path / "ui.yaml"
    cfg_path.write_text(TINY)
    journal = f"journal:{tmp_path / 'optuna.journal'}"
    done = feedtune_in_process(
        tune_command(cfg_path, data, "--n-trials", "2") + ["--storage", journal, "--study", STUDY]
    )
    assert done.returncode == 0, done.stderr
    client = MlflowClient()
    exp = client.get_experiment_by_name("ui-browser")
    runs = client.search_runs([exp.experiment_id])
    trials = sorted(r.info.run_name for r in runs if r.data.tags.get("feedtune.kind") == "trial")
    assert trials == ["quality-0", "quality-1", "speed-0", "speed-1"], trials
    (parent,) = [r for r in runs if r.data.tags.get("feedtune.kind") == "study"]
    assert parent.info.run_name == STUDY

    # The address a user is told to open: the closing line of `feedtune tune`.
    server = mlflow_server_store.url
    printed = re.findall(r"^MLflow UI: (\S+)", done.stdout, flags=re.MULTILINE)
    assert len(printed) == 1, done.stdout
    url = printed[0]
    assert url.startswith(f"{server}/#/experiments/{exp.experiment_id}/runs"), url

    page = chromium_browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        page.goto(url)
        parent_cell = page.get_by_role("gridcell").filter(has_text=STUDY)
        parent_cell.first.wait_for(timeout=UI_TIMEOUT_MS)
        link = parent_cell.first.get_by_role("link", name=STUDY)
        assert link.get_attribute("href").endswith(f"/runs/{parent.info.run_id}")
        # The runs table with feedtune's figures as columns, not MLflow's GenAI overview.
        for column in COLUMNS:
            header = page.get_by_role("columnheader").filter(has_text=column)
            header.first.wait_for(timeout=UI_TIMEOUT_MS)
        assert not page.get_by_text("Token Usage").is_visible()
        # Nested runs start collapsed under their parent: the row's [+] button expands them.
        if not page.get_by_role("link", name=trials[0]).is_visible():
            parent_cell.first.get_by_role("button").first.click()
        for name in trials:
            page.get_by_role("link", name=name, exact=True).wait_for(timeout=UI_TIMEOUT_MS)
        shot = tmp_path / "mlflow-ui-study.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        # Each trial's row carries its figures: a throughput, and for a quality trial its
        # score and bottleneck too.
        for name in trials:
            text = _row_text(page, name)
            assert re.search(r"\d\.\d", text), text
            if name.startswith("quality"):
                assert re.search(r"\b(loader|model)\b", text), text
    finally:
        page.close()


def _row_text(page, name: str) -> str:
    """The text of the run ``name``'s whole row: the grid draws its pinned columns (the name)
    and the others (the figures) as two row elements with the same ``row-index``."""
    named = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
    index = named.first.get_attribute("row-index")
    assert index is not None, name
    return " | ".join(page.locator(f'[role="row"][row-index="{index}"]').all_inner_texts())
