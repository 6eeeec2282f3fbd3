"""What the dashboard shows: the catalog's state, the last hour's work, failures, the champion's
report and the registry. Read-only; promotion and rollback go through training.registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, text

from shelver.catalog.status import catalog_status
from shelver.training import registry

# The report images training writes beside metrics.json (training.evaluate), by the name
# the dashboard asks for them; nothing else in a report directory is ever served.
REPORT_IMAGES = {"confusion": "confusion_matrix.png", "reliability": "reliability.png"}


@dataclass(frozen=True)
class Failure:
    status: str
    reason: str
    products: int


@dataclass(frozen=True)
class Dashboard:
    status: dict[str, Any]
    classified_last_hour: int
    failures: list[Failure]
    champion: registry.ModelRecord | None
    champion_figures: dict[str, float]
    report_images: list[str]
    models: list[registry.ModelRecord]


def dashboard(engine: Engine) -> Dashboard:
    status = catalog_status(engine)
    with engine.connect() as conn:
        last_hour = conn.execute(
            text("SELECT count(*) FROM products WHERE classified_at > now() - interval '1 hour'")
        ).scalar_one()
        # A failed product's error starts with a short reason before the colon; a
        # classified one's note says "image not used: <reason>: ..." (catalog.images).
        failures = [
            Failure(*row)
            for row in conn.execute(
                text(
                    """
                    SELECT status,
                           substring(error FROM '^(image not used: [a-z_]+|[^:]*)') AS reason,
                           count(*)
                    FROM products WHERE error IS NOT NULL
                    GROUP BY 1, 2 ORDER BY 3 DESC, 2 LIMIT 50
                    """
                )
            )
        ]
        champion = registry.champion(conn)
        models = registry.list_models(conn)
        images = [name for name, path in _report_paths(conn).items() if path.is_file()]
    return Dashboard(
        status=status,
        classified_last_hour=last_hour,
        failures=failures,
        champion=champion,
        champion_figures=_figures(champion.metrics) if champion else {},
        report_images=images,
        models=list(reversed(models)),
    )


def _figures(metrics: dict[str, Any]) -> dict[str, float]:
    """The champion's headline test figures: the plain numbers of its test metrics."""
    test = metrics.get("test", metrics)
    return {
        k: float(v)
        for k, v in test.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _report_paths(conn: Connection) -> dict[str, Path]:
    report_dir = conn.execute(
        text(
            """
            SELECT r.report_dir FROM model_versions m
            JOIN training_runs r ON r.id = m.training_run_id
            WHERE m.status = 'champion'
            """
        )
    ).scalar_one_or_none()
    if not report_dir:
        return {}
    return {name: Path(report_dir) / file for name, file in REPORT_IMAGES.items()}


def champion_report_image(engine: Engine, name: str) -> bytes | None:
    """One of the champion's report PNGs (by its REPORT_IMAGES name), or None."""
    if name not in REPORT_IMAGES:
        return None
    with engine.connect() as conn:
        path = _report_paths(conn).get(name)
    return path.read_bytes() if path and path.is_file() else None


def promote(engine: Engine, version: str) -> registry.ModelRecord:
    with engine.begin() as conn:
        return registry.promote(conn, version)


def rollback(engine: Engine) -> tuple[registry.ModelRecord, registry.ModelRecord]:
    with engine.begin() as conn:
        return registry.rollback(conn)
