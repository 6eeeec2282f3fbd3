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

from training import registry
from worker.fusion import ArtifactRejected, sha256_hex

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
