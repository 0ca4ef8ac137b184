"""The web dashboard in a real browser: Debian's chromium driven by Playwright (never a downloaded
browser), against a platform of its own. Screenshots go to `$GF_SCREENSHOTS_DIR` (CI keeps them as
artifacts), else to the test's temp dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from sdk.local import LocalStack
from tests.conftest import running_stack

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
#: The worker has to start (torch imports) and register on a loaded machine.
WORKER_APPEARS_MS = 90_000
JOB_MS = 30_000
#: An image job loads its (tiny) model first.
IMAGE_JOB_MS = 60_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture(scope="module")
async def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """A platform the module's tests share: each starts the worker it needs unless one is there."""
    async with running_stack(tmp_path_factory.mktemp("dashboard"), []) as stack:
        yield stack


@pytest.fixture
async def bare_stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    """A platform of the test's own where no worker has registered yet, whatever ran before."""
    async with running_stack(tmp_path / "dashboard", []) as stack:
        yield stack


@pytest.fixture
async def page(shared_stack: LocalStack, browser: Browser) -> AsyncIterator[Page]:
    """A tab on the shared platform, signed in with the operator's key."""
    async with signed_in_tab(shared_stack, browser) as tab:
        yield tab


@pytest.fixture
async def bare_page(bare_stack: LocalStack, browser: Browser) -> AsyncIterator[Page]:
    """A tab on the test's own bare platform, signed in with the operator's key."""
    async with signed_in_tab(bare_stack, browser) as tab:
        yield tab


