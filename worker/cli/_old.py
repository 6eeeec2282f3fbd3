"""The ``shelver`` command line. Only this module prints; everything it calls logs.

Commands import their heavy modules lazily, so ``shelver status`` does not pay
for onnxruntime and ``shelver worker`` never loads TensorFlow.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shelver.catalog.settings import SettingsError, get_settings

app = typer.Typer(
    help="Shelver keeps a product catalog categorized by itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The catalog database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
encoders_app = typer.Typer(help="The text and image encoders workers run.", no_args_is_help=True)
app.add_typer(encoders_app, name="encoders")
models_app = typer.Typer(help="The model registry: list, inspect, promote, roll back.",
                         no_args_is_help=True)  # fmt: skip
app.add_typer(models_app, name="models")

# soft_wrap: lines such as "file:line: reason" must stay whole for grep and tests.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _log_progress() -> None:
    logging.getLogger().setLevel(logging.INFO)


class UserError(Exception):
    """A mistake the user can fix; shown as one line, without a traceback."""


def main() -> None:
    # Commands that run for a long time (dispatch, beat; Celery configures the worker's
    # own) log at INFO through _log_progress(); one-shot commands show only warnings,
    # so their own output stays readable.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from sqlalchemy.exc import OperationalError

    from shelver.catalog.db import DatabaseNotAvailableError
    from shelver.worker.encoders import EncoderUnavailable

    try:
        app()
    except (UserError, SettingsError, DatabaseNotAvailableError, EncoderUnavailable) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except OperationalError as exc:
        # Connection refused, wrong database name, bad password: a setting to fix,
        # not a bug to report, so no traceback.
        err_console.print(
            f"[red]error:[/red] cannot reach PostgreSQL: {str(exc.orig).strip()}. "
            "Is it running, and is SHELVER_DATABASE_URL right?"
        )
        sys.exit(2)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the catalog schema (tables, trigger, queue) to the latest version."""
    from shelver.catalog.db import check_connection, get_engine
    from shelver.catalog.migrate import upgrade

    settings = get_settings()
    check_connection(get_engine())
    upgrade(settings.require_database_url())
    console.print("catalog schema is up to date")


