"""The web application in a real headless Chromium, against `shelver serve` run as a process.

Needs Debian's ``chromium`` and ``chromium-driver``; without them these tests are skipped
with that reason (``make test`` lists it), except where SHELVER_REQUIRE_BROWSER=1 (CI's
.ci/run installs them and sets it), where their absence fails the run. The tests also
take screenshots of the review, audit and dashboard pages: into a temporary folder, or
into $SHELVER_SCREENSHOTS_DIR when set (`make screenshots` refreshes docs/screenshots/),
so an ordinary test run leaves the work tree clean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text
from support import free_port
from web_seed import PASSWORD, Judged, add_user_by_cli, champion, judged

CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(
    os.environ.get("SHELVER_SCREENSHOTS_DIR") or Path(tempfile.gettempdir()) / "shelver-screenshots"
)
MISSING = (
    "browser tests skipped: Debian's chromium and chromium-driver are not installed "
    "(apt-get install -y chromium chromium-driver)"
)

if not (shutil.which("chromium") and CHROMEDRIVER.exists()):
    if os.environ.get("SHELVER_REQUIRE_BROWSER") == "1":
        raise RuntimeError(MISSING.replace("skipped", "required (SHELVER_REQUIRE_BROWSER=1)"))
    pytest.skip(MISSING, allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once chromium is known to be there
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A few product pictures inside the image root the server is given."""
    from PIL import Image, ImageDraw

    root = tmp_path / "images"
    root.mkdir()
    for name, colour in [
        ("red", (205, 60, 50)),
        ("blue", (40, 90, 200)),
        ("green", (50, 150, 80)),
        ("amber", (230, 160, 30)),
        ("grey", (120, 120, 130)),
    ]:
        image = Image.new("RGB", (240, 240), (245, 245, 245))
        draw = ImageDraw.Draw(image)
        draw.rounded_rectangle((40, 30, 200, 210), radius=24, fill=colour)
        draw.ellipse((95, 160, 145, 200), fill=(255, 255, 255))
        image.save(root / f"{name}.png")
    return root


@pytest.fixture
def server(engine: Engine, database_url: str, images: Path) -> Iterator[str]:
    """`shelver serve` as a real process on a free port, with a reviewer created by the CLI."""
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_AUDIT_RATE": "1.0",
        "SHELVER_AUDIT_RATE_NEW_MODEL": "1.0",
        "SHELVER_TARGET_PRECISION": "0.9",
        "SHELVER_IMAGE_ROOTS": f'["{images}"]',
    }
    added = add_user_by_cli(env, "rita", "reviewer")
    assert added.returncode == 0, added.stderr
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shelver.worker",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/login", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "shelver serve did not answer within 30 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(browser: webdriver.Chrome, url: str, path: str = "/review") -> None:
    browser.get(url + path)
    assert "/login" in browser.current_url
    browser.find_element(By.NAME, "name").send_keys("rita")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 10).until(lambda b: path in b.current_url)


