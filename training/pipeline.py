"""One training run end to end: catalog rows -> embeddings -> fit -> report -> registry -> gate.

``train_and_register`` is what ``shelver train`` and the scheduled retraining
task both call; every run leaves a ``training_runs`` row, succeeded or failed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import Engine, text

from shelver.catalog.settings import Settings
from shelver.training import registry
from shelver.training.dataset import load_labeled_set
from shelver.training.fit import TrainParams, train
from shelver.training.holdout import score_model
from shelver.worker.encoders import load_encoders
from shelver.worker.fusion import FusionModel
from shelver.worker.images import ImageUsage

log = logging.getLogger(__name__)

PromoteMode = Literal["auto", "never", "force"]


@dataclass
class TrainOutcome:
    run_id: int
    model: registry.ModelRecord
    promoted: bool
    decision: registry.GateDecision | None
    report_dir: Path
    metrics: dict
    # Rows that gave the model an image, and why the others did not.
    images: ImageUsage


def _start_run(engine: Engine, params: dict) -> int:
    with engine.begin() as conn:
        # The watermark is taken before rows are read: a label changed during
        # the run counts toward the next one rather than being lost between.
        return conn.execute(
            text(
                "INSERT INTO training_runs (params, label_watermark) "
                "VALUES (CAST(:params AS jsonb), now()) RETURNING id"
            ),
            {"params": json.dumps(params, default=str)},
        ).scalar_one()


def _finish_run(engine: Engine, run_id: int, **values: object) -> None:
    sets = ", ".join(
        f"{k} = CAST(:{k} AS jsonb)" if k == "metrics" else f"{k} = :{k}" for k in values
    )
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE training_runs SET {sets}, finished_at = now() WHERE id = :id"),
            {**values, "id": run_id},
        )


def train_and_register(
    engine: Engine,
    settings: Settings,
    *,
    promote: PromoteMode = "auto",
    params: TrainParams | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> TrainOutcome:
    params = params or TrainParams(target_precision=settings.target_precision)
    run_id = _start_run(engine, {"promote": promote, **params.__dict__})
    report_dir = Path(settings.data_dir) / "reports" / f"run-{run_id}"
    try:
        text_encoder, image_encoder = load_encoders(settings.model_dir)
        labeled = load_labeled_set(
            engine,
            text_encoder,
            image_encoder,
            settings,
            progress=(lambda done, total: progress("embedding", done, total)) if progress else None,
        )
        params.encoders = {"text": text_encoder.identity, "image": image_encoder.identity}
        images = labeled.images
        warnings = [w for w in [images.text_only_warning()] if w]
        for warning in warnings:
            log.warning("training run %d: %s", run_id, warning)
        seen = {"images": images.as_dict(), "warnings": warnings}
        result = train(
            labeled.data,
            params,
            report_dir=report_dir,
            on_epoch=(lambda done, most: progress("training", done, most)) if progress else None,
        )
        # Scored as evaluated: the served artifact's linear part has seen the test rows.
        candidate_model = FusionModel.from_artifact(result.eval_artifact, result.eval_sha256)
        test_rows = list(result.split.test)
        candidate_scores = score_model(candidate_model, labeled.data, rows=test_rows)
        with engine.begin() as conn:
            current = registry.champion(conn)
            # Numbered here, in the registering transaction, not before training:
            # a run that started alongside another still gets a version of its own.
            record = registry.register_candidate(
                conn,
                artifact=result.artifact,
                sha256=result.sha256,
                labels=list(result.labels),
                encoders=params.encoders,
                metrics={**result.metrics, **seen},
                threshold=float(result.threshold),
                training_run_id=run_id,
                eval_artifact=result.eval_artifact,
                eval_sha256=result.eval_sha256,
            )
        champion_scores = None
        if current is not None:
            with engine.connect() as conn:
                artifact, sha256 = registry.gate_artifact_of(conn, current.id)
            champion_scores = _score_champion(
                current, artifact, sha256, labeled.data, test_rows, params
            )
        if current is not None and champion_scores is None:
            decision = registry.GateDecision(
                False,
                [
                    f"champion {current.version} uses other encoders, so the two cannot be "
                    "compared on the same rows; promote by hand (`--promote force`)"
                ],
                candidate_scores["macro_f1"],
            )
        else:
            decision = registry.gate(
                candidate_scores,
                champion_scores,
                min_improvement=settings.promote_min_improvement,
                max_class_drop=settings.promote_max_class_drop,
            )
        promoted = promote == "force" or (promote == "auto" and decision.promote)
        with engine.begin() as conn:
            if promoted:
                record = registry.promote(conn, record.version)
            elif promote == "auto":
                registry.reject(conn, record.version)
                record = registry.get(conn, record.version)
        metrics = {
            **result.metrics,
            **seen,
            "gate": {
                "promoted": promoted,
                "mode": promote,
                "reasons": decision.reasons,
                "candidate_on_test": candidate_scores["macro_f1"],
                "champion_on_test": champion_scores["macro_f1"] if champion_scores else None,
            },
        }
        (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        _finish_run(
            engine,
            run_id,
            status="succeeded",
            n_rows=len(labeled.product_ids),
            metrics=json.dumps(metrics, default=float),
            report_dir=str(report_dir),
        )
        return TrainOutcome(run_id, record, promoted, decision, report_dir, metrics, images)
    except BaseException as exc:
        _finish_run(engine, run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _score_champion(
    champion: registry.ModelRecord,
    artifact: bytes,
    sha256: str,
    data,
    rows: list[int],
    params: TrainParams,
) -> dict | None:
    """The champion's figures on the candidate's test rows, or None if it cannot be compared.

    ``artifact`` is the champion as evaluated (``registry.gate_artifact_of``): the
    split is stable, so it never trained on these rows, while its served artifact may
    have.

    A champion built on other encoders sees other embeddings; comparing it on
    ours would be meaningless, so the gate then leaves the decision to a person.
    """
    if champion.encoders != params.encoders:
        log.warning(
            "champion %s uses encoders %s, the candidate %s: not comparable",
            champion.version, champion.encoders, params.encoders,
        )  # fmt: skip
        return None
    model = FusionModel.from_artifact(artifact, sha256)
    return score_model(model, data, rows=rows)