@app.command("import")
def import_products(
    path: Annotated[Path, typer.Argument(help="A products CSV or a Best Buy products.json.")],
    unlabeled: Annotated[
        bool, typer.Option("--unlabeled", help="Ignore the category column: import as unlabeled.")
    ] = False,
) -> None:
    """Import products: create categories, upsert by sku, report rejected rows with line numbers.

    Exits 1 when any row was rejected (the good rows are imported all the same).
    """
    from shelver.catalog.db import get_engine
    from shelver.catalog.importer import ImportFormatError, import_file

    try:
        report = import_file(get_engine(), path, labeled=not unlabeled, progress=True)
    except (ImportFormatError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    for rejection in report.rejected:
        err_console.print(f"{path}:{rejection.line}: rejected: {rejection.reason}")
    console.print(
        f"{report.inserted} inserted, {report.updated} updated, {report.unchanged} unchanged, "
        f"{len(report.rejected)} rejected, {report.categories_created} new categories"
    )
    if report.rejected:
        raise typer.Exit(1)


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Products by status, queue depth, age of the oldest pending row, and the champion model."""
    from shelver.catalog.db import get_engine
    from shelver.catalog.status import catalog_status

    report = catalog_status(get_engine())
    if as_json:
        print(json.dumps(report, default=str, indent=2))
        return
    table = Table(title="products")
    table.add_column("status")
    table.add_column("count", justify="right")
    for name, count in report["products"].items():
        table.add_row(name, str(count))
    console.print(table)
    queue = report["queue"]
    age = queue["oldest_pending_age_s"]
    console.print(
        f"queue: {queue['depth']} rows ({queue['claimed']} claimed), oldest pending "
        + (f"{age:.1f} s old" if age is not None else "none")
    )
    champion = report["champion"]
    console.print(
        f"champion: {champion['version']} (macro-F1 {champion.get('macro_f1')})"
        if champion
        else "champion: none yet (run `shelver train`)"
    )


# --- the event path: dispatcher, workers, backfill, schedule, labels ---------------------------


def _stop_on_signals() -> threading.Event:
    """One Event that SIGTERM and SIGINT set; long-running commands finish their step and exit."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        logging.getLogger("shelver").info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


@app.command("dispatch")
def dispatch(
    batch_size: Annotated[
        int | None, typer.Option(help="Products per classify task (default SHELVER_BATCH_SIZE).")
    ] = None,
    batch_wait_ms: Annotated[
        int | None, typer.Option(help="Wait to fill a batch (default SHELVER_BATCH_WAIT_MS).")
    ] = None,
    backfill_batch_size: Annotated[
        int, typer.Option(help="Products per backfill task; cached re-scores are cheap.")
    ] = 256,
    max_inflight_batches: Annotated[
        int, typer.Option(help="Sent-but-unfinished batches allowed per queue, all dispatchers.")
    ] = 8,
) -> None:
    """Send queued products to the workers: LISTEN/NOTIFY plus polling, micro-batched.

    Run as many as you like; they never hand out the same product twice under a live lease.
    """
    _log_progress()
    from shelver.catalog.db import check_connection, get_engine
    from shelver.worker.dispatcher import DispatchConfig, Dispatcher, celery_sender

    settings = get_settings()
    settings.require_broker_url()
    engine = get_engine()
    check_connection(engine)
    config = DispatchConfig.from_settings(
        settings,
        batch_size=batch_size,
        batch_wait_s=None if batch_wait_ms is None else batch_wait_ms / 1000,
        backfill_batch_size=backfill_batch_size,
        max_inflight_batches=max_inflight_batches,
    )
    stats = Dispatcher(engine, celery_sender(), config, _stop_on_signals()).run()
    console.print(f"dispatcher stopped after {stats.batches} batches, {stats.rows} products")


@app.command("worker")
def run_worker(
    queues: Annotated[
        str, typer.Option("-Q", "--queues", help="Comma-separated: classify, backfill, training.")
    ] = "classify,backfill",
    concurrency: Annotated[
        int | None,
        typer.Option("-c", "--concurrency", help="Pool processes (default: one per core)."),
    ] = None,
    pool: Annotated[
        str, typer.Option("-P", "--pool", help="prefork, solo or threads.")
    ] = "prefork",
    threads: Annotated[
        int | None,
        typer.Option(help="onnxruntime intra-op threads per process (default: cores/concurrency)."),
    ] = None,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel")] = "INFO",
) -> None:
    """Run a Celery worker: encoders and the champion load once per process."""
    import os

    from shelver.worker.encoders import EncoderUnavailable
    from shelver.worker.runtime import check_encoders

    settings = get_settings()
    settings.require_broker_url()
    settings.require_database_url()
    wanted = {q.strip() for q in queues.split(",") if q.strip()}
    if wanted - {"classify", "backfill", "training"}:
        raise UserError(f"unknown queue(s) {sorted(wanted - {'classify', 'backfill', 'training'})}")
    if wanted & {"classify", "backfill"}:
        try:
            check_encoders(settings.model_dir)
        except EncoderUnavailable as exc:
            raise UserError(str(exc)) from exc
    # Measured (docs/operations.md): one single-threaded process per core beats
    # one process with a thread per core, since decoding and DB round trips
    # would leave the second core idle between onnxruntime calls.
    concurrency = concurrency or os.cpu_count() or 1
    per_process = threads or max(1, (os.cpu_count() or 1) // concurrency)
    os.environ["SHELVER_ORT_THREADS"] = str(per_process)
    from shelver.worker.celery_app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "-Q", ",".join(sorted(wanted)),
            "-c", str(concurrency),
            "-P", pool,
            "-l", loglevel,
            # Unique per process, so several workers on one host do not clash.
            "-n", f"shelver-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle",
        ]
    )  # fmt: skip


@encoders_app.command("export")
def encoders_export(
    resnet: Annotated[
        bool, typer.Option("--resnet", help="Also export ResNet50 (needs Keras ImageNet weights).")
    ] = False,
) -> None:
    """Build the ONNX encoders from weights shipped in pip packages (needs the `export` extra)."""
    try:
        from shelver.training.encoder_export import describe, export_encoders
    except ImportError as exc:
        raise UserError(
            f"encoder export needs the export extra ({exc.name} is missing): "
            "pip install -e '.[export]'"
        ) from exc
    model_dir = get_settings().model_dir
    manifest = export_encoders(model_dir, include_resnet=resnet)
    table = Table(title=f"encoders in {model_dir}")
    for column in ("name", "kind", "dim", "identity"):
        table.add_column(column)
    for row in describe(manifest):
        table.add_row(row["name"], row["kind"], str(row["dim"]), row["identity"])
    console.print(table)


