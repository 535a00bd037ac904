"""Browser fixtures: the shared local stack and a headless Chromium page.

The browser is Debian's chromium (`apt-get install chromium`) driven by the `playwright`
package; no browser is downloaded. A failing browser test leaves a screenshot and the page's
HTML in its tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from local_stack import CHROMIUM, CHROMIUM_ARGS, LocalStack, shared_local_stack


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory, tiny_model_dir) -> Iterator[LocalStack]:
    """Prefect + MLflow servers, prefect.yaml deployed, a process worker: `make serve` on free ports.

    `tiny_model_dir` first: the worker's flow runs find the tiny model built in VLMOPS_CACHE_DIR.
    """
    yield from shared_local_stack(tmp_path_factory)


_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item, so the page fixture knows whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def page(request, tmp_path):
    """A page of headless Debian chromium (1400 x 1000); on failure its screenshot and HTML go to tmp_path."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # single-page apps on a busy 2-core machine: not the default 5 s
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
            report = request.node.stash.get(_REPORTS, {}).get("call")
            if report is not None and report.failed:
                try:
                    page.screenshot(path=tmp_path / "failure.png", full_page=True)
                    (tmp_path / "failure.html").write_text(page.content())
                    print(f"browser at failure: {page.url}; screenshot and HTML in {tmp_path}")
                except PlaywrightError as error:  # a crashed page: the test's own failure says more
                    print(f"no screenshot of {page.url}: {error}")
        finally:
            browser.close()
