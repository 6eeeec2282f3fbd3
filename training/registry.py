"""The model registry: candidates, the one champion, the promotion gate, rollback.

Exactly one champion is enforced by a partial unique index on
``model_versions``; every change of champion here retires the old one and
promotes the new one in the same transaction, so a reader never sees none or two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class ModelRecord:
    id: int
    version: str
    status: str
    sha256: str
    labels: list[str]
    encoders: dict[str, Any]
    metrics: dict[str, Any]
    threshold: float
    created_at: datetime
    promoted_at: datetime | None


_COLUMNS = (
    "id, version, status, sha256, labels, encoders, metrics, threshold, created_at, promoted_at"
)


def _record(row: Any) -> ModelRecord:
    return ModelRecord(*row)


VERSION_LOCK_KEY = 0x5348_454C_5645_5201
"""The ``pg_advisory_xact_lock`` key that registrations serialize on (any fixed number)."""

NEXT_VERSION_SQL = text(
    """
    SELECT 'v' || (coalesce(max(CAST(substring(version FROM '^v([0-9]+)$') AS integer)), 0) + 1)
    FROM model_versions
    """
)


def _lock_versions(conn: Connection) -> None:
    """Serialize registrations until this transaction ends.

    The next version number is read from the committed rows; without the lock
    two registrations running at once (a manual ``train`` during a scheduled
    retrain) would read the same number and the second would fail on the
    unique ``version`` after minutes of training. The lock is taken in its own
    statement so the next one's snapshot already sees the previous holder's
    commit (READ COMMITTED). An advisory lock, not a table lock: readers,
    promotions and the workers' champion probe are never held up by it.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": VERSION_LOCK_KEY})


def register_candidate(
    conn: Connection,
    *,
    version: str | None = None,
    artifact: bytes,
    sha256: str,
    labels: list[str],
    encoders: dict[str, Any],
    metrics: dict[str, Any],
    threshold: float,
    training_run_id: int | None = None,
    eval_artifact: bytes | None = None,
    eval_sha256: str | None = None,
) -> ModelRecord:
    """Add a ``candidate``; with no ``version`` it is numbered here, ``v1``, ``v2``, ...

    The number is chosen under the registration lock, in the caller's
    transaction, so concurrent registrations get distinct versions; a caller
    that names its own version still takes the lock, so it cannot race with
    the numbering either. ``eval_artifact`` is the artifact the model's test
    figures are of, when the one that serves (``artifact``) has since seen the
    test rows; the gate scores it.
    """
    if eval_artifact == artifact:
        eval_artifact = eval_sha256 = None  # nothing was refitted: one copy is enough
    _lock_versions(conn)
    if version is None:
        version = conn.execute(NEXT_VERSION_SQL).scalar_one()
    row = conn.execute(
        text(
            f"""
            INSERT INTO model_versions
                (version, status, artifact, sha256, labels, encoders, metrics, threshold,
                 training_run_id, eval_artifact, eval_sha256)
            VALUES (:version, 'candidate', :artifact, :sha256, CAST(:labels AS jsonb),
                    CAST(:encoders AS jsonb), CAST(:metrics AS jsonb), :threshold, :run,
                    :eval_artifact, :eval_sha256)
            RETURNING {_COLUMNS}
            """
        ),
        {
            "version": version,
            "artifact": artifact,
            "eval_artifact": eval_artifact,
            "eval_sha256": eval_sha256,
            "sha256": sha256,
            "labels": _json(labels),
            "encoders": _json(encoders),
            "metrics": _json(metrics),
            "threshold": threshold,
            "run": training_run_id,
        },
    ).one()
    return _record(row)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=float)


def get(conn: Connection, version: str) -> ModelRecord:
    row = conn.execute(
        text(f"SELECT {_COLUMNS} FROM model_versions WHERE version = :v"), {"v": version}
    ).one_or_none()
    if row is None:
        raise RegistryError(f"no model version {version!r}; `shelver models list` shows them")
    return _record(row)


def champion(conn: Connection) -> ModelRecord | None:
    row = conn.execute(
        text(f"SELECT {_COLUMNS} FROM model_versions WHERE status = 'champion'")
    ).one_or_none()
    return _record(row) if row else None


def artifact_of(conn: Connection, model_id: int) -> bytes:
    return bytes(
        conn.execute(
            text("SELECT artifact FROM model_versions WHERE id = :id"), {"id": model_id}
        ).scalar_one()
    )


