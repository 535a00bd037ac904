"""The two UIs in a real browser, as a user drives them: start a fine-tuning run from the
Prefect UI's deployment form, watch it complete, find the registered model in MLflow's UI.

Against the stack `make serve` starts (the `local_stack` fixture, shared with
tests/integration/test_deployments.py). To keep the run short, the deployment's default
parameters are first set to a small recipe through the API, so the form opens with those
defaults and is submitted as it is. Headless Debian chromium (`apt-get install chromium`,
which `make test` does where it can) through the `playwright` package; skipped, saying so,
without it.
"""

from __future__ import annotations

import pytest
from local_stack import CHROMIUM, MODEL, LocalStack, small_recipe

if not CHROMIUM.is_file():
    pytest.skip(
        f"no {CHROMIUM}: the browser tests drive Debian's chromium (apt-get install chromium; make test installs it)",
        allow_module_level=True,
    )

from playwright.sync_api import Page, expect  # noqa: E402  (after the skip: nothing to drive without chromium)

pytestmark = pytest.mark.slow


def test_custom_run_from_the_deployment_form_completes_and_its_model_is_in_mlflow(local_stack: LocalStack, page: Page):
    from prefect.client.schemas.actions import DeploymentUpdate

    recipe = small_recipe(local_stack.state_dir / "runs", "name=ui-form")
    with local_stack.prefect() as client:
        deployment = client.read_deployment_by_name("finetune/finetune-manual")
        client.update_deployment(deployment.id, DeploymentUpdate(parameters={"recipe": recipe}))

    # Prefect UI: Deployments -> finetune-manual -> Run -> Custom run
    page.goto(local_stack.prefect_url)
    page.get_by_role("link", name="Deployments", exact=True).first.click()
    page.get_by_role("link", name="finetune-manual", exact=True).click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()

    # The form starts from the deployment's parameters: the small recipe. Submit it as it is.
    expect(page.get_by_label("Max Train Samples")).to_have_value("200")
    create_url = f"{local_stack.api_url}/deployments/{deployment.id}/create_flow_run"
    with page.expect_response(create_url) as created:
        page.get_by_role("button", name="Submit").click()
    assert created.value.status == 201, created.value.text()
    flow_run_id = created.value.json()["id"]
    assert created.value.json()["parameters"]["recipe"]["data"]["max_train_samples"] == 200

    # The new run is linked from the deployment page (and its toast): open it, wait until it is Completed.
    page.locator(f'a[href$="/runs/flow-run/{flow_run_id}"]').first.click()
    page.wait_for_url(f"**/runs/flow-run/{flow_run_id}**")
    flow_run = local_stack.wait_for_flow_run(flow_run_id, timeout=600)
    assert flow_run.state.is_completed(), local_stack.explain(flow_run)
    page.reload()
    expect(page.get_by_text("finetune ui-form on builtin:tiny-smolvlm").first).to_be_visible()
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()

    # MLflow UI: the registry lists the model; on its page, this run's version carries the alias `candidate`.
    version = local_stack.registered_version(flow_run_id)
    # MLflow announces its new registry UI in a dialog over the page, once per browser profile.
    page.add_locator_handler(
        page.get_by_role("dialog").filter(has_text="new Model Registry UI"),
        lambda dialog: dialog.get_by_role("button", name="Close").click(),
    )
    page.goto(f"{local_stack.mlflow_url}/#/models")
    page.get_by_role("link", name=MODEL, exact=True).click()
    page.wait_for_url(f"**/#/models/{MODEL}")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
    expect(row).to_contain_text("candidate")
