"""Catalog states the web tests and the review-page benchmark start from: products the model
has already judged (waiting for review or auto-accepted), with their prediction history."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

import httpx
from sqlalchemy import Engine, text

from shelver.catalog.categories import category_ids, ensure_categories

PASSWORD = "a long enough passphrase"


@dataclass
class Judged:
    sku: str
    name: str
    predicted: str
    confidence: float
    status: str = "needs_review"
    description: str = ""
    image_uri: str | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)


def champion(engine: Engine, version: str = "v-test", threshold: float = 0.6) -> int:
    """A champion row for products to point at; its artifact is never loaded by these tests."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET status = 'retired' WHERE status = 'champion'"))
        return conn.execute(
            text(
                """
                INSERT INTO model_versions
                    (version, status, artifact, sha256, labels, encoders, metrics, threshold,
                     promoted_at)
                VALUES (:v, 'champion', 'x', 'x', '[]', '{}', :m, :t, now())
                RETURNING id
                """
            ),
            {"v": version, "t": threshold, "m": json.dumps({"test": {"macro_f1": 0.9}})},
        ).scalar_one()


def judged(engine: Engine, model_id: int, products: list[Judged]) -> dict[str, int]:
    """Insert products as if the worker had classified them; sku -> product id."""
    with engine.begin() as conn:
        names = {p.predicted for p in products} | {c for p in products for c, _ in p.top_k}
        ensure_categories(conn, names)
        ids = category_ids(conn, names)
        rows = conn.execute(
            text(
                """
                INSERT INTO products (sku, name, description, image_uri)
                SELECT * FROM unnest(CAST(:skus AS text[]), CAST(:names AS text[]),
                                     CAST(:descriptions AS text[]), CAST(:images AS text[]))
                RETURNING sku, id
                """
            ),
            {
                "skus": [p.sku for p in products],
                "names": [p.name for p in products],
                "descriptions": [p.description for p in products],
                "images": [p.image_uri for p in products],
            },
        ).all()
        product_ids = dict(rows)
        conn.execute(
            text("DELETE FROM classification_queue WHERE product_id = ANY(:ids)"),
            {"ids": list(product_ids.values())},
        )
        for p in products:
            top_k = p.top_k or [(p.predicted, p.confidence)]
            params = {
                "id": product_ids[p.sku],
                "model": model_id,
                "predicted": ids[p.predicted],
                "confidence": p.confidence,
                "status": p.status,
                "top_k": json.dumps([{"category": c, "p": q} for c, q in top_k]),
            }
            conn.execute(
                text(
                    """
                    UPDATE products SET predicted_id = :predicted, confidence = :confidence,
                        model_version_id = :model, status = :status,
                        classified_at = clock_timestamp()
                    WHERE id = :id
                    """
                ),
                params,
            )
            conn.execute(
                text(
                    """
                    INSERT INTO predictions (product_id, model_version_id, content_hash,
                                             predicted_id, confidence, top_k)
                    SELECT id, :model, content_hash, :predicted, :confidence,
                           CAST(:top_k AS jsonb)
                    FROM products WHERE id = :id
                    """
                ),
                params,
            )
    return product_ids


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no CSRF token"
    return match.group(1)


def sign_in(client: httpx.Client, name: str, password: str = PASSWORD) -> httpx.Response:
    form = client.get("/login")
    return client.post(
        "/login",
        data={"name": name, "password": password, "csrf_token": csrf_of(form.text)},
    )


def add_user_by_cli(
    env: dict[str, str], name: str, role: str, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    """`shelver users add NAME --role ROLE` as a real process, the password on its stdin."""
    return subprocess.run(
        [sys.executable, "-m", "shelver.worker", "users", "add", name, "--role", role],
        input=password + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