def gate_artifact_of(conn: Connection, model_id: int) -> tuple[bytes, str]:
    """The artifact the gate may score on held-out rows, and its sha256: the evaluated
    one if the served artifact was refitted on every row, else the served one."""
    artifact, sha256 = conn.execute(
        text(
            """
            SELECT coalesce(eval_artifact, artifact), coalesce(eval_sha256, sha256)
            FROM model_versions WHERE id = :id
            """
        ),
        {"id": model_id},
    ).one()
    return bytes(artifact), sha256


def list_models(conn: Connection) -> list[ModelRecord]:
    rows = conn.execute(text(f"SELECT {_COLUMNS} FROM model_versions ORDER BY id"))
    return [_record(r) for r in rows]


def _lock_champion(conn: Connection) -> ModelRecord | None:
    """Lock the champion row (or, with none, serialize on the table) before changing it.

    Two concurrent promotions would otherwise both retire the same champion and
    one would then fail on the unique index; the lock makes the second wait and
    see the first's result.
    """
    conn.execute(text("LOCK TABLE model_versions IN SHARE ROW EXCLUSIVE MODE"))
    return champion(conn)


def promote(conn: Connection, version: str) -> ModelRecord:
    """Make ``version`` the champion; the old champion is retired."""
    current = _lock_champion(conn)
    target = get(conn, version)
    if current and current.id == target.id:
        return target
    if current:
        conn.execute(
            text("UPDATE model_versions SET status = 'retired' WHERE id = :id"), {"id": current.id}
        )
    conn.execute(
        text("UPDATE model_versions SET status = 'champion', promoted_at = now() WHERE id = :id"),
        {"id": target.id},
    )
    log.info("promoted %s (was %s)", version, current.version if current else "none")
    return get(conn, version)


def reject(conn: Connection, version: str) -> None:
    conn.execute(
        text("UPDATE model_versions SET status = 'rejected' WHERE version = :v"), {"v": version}
    )


def rollback(conn: Connection) -> tuple[ModelRecord, ModelRecord]:
    """Put the previous champion back; the current one is marked rejected.

    "Previous" is the most recently promoted other model that was champion
    before (status retired). Returns (new champion, demoted one).
    """
    current = _lock_champion(conn)
    if current is None:
        raise RegistryError("there is no champion to roll back")
    previous = conn.execute(
        text(
            f"""
            SELECT {_COLUMNS} FROM model_versions
            WHERE status = 'retired' AND promoted_at IS NOT NULL AND id <> :id
            ORDER BY promoted_at DESC LIMIT 1
            """
        ),
        {"id": current.id},
    ).one_or_none()
    if previous is None:
        raise RegistryError(
            f"{current.version} is the only model that was ever champion; nothing to roll back to"
        )
    conn.execute(
        text("UPDATE model_versions SET status = 'rejected' WHERE id = :id"), {"id": current.id}
    )
    conn.execute(
        text("UPDATE model_versions SET status = 'champion' WHERE id = :id"), {"id": previous[0]}
    )
    log.info("rolled back from %s to %s", current.version, previous[1])
    return get(conn, previous[1]), get(conn, current.version)


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate_macro_f1: float | None = None
    champion_macro_f1: float | None = None


def gate(
    candidate: dict[str, Any],
    champion_scores: dict[str, Any] | None,
    *,
    min_improvement: float,
    max_class_drop: float,
) -> GateDecision:
    """Whether a candidate should replace the champion, judged on the same test rows.

    Both dicts are evaluation results with ``macro_f1`` and ``per_class``
    (label -> {"f1": ...}). With no champion the candidate always wins.
    """
    if champion_scores is None:
        return GateDecision(True, ["no champion yet"], candidate["macro_f1"], None)
    cand, champ = candidate["macro_f1"], champion_scores["macro_f1"]
    decision = GateDecision(True, [], cand, champ)
    if cand < champ + min_improvement:
        decision.promote = False
        decision.reasons.append(
            f"macro-F1 {cand:.4f} does not beat the champion's {champ:.4f} "
            f"by the required {min_improvement:.4f}"
        )
    for label, theirs in champion_scores.get("per_class", {}).items():
        ours = candidate.get("per_class", {}).get(label)
        if ours is None:
            continue
        drop = theirs["f1"] - ours["f1"]
        if drop > max_class_drop:
            decision.promote = False
            decision.reasons.append(
                f"class {label!r} F1 drops by {drop:.4f} ({theirs['f1']:.4f} -> {ours['f1']:.4f}),"
                f" more than the allowed {max_class_drop:.4f}"
            )
    if decision.promote:
        decision.reasons.append(f"macro-F1 {cand:.4f} beats the champion's {champ:.4f}")
    return decision
