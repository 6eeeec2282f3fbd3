"""The web application over HTTP, against a real PostgreSQL: who may do what, CSRF, sign-in
limits, session expiry, review verdicts, audits and live precision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from starlette.routing import Route
from starlette.testclient import TestClient
from web_seed import PASSWORD, Judged, add_user_by_cli, champion, csrf_of, judged, sign_in

from shelver.catalog.settings import Settings
from shelver.web import auth
from shelver.web.app import WebApp, create_app
from shelver.web.audit import wilson_interval


@pytest.fixture
def settings() -> Settings:
    return Settings(
        audit_rate=1.0, audit_rate_new_model=1.0, session_minutes=30, target_precision=0.9
    )


@pytest.fixture
def users(engine: Engine) -> dict[str, auth.User]:
    return {
        "rita": auth.add_user(engine, "rita", "reviewer", PASSWORD),
        "ada": auth.add_user(engine, "ada", "admin", PASSWORD),
    }


@pytest.fixture
def client(engine: Engine, settings: Settings, users: dict) -> TestClient:
    return TestClient(create_app(engine, settings), follow_redirects=False)


@pytest.fixture
def rita(client: TestClient) -> TestClient:
    assert sign_in(client, "rita").status_code == 303
    return client


def queue(engine: Engine) -> dict[str, int]:
    model = champion(engine)
    return judged(
        engine,
        model,
        [
            Judged(
                "s1",
                "Guitar strings",
                "Musical Instruments",
                0.31,
                top_k=[("Musical Instruments", 0.31), ("Appliances", 0.2)],
            ),
            Judged("s2", "Phone case", "Cell Phones", 0.45),
            Judged("s3", "Fridge", "Appliances", 0.40),
            Judged("s4", "Console", "Video Games", 0.97, status="classified"),
        ],
    )


def page_csrf(client: TestClient, path: str = "/review") -> str:
    return csrf_of(client.get(path).text)


def label_of(engine: Engine, sku: str) -> tuple:
    with engine.connect() as conn:
        return conn.execute(
            text(
                """
                SELECT c.name, p.label_source, u.name, p.labeled_at IS NOT NULL, p.status
                FROM products p LEFT JOIN categories c ON c.id = p.label_id
                LEFT JOIN users u ON u.id = p.labeled_by WHERE p.sku = :sku
                """
            ),
            {"sku": sku},
        ).one()


def test_every_route_but_sign_in_needs_a_session(engine: Engine, settings: Settings) -> None:
    web = WebApp(engine, settings)
    client = TestClient(create_app(engine, settings), follow_redirects=False)
    checked = 0
    for route in web.routes():
        if not isinstance(route, Route) or route.path == "/login":
            continue
        path = route.path.replace("{product_id}", "1").replace("{name}", "confusion")
        for method in route.methods - {"HEAD"}:
            response = client.request(method, path)
            if method == "GET":
                assert response.status_code == 303, path
                assert response.headers["location"].startswith("/login?next=")
            else:
                assert response.status_code == 401, path
            checked += 1
    assert checked >= 12


def test_wrong_password_is_refused_and_a_right_one_signs_in(client: TestClient) -> None:
    assert sign_in(client, "rita", "not the password").status_code == 401
    assert client.get("/review").status_code == 303
    assert sign_in(client, "rita").status_code == 303
    assert client.get("/review").status_code == 200


def test_sign_in_form_needs_its_csrf_cookie(client: TestClient) -> None:
    token = csrf_of(client.get("/login").text)
    client.cookies.clear()
    forged = client.post("/login", data={"name": "rita", "password": PASSWORD, "csrf_token": token})
    assert forged.status_code == 403
    assert "shelver_session" not in forged.cookies


def test_sign_in_is_rate_limited_per_name(client: TestClient, engine: Engine) -> None:
    for _ in range(auth.MAX_FAILURES_PER_NAME):
        assert sign_in(client, "rita", "guess").status_code == 401
    refused = sign_in(client, "rita")  # the right password, too late
    assert refused.status_code == 429
    assert "too many failed sign-ins" in refused.text
    assert int(refused.headers["retry-after"]) > 0
    # Another account from another address is not locked out by rita's attacker.
    assert sign_in(client, "ada").status_code == 303


def test_sign_in_is_rate_limited_per_client(client: TestClient) -> None:
    for i in range(auth.MAX_FAILURES_PER_CLIENT):
        assert sign_in(client, f"nobody{i}", "guess").status_code == 401
    assert sign_in(client, "ada").status_code == 429


def test_a_session_ends_when_it_expires(rita: TestClient, engine: Engine) -> None:
    assert rita.get("/review").status_code == 200
    with engine.begin() as conn:
        conn.execute(text("UPDATE web_sessions SET expires_at = now() - interval '1 second'"))
    response = rita.get("/review")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")


def test_session_minutes_sets_the_session_length(
    engine: Engine, users: dict, settings: Settings
) -> None:
    client = TestClient(
        create_app(engine, settings.model_copy(update={"session_minutes": 7})),
        follow_redirects=False,
    )
    sign_in(client, "rita")
    with engine.connect() as conn:
        minutes = conn.execute(
            text("SELECT extract(epoch FROM expires_at - created_at) / 60 FROM web_sessions")
        ).scalar_one()
    assert round(minutes) == 7


def test_signing_out_ends_the_session_server_side(rita: TestClient) -> None:
    cookie = rita.cookies["shelver_session"]
    assert rita.post("/logout", data={"csrf_token": page_csrf(rita)}).status_code == 303
    rita.cookies.set("shelver_session", cookie)  # a stolen copy of the cookie
    assert rita.get("/review").status_code == 303


def test_a_verdict_labels_the_product_as_review_with_who_and_when(
    rita: TestClient, engine: Engine
) -> None:
    ids = queue(engine)
    response = rita.post(
        "/review/verdict",
        data={"csrf_token": page_csrf(rita), "product_id": ids["s1"], "category": "Appliances"},
    )
    assert response.status_code == 303
    assert label_of(engine, "s1") == ("Appliances", "review", "rita", True, "classified")
    assert "Guitar strings" not in rita.get("/review").text


def test_a_forged_csrf_token_changes_nothing(rita: TestClient, engine: Engine) -> None:
    ids = queue(engine)
    for token in ("forged", ""):
        response = rita.post(
            "/review/verdict",
            data={"csrf_token": token, "product_id": ids["s1"], "category": "Appliances"},
        )
        assert response.status_code == 403
    assert label_of(engine, "s1")[:2] == (None, None)


def test_queue_is_least_confident_first_and_filters_by_category_and_batch(
    rita: TestClient, engine: Engine, tmp_path: Path
) -> None:
    from shelver.catalog.importer import import_file

    ids = queue(engine)
    page = rita.get("/review").text
    assert page.index("Guitar strings") < page.index("Fridge") < page.index("Phone case")
    assert "Console" not in page  # auto-accepted, not waiting

    with engine.connect() as conn:
        phones = conn.execute(text("SELECT id FROM categories WHERE name = 'Cell Phones'")).scalar()
    only_phones = rita.get(f"/review?category={phones}").text
    assert "Phone case" in only_phones and "Fridge" not in only_phones

    csv = tmp_path / "batch.csv"
    csv.write_text("id,name,description\ns2,Phone case,now with a strap\n")
    report = import_file(engine, csv)
    with engine.begin() as conn:  # as if the worker had judged the changed product again
        conn.execute(
            text("UPDATE products SET status = 'needs_review' WHERE id = :id"), {"id": ids["s2"]}
        )
    only_batch = rita.get(f"/review?batch={report.batch_id}").text
    assert "Phone case" in only_batch and "Fridge" not in only_batch


def test_bulk_accept_takes_each_top_suggestion_and_skips_products_already_reviewed(
    rita: TestClient, engine: Engine
) -> None:
    ids = queue(engine)
    token = page_csrf(rita)
    rita.post(
        "/review/verdict",
        data={"csrf_token": token, "product_id": ids["s2"], "category": "Appliances"},
    )
    response = rita.post(
        "/review/accept-page",
        data={
            "csrf_token": token,
            "accept": [f"{ids['s1']}|Musical Instruments", f"{ids['s2']}|Cell Phones"],
        },
    )
    assert response.status_code == 303 and "msg=taken" in response.headers["location"]
    assert label_of(engine, "s1")[:2] == ("Musical Instruments", "review")
    assert label_of(engine, "s2")[:2] == ("Appliances", "review")  # the first verdict stands


def test_an_unknown_category_saves_nothing(rita: TestClient, engine: Engine) -> None:
    ids = queue(engine)
    response = rita.post(
        "/review/verdict",
        data={"csrf_token": page_csrf(rita), "product_id": ids["s1"], "category": "Nonsense"},
    )
    assert response.status_code == 400 and "unknown category" in response.text
    assert label_of(engine, "s1")[0] is None


def test_product_text_is_escaped(rita: TestClient, engine: Engine) -> None:
    model = champion(engine)
    judged(
        engine,
        model,
        [
            Judged(
                "x1",
                "<script>alert(1)</script>",
                "Appliances",
                0.2,
                description='<img src=x onerror="alert(2)">',
            )
        ],
    )
    page = rita.get("/review")
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<img src=x" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_type_ahead_finds_categories_by_any_part_of_the_name(
    rita: TestClient, engine: Engine
) -> None:
    queue(engine)
    assert rita.get("/categories.json?q=phone").json() == ["Cell Phones"]
    assert rita.get("/categories.json?q=%25").json() == []  # LIKE wildcards are literal


def test_images_come_only_from_the_image_roots(
    engine: Engine, users: dict, settings: Settings, tmp_path: Path
) -> None:
    from PIL import Image

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "in.png")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(outside / "out.png")
    ids = judged(
        engine,
        champion(engine),
        [
            Judged("in", "Inside", "Appliances", 0.2, image_uri=str(root / "in.png")),
            Judged("out", "Outside", "Appliances", 0.2, image_uri=str(outside / "out.png")),
        ],
    )
    client = TestClient(
        create_app(engine, settings.model_copy(update={"image_roots": [root]})),
        follow_redirects=False,
    )
    sign_in(client, "rita")
    inside = client.get(f"/products/{ids['in']}/image")
    assert inside.status_code == 200 and inside.headers["content-type"] == "image/jpeg"
    assert client.get(f"/products/{ids['out']}/image").status_code == 404


def test_reviewers_cannot_promote_or_roll_back(rita: TestClient, engine: Engine) -> None:
    champion(engine, "v1")
    champion(engine, "v2")
    token = page_csrf(rita)
    assert rita.post("/models/rollback", data={"csrf_token": token}).status_code == 403
    assert (
        rita.post("/models/promote", data={"csrf_token": token, "version": "v1"}).status_code == 403
    )
    with engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT version FROM model_versions WHERE status = 'champion'")
            ).scalar()
            == "v2"
        )


def test_admins_promote_and_roll_back(client: TestClient, engine: Engine) -> None:
    champion(engine, "v1")
    with engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET status = 'candidate', promoted_at = NULL"))
    sign_in(client, "ada")
    token = page_csrf(client, "/dashboard")
    assert (
        client.post("/models/promote", data={"csrf_token": token, "version": "v1"}).status_code
        == 303
    )
    champion(engine, "v2")
    assert client.post("/models/rollback", data={"csrf_token": token}).status_code == 303
    with engine.connect() as conn:
        statuses = dict(conn.execute(text("SELECT version, status FROM model_versions")).all())
    assert statuses == {"v1": "champion", "v2": "rejected"}


def test_audit_rate_decides_which_auto_accepted_products_are_audited(
    engine: Engine, users: dict, settings: Settings
) -> None:
    model = champion(engine)
    judged(
        engine,
        model,
        [Judged(f"a{i}", f"Auto {i}", "Appliances", 0.95, status="classified") for i in range(200)],
    )

    def pending(rate: float, new_model_rate: float = 0.5) -> int:
        rates = {"audit_rate": rate, "audit_rate_new_model": new_model_rate}
        client = TestClient(create_app(engine, settings.model_copy(update=rates)))
        sign_in(client, "rita")
        return int(client.get("/audit").text.split('id="pending">')[1].split("<")[0])

    # A champion promoted today is new: SHELVER_AUDIT_RATE_NEW_MODEL applies.
    assert pending(0.0, new_model_rate=1.0) == 200
    assert pending(1.0, new_model_rate=0.0) == 0
    # Once it has served SHELVER_AUDIT_NEW_MODEL_DAYS, SHELVER_AUDIT_RATE does.
    with engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET promoted_at = now() - interval '8 days'"))
    assert pending(0.0) == 0
    assert 5 <= pending(0.1) <= 40
    assert pending(1.0) == 200


def test_an_audit_is_a_label_and_moves_live_precision(rita: TestClient, engine: Engine) -> None:
    ids = queue(engine)
    model_id = champion_id(engine)
    assert 'id="no-audits"' in rita.get("/audit").text
    response = rita.post(
        "/audit/verdict",
        data={
            "csrf_token": page_csrf(rita, "/audit"),
            "product_id": ids["s4"],
            "model_version_id": model_id,
            "category": "Appliances",
        },
    )
    assert response.status_code == 303
    assert label_of(engine, "s4")[:3] == ("Appliances", "review", "rita")
    page = rita.get("/audit").text
    assert "Console" not in page.split('id="precision"')[1].split("</table>")[1]
    assert "0.0%" in page and "under target" in page
    with engine.connect() as conn:
        assert conn.execute(text("SELECT correct FROM audits")).scalar_one() is False
    # Audited once: a second verdict on the same decision is refused.
    again = rita.post(
        "/audit/verdict",
        data={
            "csrf_token": page_csrf(rita, "/audit"),
            "product_id": ids["s4"],
            "model_version_id": model_id,
            "category": "Video Games",
        },
    )
    assert again.status_code == 409


def champion_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT id FROM model_versions WHERE status = 'champion'")
        ).scalar()


def test_wilson_interval_brackets_the_estimate() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 1)
    assert low == 0.0 and 0.7 < high < 0.85
    low, high = wilson_interval(95, 100)
    assert 0.88 < low < 0.95 < high < 0.98


def test_dashboard_shows_status_queue_and_registry(rita: TestClient, engine: Engine) -> None:
    queue(engine)
    page = rita.get("/dashboard").text
    assert 'id="last-hour">4<' in page
    assert "v-test" in page and "macro f1" in page
    # Reviewers see no admin buttons.
    assert 'action="/models/promote"' not in page and 'action="/models/rollback"' not in page


def test_users_cannot_be_duplicated_or_given_unknown_roles(engine: Engine, users: dict) -> None:
    with pytest.raises(auth.UserError, match="already exists"):
        auth.add_user(engine, "rita", "reviewer", PASSWORD)
    with pytest.raises(auth.UserError, match="role must be"):
        auth.add_user(engine, "bob", "owner", PASSWORD)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT password_hash FROM users WHERE name = 'rita'")).scalar()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_users_add_takes_the_password_from_stdin_never_argv(
    engine: Engine, database_url: str
) -> None:
    env = {**os.environ, "SHELVER_DATABASE_URL": database_url}
    done = add_user_by_cli(env, "eve", "admin")
    assert done.returncode == 0, done.stderr
    assert "added eve (admin)" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr
    assert auth.sign_in(engine, "eve", PASSWORD, "test", 5) is not None
    short = subprocess.run(
        [sys.executable, "-m", "shelver.worker", "users", "add", "mallory"],
        input="short\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert short.returncode == 2 and "at least 8 characters" in short.stderr


def test_only_labels_people_gave_train(rita: TestClient, engine: Engine) -> None:
    from shelver.training.dataset import labeled_products

    ids = queue(engine)  # s1-s3 wait for review, s4 was auto-accepted by the model
    token = page_csrf(rita)
    rita.post(
        "/review/verdict",
        data={"csrf_token": token, "product_id": ids["s1"], "category": "Appliances"},
    )
    rita.post(
        "/audit/verdict",
        data={
            "csrf_token": page_csrf(rita, "/audit"),
            "product_id": ids["s4"],
            "model_version_id": champion_id(engine),
            "category": "Video Games",
        },
    )
    trained_on = {product.name: label for product, label in labeled_products(engine)}
    # The review and the audit confirmation train; the model's own predictions never do.
    assert trained_on == {"Guitar strings": "Appliances", "Console": "Video Games"}


def test_demo_site_serves_and_signs_in_its_admin_then_stops(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    import os

    import httpx

    from shelver.web.demo import demo_site

    env = {**os.environ, "SHELVER_DATABASE_URL": database_url}
    with (
        demo_site(engine, env, tmp_path / "web.log") as site,
        httpx.Client(base_url=site.url, follow_redirects=False) as client,
    ):
        assert sign_in(client, site.user, site.password).status_code == 303
        assert client.get("/dashboard").status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(site.url + "login", timeout=2)


def test_an_oversized_form_is_refused_before_it_is_read(rita: TestClient) -> None:
    response = rita.post(
        "/review/verdict", data={"csrf_token": page_csrf(rita), "category": "x" * 2_000_000}
    )
    assert response.status_code == 413


def test_suggestions_and_verdicts_name_categories_by_their_path(
    rita: TestClient, engine: Engine
) -> None:
    ids = judged(
        engine,
        champion(engine),
        [
            Judged(
                "t1",
                "USB-C charger",
                "Cell Phones > Accessories",
                0.3,
                top_k=[("Cell Phones > Accessories", 0.3), ("Audio > Accessories", 0.25)],
            ),
        ],
    )
    page = rita.get("/review").text
    assert "Cell Phones &gt; Accessories" in page and "Audio &gt; Accessories" in page
    # Bulk accept names the predicted category by its path too ("Accessories" is ambiguous).
    assert f'value="{ids["t1"]}|Cell Phones &gt; Accessories"' in page
    rita.post(
        "/review/verdict",
        data={
            "csrf_token": page_csrf(rita),
            "product_id": ids["t1"],
            "category": "Audio > Accessories",
        },
    )
    with engine.connect() as conn:
        label = conn.execute(
            text("SELECT c.path FROM products p JOIN categories c ON c.id = p.label_id")
        ).scalar_one()
    assert label == "Audio > Accessories"
    assert rita.get("/categories.json?q=access").json() == [
        "Audio > Accessories",
        "Cell Phones > Accessories",
    ]


def test_dashboard_counts_failures_by_reason_and_shows_the_champions_report(
    rita: TestClient, engine: Engine, tmp_path: Path
) -> None:
    from PIL import Image

    ids = queue(engine)
    Image.new("RGB", (40, 30), (10, 120, 200)).save(tmp_path / "confusion_matrix.png")
    (tmp_path / "secret.txt").write_text("not for the browser")
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE products SET status = 'failed', error = :e WHERE id = ANY(:ids)"),
            {"e": "no usable text or image: empty name", "ids": [ids["s1"], ids["s2"]]},
        )
        conn.execute(
            text("UPDATE products SET error = :e WHERE id = :id"),
            {"e": "image not used: outside_root: /etc/passwd is outside", "id": ids["s4"]},
        )
        run = conn.execute(
            text("INSERT INTO training_runs (report_dir) VALUES (:d) RETURNING id"),
            {"d": str(tmp_path)},
        ).scalar_one()
        conn.execute(text("UPDATE model_versions SET training_run_id = :r"), {"r": run})
    page = rita.get("/dashboard").text
    assert "<td>failed</td><td>no usable text or image</td><td>2</td>" in page
    assert "<td>classified</td><td>image not used: outside_root</td><td>1</td>" in page
    assert 'src="/dashboard/report/confusion.png"' in page
    assert "reliability.png" not in page  # not written by this run: not offered
    image = rita.get("/dashboard/report/confusion.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert rita.get("/dashboard/report/secret.png").status_code == 404
    assert rita.get("/dashboard/report/reliability.png").status_code == 404


def test_only_the_champions_decisions_are_audited(rita: TestClient, engine: Engine) -> None:
    old = champion(engine, "v-old")
    judged(engine, old, [Judged("o1", "Old decision", "Appliances", 0.99, status="classified")])
    new = champion(engine, "v-new")
    judged(engine, new, [Judged("n1", "New decision", "Appliances", 0.99, status="classified")])
    page = rita.get("/audit").text
    assert "New decision" in page and "Old decision" not in page
