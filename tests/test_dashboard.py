"""The dashboard as a person sees it: headless Chromium against a coordinator with two live
workers; the page asks for the token, its charts fill with data, no console errors, and
the screenshot shows the experts and charts."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageStat

from fedmoe.demo_data import write_demo_datasets
from fedmoe.procs import start_worker, stop

pytestmark = pytest.mark.heavy(12)  # run early (tests/conftest.py)


TOKEN = "dashboard-admin-token-0123456789"
DOMAINS = ("python_expert", "sql_expert")
CHROMIUM = "/usr/bin/chromium"
# Chromium as root, offline: no sandbox, no background calls to the internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard.png"


@pytest.fixture(scope="module")
def federation(module_coordinator_factory, tmp_path_factory):
    """A coordinator (token auth) and two workers that evaluate after every sync."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    root = tmp_path_factory.mktemp("dashboard")
    data = write_demo_datasets(root / "data", train_count=40, validation_count=8)
    live = module_coordinator_factory(auth_token=TOKEN)
    workers = []
    try:
        for index, domain in enumerate(DOMAINS, start=1):
            train, validation = data[domain]
            workers.append(
                start_worker(
                    live.url,
                    f"Worker-{index}-{domain}",
                    domain,
                    train,
                    root / f"w{index}.log",
                    *("--eval-dataset", str(validation), "--auth-token", TOKEN),
                    *("--sync-interval", "1", "--eval-every", "1", "--eval-max-examples", "4"),
                    # live until the module ends, at a quarter of the CPU: only their
                    # updates and evaluations are on show
                    *("--batch-size", "4", "--max-seconds", "60", "--slowdown", "4"),
                )
            )
        with live.client() as client:
            _wait_for_evaluations(client, workers, root)
            # one refused upload (a registered worker's) for the rejections table
            client.post(
                "/v1/experts/python_expert/updates",
                content=b"not safetensors",
                headers={
                    "X-FedMoE-Worker-Id": "Worker-1-python_expert",
                    "X-FedMoE-Update-Id": "bad-1",
                    "X-FedMoE-Base-Version": "0",
                },
            )
        yield live
    finally:
        for process in workers:  # both stop (final upload and evaluation) at once
            process.terminate()
        for process in workers:
            stop(process)


def _wait_for_evaluations(client: httpx.Client, workers, root: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in workers:
            assert process.poll() is None, [p.read_text()[-2000:] for p in root.glob("w*.log")]
        rows = client.get("/v1/metrics/history").json()
        if {(r["expert"], r["kind"]) for r in rows} >= {
            (d, k) for d in DOMAINS for k in ("expert", "gateway")
        }:
            return
        time.sleep(0.5)
    raise AssertionError("no federated evaluation from both workers in time")


def test_dashboard_shows_live_federation_in_a_real_browser(federation) -> None:
    from playwright.sync_api import expect, sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(federation.url + "/")  # redirects to /ui/
            assert page.url.endswith("/ui/")
            page.wait_for_selector("#login:not([hidden])")
            page.fill("#token", TOKEN)
            page.click("#login button[type=submit]")
            for domain in DOMAINS:  # charts with train loss and both evaluation series
                chart = f'#charts .chart[data-expert="{domain}"]'
                page.wait_for_selector(f"{chart} path.train", timeout=30000)
                page.wait_for_selector(f"{chart} circle.expert", timeout=30000)
                page.wait_for_selector(f"{chart} circle.gateway", timeout=30000)
            # (locator assertions, not wait_for_function: the page's CSP forbids eval)
            expect(page.locator("#workers tbody tr")).to_have_count(2)
            expect(page.locator("#rejections")).to_contain_text("invalid_update")
            first = page.text_content("#summary")
            stamp = page.text_content("#refreshed")
            expect(page.locator("#refreshed")).not_to_have_text(stamp, timeout=10000)  # refreshes
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            experts_text = page.text_content("#experts")
            workers_text = page.text_content("#workers")
            rejections_text = page.text_content("#rejections")
            charts = page.eval_on_selector_all("#charts .chart", "els => els.length")
            bars = page.eval_on_selector_all("#staleness rect.bar", "els => els.length")
        finally:
            browser.close()
    assert problems == [], problems
    assert first.startswith("3 experts")
    assert charts == 3
    assert bars == 21
    for domain in (*DOMAINS, "docs_expert"):
        assert domain in experts_text
    assert "Worker-1-python_expert" in workers_text and "Worker-2-sql_expert" in workers_text
    assert "invalid_update" in rejections_text

    image = Image.open(SCREENSHOT).convert("RGB")
    assert image.width >= 1400 and image.height >= 1000
    stats = ImageStat.Stat(image)
    assert min(stats.stddev) > 10, stats.stddev  # not a blank page
    # the chart colours are on screen: the expert (orange) and gateway (blue) series
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}
    assert (217, 72, 15) in colours and (24, 100, 171) in colours


def test_static_files_are_open_and_data_needs_the_token(federation) -> None:
    with httpx.Client(base_url=federation.url) as anonymous:
        page = anonymous.get("/ui/")
        assert page.status_code == 200 and "dashboard.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert anonymous.get("/ui/dashboard.js").status_code == 200
        assert anonymous.get("/ui/auth.json").json() == {"token_required": True}
        assert anonymous.get("/ui/..%2Fmetrics.py").status_code == 404
        assert anonymous.get("/v1/metrics/history").status_code == 401
        assert anonymous.get("/v1/metrics/updates").status_code == 401