@asynccontextmanager
async def signed_in_tab(stack: LocalStack, browser: Browser) -> AsyncIterator[Page]:
    tab = await browser.new_page(viewport={"width": 1280, "height": 900})
    assert stack.operator_key
    await sign_in(tab, stack.http_url, stack.operator_key)
    try:
        yield tab
    finally:
        await tab.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("GF_SCREENSHOTS_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def sign_in(page: Page, base_url: str, api_key: str) -> None:
    await page.goto(f"{base_url}/dashboard")
    await page.fill("#api-key", api_key)
    await page.click("#signin-form button")
    await expect(page.locator("#live")).to_have_text("live")


async def ensure_worker(stack: LocalStack, page: Page, name: str, region: str, *flags: str) -> None:
    """The worker `name` online on the page (started with `flags` unless an earlier test did)."""
    if f"worker-{name}" not in stack.children:
        stack.start_worker(name, region, *flags)
    await expect(page.locator("#workers tr", has_text=name)).to_contain_text("online", timeout=WORKER_APPEARS_MS)


async def test_sign_in_see_a_worker_appear_run_a_job_and_open_its_history(
    bare_stack: LocalStack, bare_page: Page, shots: Path
) -> None:
    await expect(bare_page.locator("#workers")).to_contain_text("No worker has registered yet.")

    # A worker starts: it shows up live, in its region, online.
    bare_stack.start_worker("dash", region="eu-dash")
    row = bare_page.locator("#workers tr", has_text="dash")
    await expect(row).to_contain_text("online", timeout=WORKER_APPEARS_MS)
    await expect(bare_page.locator("#workers .region h3")).to_have_text(["Region eu-dash"])

    # A job, submitted from the page, goes from queued to completed without a reload.
    await bare_page.select_option("#submit-type", "echo")
    await bare_page.fill("#submit-params", '{"greeting": "hello from the dashboard"}')
    await bare_page.click("#submit-form button")
    job_row = bare_page.locator("#jobs tbody tr").first
    await expect(job_row.locator(".status")).to_have_text("completed", timeout=JOB_MS)
    await expect(job_row).to_contain_text("eu-dash")
    await bare_page.screenshot(path=shots / "dashboard-fleet.png", full_page=True)

    # Its page: parameters, result, and the history as a timeline.
    await job_row.locator("a").click()
    timeline = bare_page.locator("#job-timeline li")
    await expect(timeline.last).to_have_attribute("data-event", "job.completed", timeout=JOB_MS)
    events = [await item.get_attribute("data-event") for item in await timeline.all()]
    assert events == ["job.submitted", "job.assigned", "job.started", "job.completed"]
    await expect(bare_page.locator("#job-status")).to_have_text("completed")
    await expect(bare_page.locator("#job-params")).to_contain_text("hello from the dashboard")
    await expect(bare_page.locator("#job-result")).to_contain_text("hello from the dashboard")
    await expect(bare_page.locator("#job-cancel")).to_be_disabled()
    # Where it ran and why: the placement explanation, from the log once the job was placed.
    await expect(bare_page.locator("#placement-summary")).to_contain_text("completed; placed on worker ")
    await expect(bare_page.locator("#placement-summary")).to_contain_text("in region eu-dash")
    await bare_page.screenshot(path=shots / "dashboard-job.png", full_page=True)


async def test_an_image_jobs_page_shows_the_picture(
    shared_stack: LocalStack, page: Page, shots: Path, tiny_diffusion: Path
) -> None:
    await ensure_worker(shared_stack, page, "dash", "eu-dash")
    await page.select_option("#submit-type", "image")
    await page.fill("#submit-model", str(tiny_diffusion))
    await page.fill("#submit-params", '{"prompt": "a red square", "width": 64, "height": 80, "steps": 2, "seed": 3}')
    await page.click("#submit-form button")
    job_row = page.locator("#jobs tbody tr").first
    await expect(job_row).to_contain_text("image")
    await expect(job_row.locator(".status")).to_have_text("completed", timeout=IMAGE_JOB_MS)
    await job_row.locator("a").click()
    picture = page.locator("#job-result img")
    await expect(picture).to_be_visible(timeout=JOB_MS)
    # The PNG the worker made, fetched with the token and decoded by the browser at the asked size.
    size = await picture.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    assert size == [64, 80]
    await expect(page.locator("#placement-summary")).to_contain_text("in region eu-dash")
    await page.screenshot(path=shots / "dashboard-image-job.png", full_page=True)


async def test_cancel_a_running_job_and_manage_keys_and_enrollment(
    shared_stack: LocalStack, page: Page, shots: Path
) -> None:
    # Echo only: the image test's job, whenever it runs, has `dash` as the one worker that can take it.
    await ensure_worker(shared_stack, page, "slow", "local", "--engines", "echo")

    await page.fill("#submit-params", '{"sleep_s": 60}')
    await page.click("#submit-form button")
    job_row = page.locator("#jobs tbody tr").first
    await expect(job_row.locator(".status")).to_have_text("running", timeout=JOB_MS)
    await job_row.locator("a").click()
    await expect(page.locator("#job-cancel")).to_be_enabled()
    await page.click("#job-cancel")
    await expect(page.locator("#job-status")).to_have_text("cancelled", timeout=JOB_MS)
    await expect(page.locator("#job-timeline li").last).to_have_attribute("data-event", "job.cancelled")

    # The operator's page: a new client key (shown once, then listed) and an enrollment token.
    await page.click("#nav-admin")
    await page.fill("#key-name", "dash-client")
    await page.click("#key-form button")
    await expect(page.locator("#key-created")).to_contain_text("New client key (shown once): ")
    await expect(page.locator("#keys tbody tr", has_text="dash-client")).to_contain_text("client")
    await page.click("#enroll-form button")
    await expect(page.locator("#enroll-token")).to_contain_text("Enrollment token (one use): ")
    client_key = (await page.locator("#key-created").inner_text()).rsplit(" ", 1)[-1]
    await page.screenshot(path=shots / "dashboard-operator.png", full_page=True)

    # A client signs in: no workers, no operator page, and none of the operator's jobs.
    await page.click("#sign-out")
    await sign_in(page, shared_stack.http_url, client_key)
    await expect(page.locator("#workers-panel")).to_be_hidden()
    await expect(page.locator("#nav-admin")).to_be_hidden()
    await expect(page.locator("#jobs tbody tr")).to_have_count(0)
    await page.click("#submit-form button")
    await expect(page.locator("#jobs tbody tr .status")).to_have_text(["completed"], timeout=JOB_MS)