@app.command("train")
def train_command(
    promote: Annotated[
        str,
        typer.Option(
            help="auto: promote only if the gate passes; never: keep as candidate; "
            "force: promote regardless."
        ),
    ] = "auto",
) -> None:
    """Train on the catalog's labeled products, report, register a candidate and run the gate."""
    if promote not in ("auto", "never", "force"):
        raise UserError(f"--promote must be auto, never or force, not {promote!r}")
    from rich.progress import Progress

    from shelver.catalog.db import get_engine
    from shelver.training.pipeline import train_and_register

    with Progress(console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        try:
            outcome = train_and_register(
                get_engine(), get_settings(), promote=promote, progress=progress
            )
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    _print_training(outcome)


def _print_training(outcome) -> None:
    metrics = outcome.metrics
    test = metrics.get("test", {})
    baseline = metrics.get("baseline", {})
    table = Table(title=f"training run {outcome.run_id}: {outcome.model.version}")
    table.add_column("on the test split")
    table.add_column("fusion model", justify="right")
    table.add_column("TF-IDF baseline", justify="right")
    for key in ("accuracy", "macro_f1"):
        table.add_row(key, _fmt(test.get(key)), _fmt(baseline.get(key)))
    table.add_row("ECE", _fmt(test.get("ece")), "")
    table.add_row(
        f"coverage at threshold {_fmt(outcome.model.threshold)}", _fmt(test.get("coverage")), ""
    )
    console.print(table)
    verdict = "promoted to champion" if outcome.promoted else f"left as {outcome.model.status}"
    console.print(f"{outcome.model.version}: {verdict}")
    for reason in outcome.decision.reasons if outcome.decision else []:
        console.print(f"  - {reason}")
    console.print(f"report: {outcome.report_dir}")


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every registered model with its status and test figures."""
    from shelver.catalog.db import get_engine
    from shelver.training import registry

    with get_engine().connect() as conn:
        models = registry.list_models(conn)
    if as_json:
        print(json.dumps([_model_json(m) for m in models], default=str, indent=2))
        return
    table = Table(title="models")
    for column in ("version", "status", "macro-F1 (test)", "threshold", "created", "promoted"):
        table.add_column(column)
    for m in models:
        table.add_row(
            m.version,
            m.status,
            _fmt(m.metrics.get("test", {}).get("macro_f1")),
            _fmt(m.threshold),
            f"{m.created_at:%Y-%m-%d %H:%M}",
            f"{m.promoted_at:%Y-%m-%d %H:%M}" if m.promoted_at else "",
        )
    console.print(table)


def _model_json(m) -> dict:
    return {
        "version": m.version,
        "status": m.status,
        "sha256": m.sha256,
        "labels": m.labels,
        "encoders": m.encoders,
        "threshold": m.threshold,
        "metrics": m.metrics,
        "created_at": m.created_at,
        "promoted_at": m.promoted_at,
    }


@models_app.command("show")
def models_show(version: Annotated[str, typer.Argument(help="e.g. v3")]) -> None:
    """Everything recorded about one model, as JSON."""
    from shelver.catalog.db import get_engine
    from shelver.training import registry

    with get_engine().connect() as conn:
        try:
            record = registry.get(conn, version)
        except registry.RegistryError as exc:
            raise UserError(str(exc)) from exc
    print(json.dumps(_model_json(record), default=str, indent=2))


@models_app.command("promote")
def models_promote(version: Annotated[str, typer.Argument(help="e.g. v3")]) -> None:
    """Make VERSION the champion by hand; workers switch to it within seconds."""
    from shelver.catalog.db import get_engine
    from shelver.training import registry

    with get_engine().begin() as conn:
        try:
            registry.promote(conn, version)
        except registry.RegistryError as exc:
            raise UserError(str(exc)) from exc
    console.print(f"{version} is the champion")


@models_app.command("rollback")
def models_rollback() -> None:
    """Put the previous champion back; the current one is marked rejected."""
    from shelver.catalog.db import get_engine
    from shelver.training import registry

    with get_engine().begin() as conn:
        try:
            restored, demoted = registry.rollback(conn)
        except registry.RegistryError as exc:
            raise UserError(str(exc)) from exc
    console.print(f"{restored.version} is the champion again ({demoted.version} rejected)")


@app.command("evaluate")
def evaluate_command(
    path: Annotated[Path, typer.Argument(help="A labeled CSV in the shared schema.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Score the champion on a labeled file without inserting its rows into the catalog."""
    from shelver.catalog.db import get_engine
    from shelver.catalog.importer import ImportFormatError
    from shelver.training.holdout import champion_model, evaluate_file

    try:
        record, model = champion_model(get_engine())
        result = evaluate_file(model, path, get_settings())
    except (LookupError, ValueError, ImportFormatError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    metrics = {"model": record.version, **result.metrics}
    metrics["rejected_rows"] = [
        {"line": r.line, "reason": r.reason} for r in result.rejected.rejected
    ]
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    console.print(
        f"{record.version} on {path}: n={metrics['n']} accuracy={metrics['accuracy']:.4f} "
        f"macro-F1={metrics['macro_f1']:.4f} coverage={metrics['coverage']:.3f}"
    )
    table = Table()
    for column in ("category", "precision", "recall", "F1", "support"):
        table.add_column(column)
    for label, row in metrics["per_class"].items():
        table.add_row(
            label, _fmt(row["precision"]), _fmt(row["recall"]), _fmt(row["f1"]), str(row["support"])
        )
    console.print(table)
    if metrics["unknown_categories"]:
        console.print(f"categories the model does not know: {metrics['unknown_categories']}")


@app.command("backfill")
def backfill(
    all_products: Annotated[bool, typer.Option("--all", help="Every product.")] = False,
    unclassified: Annotated[
        bool, typer.Option("--unclassified", help="Products still pending or failed.")
    ] = False,
    stale: Annotated[
        bool, typer.Option("--stale", help="Products not scored by the current champion.")
    ] = False,
    category: Annotated[
        str | None, typer.Option("--category", help="Predicted or labeled as this category.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Created on or after this date (YYYY-MM-DD).")
    ] = None,
    resume: Annotated[
        int | None, typer.Option("--resume", help="Continue backfill run ID where it stopped.")
    ] = None,
    chunk: Annotated[int, typer.Option(help="Products enqueued per transaction.")] = 5000,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Enqueue and exit instead of showing progress.")
    ] = False,
) -> None:
    """Re-score a selection of the catalog through the backfill queue, with progress.

    Ctrl-C stops it safely; `shelver backfill --resume ID` continues. Needs `shelver dispatch`
    and a worker consuming the `backfill` queue.
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from shelver.catalog.db import get_engine
    from shelver.worker import backfill as bf

    engine = get_engine()
    filters = unclassified or stale or category is not None or since is not None
    try:
        if resume is not None:
            if all_products or filters:
                raise UserError("--resume continues a run with its own selection; give no filters")
            run = bf.load(engine, resume)
        elif not (all_products or filters):
            raise UserError(
                "say what to re-score: --all, --unclassified, --stale, --category or --since"
            )
        else:
            run = bf.start(
                engine,
                bf.Selector(unclassified=unclassified, stale=stale, category=category, since=since),
            )
    except bf.BackfillError as exc:
        raise UserError(str(exc)) from exc
    console.print(f"backfill run {run.id}: {run.total} products selected")
    stop = _stop_on_signals()
    started = time.monotonic()
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
        enqueue_task = bar.add_task("enqueued", total=run.total, completed=run.enqueued)
        done_task = bar.add_task("re-scored", total=run.total)
        if run.status == "running":
            for step in bf.enqueue(engine, run, chunk=chunk):
                bar.update(enqueue_task, completed=step.enqueued)
                if stop.is_set():
                    break
        if not (stop.is_set() or no_wait):
            bar.update(enqueue_task, completed=run.enqueued, total=run.enqueued)
            while not stop.is_set():
                state = bf.progress(engine, run)
                bar.update(done_task, completed=state.finished, total=state.enqueued)
                if state.enqueue_done and state.remaining == 0:
                    break
                stop.wait(0.5)
    elapsed = time.monotonic() - started
    if stop.is_set():
        console.print(
            f"stopped; queued rows still get re-scored. Resume with `shelver backfill --resume "
            f"{run.id}`"
        )
        raise typer.Exit(130)
    if no_wait:
        console.print(f"backfill {run.id}: {run.enqueued} products queued")
        return
    console.print(
        f"backfill {run.id} done: {run.enqueued} products in {elapsed:.1f} s "
        f"({run.enqueued / max(elapsed, 1e-9):.0f} rows/s)"
    )


@app.command("beat")
def beat(
    once: Annotated[
        bool, typer.Option("--once", help="Check now, queue retraining if due, and exit.")
    ] = False,
) -> None:
    """At SHELVER_RETRAIN_CRON times, queue retraining when enough new labels arrived."""
    _log_progress()
    from croniter import croniter

    from shelver.catalog.db import get_engine
    from shelver.worker.schedule import run_beat, send_retrain, tick

    settings = get_settings()
    settings.require_broker_url()
    if not croniter.is_valid(settings.retrain_cron):
        raise UserError(f"SHELVER_RETRAIN_CRON={settings.retrain_cron!r} is not a cron expression")
    engine = get_engine()
    if once:
        decision = tick(engine, settings.retrain_min_new_labels, send_retrain)
        console.print(
            ("retraining queued: " if decision.start else "no retraining: ") + decision.reason
        )
        return
    run_beat(engine, settings.retrain_cron, settings.retrain_min_new_labels, _stop_on_signals())


@app.command("label")
def label(
    path: Annotated[Path, typer.Argument(help="CSV with `sku` and `category` columns.")],
    create_categories: Annotated[
        bool, typer.Option("--create-categories", help="Create categories the catalog lacks.")
    ] = False,
) -> None:
    """Apply labels from a CSV; unknown SKUs and categories are reported per line (exit 1)."""
    from shelver.catalog.db import get_engine
    from shelver.worker.labels import LabelFileError, apply_label_file

    try:
        report = apply_label_file(get_engine(), path, create_categories=create_categories)
    except LabelFileError as exc:
        raise UserError(str(exc)) from exc
    for problem in report.problems:
        err_console.print(f"{path}:{problem.line}: {problem.reason}")
    console.print(
        f"{report.labeled} labeled, {report.unchanged} unchanged, {report.kept_review} kept "
        f"(labeled in review), {len(report.problems)} rejected, "
        f"{report.categories_created} new categories"
    )
    if report.problems:
        raise typer.Exit(1)


@app.command("review")
def review(
    limit: Annotated[int, typer.Option(help="How many products to list.")] = 20,
    corrections: Annotated[
        list[str] | None,
        typer.Option("--set", help="Record a verdict: SKU=CATEGORY (repeatable)."),
    ] = None,
) -> None:
    """List products waiting for review, least confident first, or record verdicts with --set."""
    from shelver.catalog.db import get_engine
    from shelver.worker.labels import ReviewError, needs_review, record_review

    engine = get_engine()
    if corrections:
        for item in corrections:
            sku, sep, category = item.partition("=")
            if not sep or not sku.strip() or not category.strip():
                raise UserError(f"--set wants SKU=CATEGORY, got {item!r}")
            try:
                record_review(engine, sku.strip(), category.strip())
            except ReviewError as exc:
                raise UserError(str(exc)) from exc
            console.print(f"{sku.strip()}: labeled {category.strip()!r}")
        return
    items = needs_review(engine, limit)
    if not items:
        console.print("nothing waits for review")
        return
    table = Table(title=f"needs review ({len(items)} shown)")
    for column in ("sku", "name", "predicted", "confidence", "alternatives"):
        table.add_column(column)
    for item in items:
        alternatives = ", ".join(f"{t['category']} {t['p']:.2f}" for t in item.top_k[1:])
        table.add_row(
            item.sku,
            item.name[:60],
            item.predicted or "",
            f"{item.confidence:.2f}" if item.confidence is not None else "",
            alternatives,
        )
    console.print(table)
    console.print("record a verdict with: shelver review --set SKU=CATEGORY")


@app.command("demo")
def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="A labeled CSV: import it, train on it, and classify its rows."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for classification.")] = 300.0,
) -> None:
    """Run the whole event path here: services, encoders, a champion, dispatcher, worker, products.

    With SHELVER_DATABASE_URL and SHELVER_BROKER_URL unset it starts an embedded
    PostgreSQL and Valkey and stops them at the end.
    """
    from rich.live import Live

    from shelver.catalog.db import engine_for
    from shelver.catalog.migrate import upgrade
    from shelver.catalog.settings import sqlalchemy_url
    from shelver.worker import demo as steps

    settings = get_settings()
    if data is not None and not data.exists():
        raise UserError(f"{data}: no such file")
    with steps.services(settings) as (database_url, broker_url, embedded):
        where = "embedded, stopped when the demo ends" if embedded else "from your settings"
        console.print(f"[bold]1.[/bold] PostgreSQL and Redis are up ({where})")
        upgrade(database_url)
        console.print("[bold]2.[/bold] catalog schema migrated (tables, trigger, queue)")
        if not steps.encoders_ready(settings.model_dir):
            console.print("    exporting the encoders to ONNX, once (about a minute)")
            from shelver.training.encoder_export import export_encoders

            export_encoders(settings.model_dir)
        console.print(f"[bold]3.[/bold] encoders ready in {settings.model_dir}")
        engine = engine_for(sqlalchemy_url(database_url))
        image_root = data.resolve().parent if data is not None else None
        if data is not None:
            from shelver.catalog.importer import import_file
            from shelver.training.pipeline import train_and_register

            report = import_file(engine, data, progress=True)
            console.print(f"    imported {report.inserted + report.updated} rows from {data}")
            run_settings = settings.model_copy(
                update={"database_url": database_url, "image_roots": [image_root]}
            )
            outcome = train_and_register(engine, run_settings, promote="force")
            console.print(f"[bold]4.[/bold] trained {outcome.model.version} on {data}; champion")
            _print_training(outcome)
        else:
            from shelver.training.bundle import register_bundled

            record = register_bundled(engine)
            console.print(
                f"[bold]4.[/bold] champion: {record.version} (the bundled default model)"
                if record
                else "[bold]4.[/bold] the catalog already has a champion; using it"
            )
        env = steps.process_env(database_url, broker_url, settings, image_root)
        with steps.event_path(env, Path(settings.data_dir)) as running:
            console.print("[bold]5.[/bold] dispatcher and worker started")
            if data is not None:
                done = _watch_queue(steps, database_url, running, timeout)
            else:
                skus = steps.insert_demo_products(database_url)
                console.print(f"[bold]6.[/bold] inserted {len(skus)} products with plain SQL")
                with Live(console=console, refresh_per_second=4) as live:

                    def all_terminal() -> bool:
                        rows = steps.snapshot(database_url, skus)
                        live.update(_demo_table(rows))
                        if not running.alive():
                            raise UserError(f"a demo process died; see {running.log_path}")
                        return all(r.status in steps.TERMINAL for r in rows)

                    done = steps.wait_until(all_terminal, timeout)
                console.print()
                rows = steps.snapshot(database_url, skus)
                review = sum(r.status == "needs_review" for r in rows)
                console.print(
                    f"{len(rows) - review} classified automatically, {review} left for a person "
                    "(`shelver review`)"
                )
        if not done:
            raise UserError(f"not everything was classified in {timeout:.0f} s; "
                            f"see {running.log_path}")  # fmt: skip
    console.print("[bold]done.[/bold] everything the demo started is stopped.")


def _demo_table(rows) -> Table:
    table = Table(title="products, as the worker classifies them")
    table.add_column("product", max_width=26, overflow="ellipsis", no_wrap=True)
    table.add_column("category", no_wrap=True)
    table.add_column("conf.", justify="right", no_wrap=True, min_width=5)
    table.add_column("status", no_wrap=True, min_width=12)
    colours = {"classified": "green", "needs_review": "yellow", "failed": "red"}
    for r in rows:
        table.add_row(
            r.name,
            r.category or "",
            f"{r.confidence:.2f}" if r.confidence is not None else "",
            f"[{colours.get(r.status, 'white')}]{r.status}[/]",
        )
    return table


def _watch_queue(steps, database_url: str, running, timeout: float) -> bool:
    from rich.progress import Progress

    total, _ = steps.queue_depth(database_url)
    with Progress(console=console) as bar:
        task = bar.add_task("classifying imported rows", total=total)

        def drained() -> bool:
            depth, _ = steps.queue_depth(database_url)
            bar.update(task, completed=total - depth)
            if not running.alive():
                raise UserError(f"a demo process died; see {running.log_path}")
            return depth == 0

        done = steps.wait_until(drained, timeout)
    _, counts = steps.queue_depth(database_url)
    console.print("products by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return done