def press(browser: webdriver.Chrome, key: str) -> None:
    """A key press on whatever has focus, as a person would type it."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).send_keys(key).perform()


def first_item(browser: webdriver.Chrome) -> str | None:
    """The id of the first product on the page (None while a new page is loading)."""
    try:
        return browser.execute_script(
            "const item = document.querySelector('.item'); return item && item.dataset.productId"
        )
    except StaleElementReferenceException:
        return None


def screenshot(browser: webdriver.Chrome, name: str) -> None:
    """The whole page, once its images have loaded, as NAME.png in SCREENSHOTS."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": min(height, 2400), "deviceScaleFactor": 1, "mobile": False},
    )
    WebDriverWait(browser, 10).until(
        lambda b: b.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


WAITING = [
    Judged(
        "bb-1001",
        "Yamaha acoustic guitar strings, light gauge",
        "Musical Instruments",
        0.34,
        description="Phosphor bronze strings for steel-string acoustic guitars.",
        image_uri="amber.png",
        top_k=[("Musical Instruments", 0.34), ("Appliances", 0.22), ("Cell Phones", 0.11)],
    ),
    Judged(
        "bb-1002",
        "Slim protective case for Galaxy S24",
        "Cell Phones",
        0.41,
        description="Shock-absorbing TPU case with raised edges.",
        image_uri="blue.png",
        top_k=[("Cell Phones", 0.41), ("Video Games", 0.25), ("Appliances", 0.12)],
    ),
    Judged(
        "bb-1003",
        "Stainless steel countertop blender",
        "Appliances",
        0.47,
        description="1200 W motor, 6 speeds, 64 oz jar.",
        image_uri="grey.png",
        top_k=[("Appliances", 0.47), ("Musical Instruments", 0.18), ("Cell Phones", 0.1)],
    ),
    Judged(
        "bb-1004",
        "Wireless controller, midnight black",
        "Video Games",
        0.52,
        description="Bluetooth game controller with haptic feedback.",
        image_uri="red.png",
        top_k=[("Video Games", 0.52), ("Cell Phones", 0.31), ("Appliances", 0.05)],
    ),
    Judged(
        "bb-1005",
        "Digital piano with weighted keys",
        "Musical Instruments",
        0.55,
        description="88 keys, 128-note polyphony, headphone output.",
        image_uri="green.png",
        top_k=[("Musical Instruments", 0.55), ("Appliances", 0.2), ("Video Games", 0.1)],
    ),
]


def seed(engine: Engine, images: Path, extra: list[Judged] = ()) -> dict[str, int]:
    model = champion(engine, "v7", threshold=0.8)
    rows = [
        replace(row, image_uri=str(images / row.image_uri)) if row.image_uri else row
        for row in [*WAITING, *extra]
    ]
    return judged(engine, model, rows)


def test_review_three_products_with_the_keyboard(
    browser: webdriver.Chrome, server: str, engine: Engine, images: Path
) -> None:
    ids = seed(engine, images)
    sign_in(browser, server)
    screenshot(browser, "review")
    reviewed = []
    for _ in range(3):
        shown = first_item(browser)
        reviewed.append(int(shown))
        press(browser, "1")  # accept the focused product's first suggestion
        WebDriverWait(browser, 10).until(lambda b, shown=shown: first_item(b) not in (shown, None))
    assert reviewed == [ids["bb-1001"], ids["bb-1002"], ids["bb-1003"]]
    page = browser.page_source
    for sku in ("bb-1001", "bb-1002", "bb-1003"):
        assert f'data-product-id="{ids[sku]}"' not in page
    assert browser.find_element(By.ID, "waiting").text == "2"
    with engine.connect() as conn:
        labels = conn.execute(
            text(
                """
                SELECT p.sku, c.name, p.label_source, u.name, p.status
                FROM products p JOIN categories c ON c.id = p.label_id
                JOIN users u ON u.id = p.labeled_by ORDER BY p.sku
                """
            )
        ).all()
    assert [tuple(r) for r in labels] == [
        ("bb-1001", "Musical Instruments", "review", "rita", "classified"),
        ("bb-1002", "Cell Phones", "review", "rita", "classified"),
        ("bb-1003", "Appliances", "review", "rita", "classified"),
    ]


def test_audit_one_product_and_see_precision_move(
    browser: webdriver.Chrome, server: str, engine: Engine, images: Path
) -> None:
    automatic = [
        Judged(
            "bb-2001",
            "4K OLED television, 55 inch",
            "Video Games",
            0.91,
            status="classified",
            description="Self-lit pixels, 120 Hz.",
            image_uri="grey.png",
            top_k=[("Video Games", 0.91), ("Appliances", 0.05)],
        ),
        Judged(
            "bb-2002",
            "Drum sticks, hickory 5A",
            "Musical Instruments",
            0.96,
            status="classified",
            image_uri="amber.png",
        ),
    ]
    seed(engine, images, automatic)
    sign_in(browser, server, "/audit")
    assert browser.find_elements(By.ID, "no-audits")
    # The television is not a video game: correct the model with the type-ahead.
    item = next(
        i for i in browser.find_elements(By.CSS_SELECTOR, ".item") if "television" in i.text
    )
    field = item.find_element(By.CSS_SELECTOR, "form.other input[name=category]")
    field.send_keys("Applia")
    WebDriverWait(browser, 5).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#category-options option[value=Appliances]")
    )
    field.send_keys("nces")
    item.find_element(By.CSS_SELECTOR, "form.other button").click()
    WebDriverWait(browser, 10).until(lambda b: "msg=audited" in b.current_url)
    row = browser.find_element(By.CSS_SELECTOR, '#precision tr[data-category="Video Games"]')
    assert "0.0%" in row.text and "under target" in row.text
    screenshot(browser, "audit")
    with engine.connect() as conn:
        audit = conn.execute(
            text("SELECT c.name, a.correct FROM audits a JOIN categories c ON c.id = a.verdict_id")
        ).one()
    assert tuple(audit) == ("Appliances", False)
    browser.get(server + "/dashboard")
    assert browser.find_element(By.ID, "champion").text.startswith("v7")
    screenshot(browser, "dashboard")


def test_unauthenticated_request_goes_to_sign_in(browser: webdriver.Chrome, server: str) -> None:
    browser.get(server + "/dashboard")
    assert "/login" in browser.current_url
    # The sign-in form's random CSRF token may itself contain "v7" (CI, 2026-12-07).
    token = browser.find_element(By.NAME, "csrf_token").get_attribute("value")
    assert "Dashboard" not in browser.title and "v7" not in browser.page_source.replace(token, "")


def test_forged_csrf_token_fails_safely(
    browser: webdriver.Chrome, server: str, engine: Engine, images: Path
) -> None:
    seed(engine, images)
    sign_in(browser, server)
    browser.execute_script(
        "document.querySelectorAll('input[name=csrf_token]').forEach(i => i.value = 'forged')"
    )
    press(browser, "1")
    error = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "error"))
    assert "security token" in error.text
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM products WHERE label_id IS NOT NULL")).scalar()
            == 0
        )


def test_a_product_named_script_is_shown_as_text(
    browser: webdriver.Chrome, server: str, engine: Engine, images: Path
) -> None:
    hostile = "<script>document.title='owned'</script>"
    seed(
        engine,
        images,
        [
            Judged(
                "evil",
                hostile,
                "Appliances",
                0.01,
                description="<img src=x onerror=\"document.title='owned'\">",
            )
        ],
    )
    sign_in(browser, server)
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".item .name")]
    assert hostile in names
    assert browser.title != "owned"
    assert not browser.find_elements(By.CSS_SELECTOR, ".item .description img")
