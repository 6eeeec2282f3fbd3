"""The default model shipped inside the package, so a fresh install classifies at once.

``bundle`` writes a registered model to ``worker/default_model/`` (the
artifact plus a small JSON card); ``register_bundled`` puts it into a
catalog's registry as champion when the catalog has none. The artifact is
verified by sha256 like any other, and never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from shelver.training import registry
from shelver.worker.fusion import ArtifactRejected, sha256_hex

BUNDLE_DIR = Path(__file__).resolve().parent.parent / "worker" / "default_model"
ARTIFACT = "fusion.zip"
CARD = "model.json"


def bundle(engine: Engine, version: str, target: Path = BUNDLE_DIR, *, source: str = "") -> Path:
    """Copy registered ``version`` into ``target`` with its card; returns the card's path."""
    with engine.connect() as conn:
        record = registry.get(conn, version)
        artifact = registry.artifact_of(conn, record.id)
    target.mkdir(parents=True, exist_ok=True)
    (target / ARTIFACT).write_bytes(artifact)
    test = record.metrics.get("test", {})
    baseline = record.metrics.get("baseline", {})
    card = {
        "version": f"default-{record.sha256[:8]}",
        "sha256": record.sha256,
        "labels": record.labels,
        "encoders": record.encoders,
        "threshold": record.threshold,
        "trained_on": source,
        "test": {k: test.get(k) for k in ("n", "accuracy", "macro_f1", "ece", "coverage")},
        "baseline": {k: baseline.get(k) for k in ("accuracy", "macro_f1")},
    }
    path = target / CARD
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def read_bundled(source: Path = BUNDLE_DIR) -> tuple[dict[str, Any], bytes]:
    card = json.loads((source / CARD).read_text())
    artifact = (source / ARTIFACT).read_bytes()
    if sha256_hex(artifact) != card["sha256"]:
        raise ArtifactRejected(
            f"the bundled model in {source} does not match its sha256; reinstall Shelver"
        )
    return card, artifact


def register_bundled(engine: Engine, source: Path = BUNDLE_DIR) -> registry.ModelRecord | None:
    """Register and promote the bundled model if the catalog has no champion; else do nothing."""
    card, artifact = read_bundled(source)
    with engine.begin() as conn:
        if registry.champion(conn) is not None:
            return None
        existing = {m.version: m for m in registry.list_models(conn)}
        if card["version"] not in existing:
            registry.register_candidate(
                conn,
                version=card["version"],
                artifact=artifact,
                sha256=card["sha256"],
                labels=card["labels"],
                encoders=card["encoders"],
                metrics={"test": card["test"], "baseline": card["baseline"], "bundled": True},
                threshold=card["threshold"],
            )
        return registry.promote(conn, card["version"])


def build_default_model(data: Path, target: Path = BUNDLE_DIR) -> Path:
    """Reproduce the bundled model: a scratch embedded catalog, import ``data``, train, bundle.

    Uses SHELVER_MODEL_DIR's encoders (exported first if missing) and nothing
    else from the environment, so the result depends only on the data, the
    encoders and the recipe's fixed seed.
    """
    import tempfile

    from shelver.catalog.db import engine_for
    from shelver.catalog.embedded import create_database, embedded_services
    from shelver.catalog.importer import import_file
    from shelver.catalog.migrate import upgrade
    from shelver.catalog.settings import get_settings, sqlalchemy_url
    from shelver.training.pipeline import train_and_register
    from shelver.worker.encoders import EncoderUnavailable, load_encoders

    settings = get_settings()
    try:
        load_encoders(settings.model_dir)
    except EncoderUnavailable:
        from shelver.training.encoder_export import export_encoders

        export_encoders(settings.model_dir)
    with (
        tempfile.TemporaryDirectory(prefix="shelver-bundle-") as tmp,
        embedded_services(Path(tmp)) as (server, _broker),
    ):
        url = create_database(server, "shelver")
        upgrade(url)
        engine = engine_for(sqlalchemy_url(url))
        image_roots = [data.resolve().parent]
        import_file(engine, data, image_roots=image_roots)
        run_settings = settings.model_copy(
            update={
                "database_url": url,
                "image_roots": image_roots,
                "data_dir": Path(tmp) / "var",
            }
        )
        outcome = train_and_register(engine, run_settings, promote="force")
        card = bundle(engine, outcome.model.version, target, source=str(data))
        engine.dispose()
    return card


if __name__ == "__main__":
    import argparse
    import logging

    parser = argparse.ArgumentParser(description="Rebuild Shelver's bundled default model.")
    parser.add_argument(
        "data", type=Path, help="labeled CSV, e.g. ../shared/data/bestbuy/products.csv"
    )
    parser.add_argument("--out", type=Path, default=BUNDLE_DIR)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(build_default_model(args.data, args.out).read_text())
