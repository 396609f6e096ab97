"""The MLflow UI in a real browser: a study logged to a real ``mlflow server``, looked at with
headless Chromium (the system one, driven by Playwright). The screenshot lands in
``test-output/`` at the repository root."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from feedtune.config import load_config
from tests.conftest import REPO, single_torch_thread, write_image_folder

pytestmark = pytest.mark.slow

STUDY = "ui-study"
TINY = """
experiment: ui-browser
augment: {image_size: 32}
loader: {batch_size: 8}
search:
  data.decoder: {choice: [pil, opencv]}
  speed_steps: 3
  speed_skip_wait_frac: 0
"""
UI_TIMEOUT_MS = 60_000  # the React app loads its bundle and queries the server


def test_experiment_page_shows_the_study_and_its_trials(
    tmp_path, mlflow_server_store, chromium_browser
):

    from feedtune.commands.tune import run_tune

    data = write_image_folder(tmp_path / "imgs", {"red": 16, "green": 12}, size=(40, 32))
    cfg_path = tmp_path / "ui.yaml"
    cfg_path.write_text(TINY)
    cfg = load_config(cfg_path, [f"data.path={data}"])
    with single_torch_thread():
        result = run_tune(
            cfg,
            stage="speed",
            n_trials=2,
            storage=f"journal:{tmp_path / 'optuna.journal'}",
            study_name=STUDY,
            progress=False,
        )
    client = MlflowClient()
    exp = client.get_experiment_by_name("ui-browser")
    trials = sorted(
        r.info.run_name
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("feedtune.kind") == "trial"
    )
    assert trials == ["speed-0", "speed-1"]
    assert client.get_run(result.parent_run_id).info.run_name == STUDY

    page = chromium_browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        # The runs table of the experiment ("Model training" view; the UI opens GenAI's else).
        server = mlflow_server_store.url
        page.goto(f"{server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        parent_cell = page.get_by_role("gridcell").filter(has_text=STUDY)
        parent_cell.first.wait_for(timeout=UI_TIMEOUT_MS)
        link = parent_cell.first.get_by_role("link", name=STUDY)
        assert link.get_attribute("href").endswith(f"/runs/{result.parent_run_id}")
        # Nested runs start collapsed under their parent: the row's [+] button expands them.
        if not page.get_by_role("link", name=trials[0]).is_visible():
            parent_cell.first.get_by_role("button").first.click()
        for name in trials:
            page.get_by_role("link", name=name, exact=True).wait_for(timeout=UI_TIMEOUT_MS)
        out = REPO / "test-output"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "mlflow-ui-study.png"), full_page=True)
        assert (out / "mlflow-ui-study.png").stat().st_size > 10_000
    finally:
        page.close()
