"""The registry: one champion, promotion, rollback, and the gate's decisions."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError

from shelver.training import registry


def register(conn: Connection, version: str | None, macro_f1: float = 0.9) -> registry.ModelRecord:
    return registry.register_candidate(
        conn,
        version=version,
        artifact=b"artifact " + (version or "numbered").encode(),
        sha256="0" * 64,
        labels=["Audio", "Cameras"],
        encoders={"text": "t", "image": "i"},
        metrics={"test": {"macro_f1": macro_f1}},
        threshold=0.8,
    )


def add(engine: Engine, version: str, macro_f1: float = 0.9) -> registry.ModelRecord:
    with engine.begin() as conn:
        return register(conn, version, macro_f1)


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


def test_versions_are_numbered_after_the_highest_one(engine: Engine) -> None:
    add(engine, "default-f3b50c1b")  # the bundled model's kind of name does not count
    add(engine, "v1")
    add(engine, "v7")
    with engine.begin() as conn:
        assert register(conn, None).version == "v8"


def test_two_registrations_at_once_get_distinct_versions(engine: Engine) -> None:
    """A manual `train` finishing while the scheduled retrain registers: both are kept."""
    add(engine, "v1")
    second: dict[str, object] = {}
    started = threading.Event()

    def register_second() -> None:
        try:
            with engine.begin() as conn:
                second["backend"] = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                started.set()
                second["record"] = register(conn, None)
        except Exception as exc:
            second["error"] = exc
        finally:
            started.set()

    with engine.begin() as first_conn:
        first = register(first_conn, None)
        # The second registration starts while the first is not yet committed,
        # and must get as far as it can before the first commits.
        thread = threading.Thread(target=register_second)
        thread.start()
        assert started.wait(10) and "backend" in second, second
        wait_until_blocked(engine, second["backend"])
    thread.join(30)

    assert "error" not in second, second.get("error")
    assert {first.version, second["record"].version} == {"v2", "v3"}
    assert set(statuses(engine)) == {"v1", "v2", "v3"}


def wait_until_blocked(engine: Engine, backend: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            if conn.execute(text("SELECT pg_blocking_pids(:p)"), {"p": backend}).scalar():
                return
            conn.rollback()
            time.sleep(0.02)
    raise AssertionError(f"the second registration never waited for the first (backend {backend})")


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
