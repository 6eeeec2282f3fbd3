"""The registry: one champion, promotion, rollback, and the gate's decisions."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from shelver.training import registry


def add(engine: Engine, version: str, macro_f1: float = 0.9) -> registry.ModelRecord:
    with engine.begin() as conn:
        return registry.register_candidate(
            conn,
            version=version,
            artifact=b"artifact " + version.encode(),
            sha256="0" * 64,
            labels=["Audio", "Cameras"],
            encoders={"text": "t", "image": "i"},
            metrics={"test": {"macro_f1": macro_f1}},
            threshold=0.8,
        )


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {m.version: m.status for m in registry.list_models(conn)}


def test_promote_retires_the_old_champion(engine: Engine) -> None:
    add(engine, "v1")
    add(engine, "v2")
    with engine.begin() as conn:
        registry.promote(conn, "v1")
    with engine.begin() as conn:
        registry.promote(conn, "v2")
    assert statuses(engine) == {"v1": "retired", "v2": "champion"}


def test_database_refuses_a_second_champion(engine: Engine) -> None:
    add(engine, "v1")
    add(engine, "v2")
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET status = 'champion'"))


def test_rollback_restores_the_previous_champion(engine: Engine) -> None:
    for version in ("v1", "v2", "v3"):
        add(engine, version)
        with engine.begin() as conn:
            registry.promote(conn, version)
    with engine.begin() as conn:
        restored, demoted = registry.rollback(conn)
    assert (restored.version, demoted.version) == ("v2", "v3")
    with engine.begin() as conn:
        registry.rollback(conn)
    assert statuses(engine) == {"v1": "champion", "v2": "rejected", "v3": "rejected"}
    with (
        pytest.raises(registry.RegistryError, match="nothing to roll back to"),
        engine.begin() as conn,
    ):
        registry.rollback(conn)


def test_promote_unknown_version_says_how_to_list(engine: Engine) -> None:
    with pytest.raises(registry.RegistryError, match="shelver models list"), engine.begin() as conn:
        registry.promote(conn, "v9")


def scores(macro_f1: float, **per_class: float) -> dict:
    return {"macro_f1": macro_f1, "per_class": {k: {"f1": v} for k, v in per_class.items()}}


def test_gate_promotes_first_model() -> None:
    assert registry.gate(scores(0.5), None, min_improvement=0.01, max_class_drop=0.05).promote


def test_gate_promotes_a_better_candidate() -> None:
    decision = registry.gate(
        scores(0.92, Audio=0.9, Cameras=0.94),
        scores(0.90, Audio=0.9, Cameras=0.90),
        min_improvement=0.01,
        max_class_drop=0.05,
    )
    assert decision.promote


def test_gate_rejects_a_worse_or_barely_better_candidate() -> None:
    worse = registry.gate(scores(0.85), scores(0.90), min_improvement=0.0, max_class_drop=0.05)
    barely = registry.gate(scores(0.905), scores(0.90), min_improvement=0.01, max_class_drop=0.05)
    assert not worse.promote and not barely.promote
    assert "does not beat" in worse.reasons[0]


def test_gate_rejects_a_candidate_that_sacrifices_a_class() -> None:
    decision = registry.gate(
        scores(0.95, Audio=0.99, Cameras=0.80),
        scores(0.90, Audio=0.90, Cameras=0.90),
        min_improvement=0.01,
        max_class_drop=0.05,
    )
    assert not decision.promote
    assert "'Cameras' F1 drops by 0.1000" in decision.reasons[0]
