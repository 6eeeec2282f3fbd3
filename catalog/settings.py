"""Every Shelver setting, read from the environment (prefix ``SHELVER_``) in one place.

The README's settings table is generated from the field descriptions here, so a
setting is documented exactly once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHELVER_", env_file=None, extra="ignore")

    database_url: str | None = Field(
        None,
        description="PostgreSQL URL, e.g. postgresql://postgres@127.0.0.1:5432/shelver. "
        "Unset: `shelver demo` starts an embedded server.",
    )
    broker_url: str | None = Field(
        None, description="Redis URL of the Celery broker, e.g. redis://127.0.0.1:6379/0."
    )
    model_dir: Path = Field(
        Path("var/models"), description="Where exported encoders and their manifest live."
    )
    data_dir: Path = Field(
        Path("var/data"), description="Data directory of embedded servers and run reports."
    )
    image_roots: list[Path] = Field(
        default_factory=list,
        description="Directories local images may be read from (JSON list). Files outside "
        "them are refused. Empty: only the current directory.",
    )
    allow_url_fetch: bool = Field(False, description="Fetch http(s) image URLs at all.")
    url_allowlist: list[str] = Field(
        default_factory=list, description="Hosts image URLs may be fetched from (JSON list)."
    )
    fetch_timeout_s: float = Field(5.0, description="Timeout of one image fetch.")
    max_image_bytes: int = Field(20_000_000, description="Largest image file or download.")
    max_image_pixels: int = Field(40_000_000, description="Decompression-bomb limit.")
    batch_size: int = Field(32, description="Products per classify task.")
    batch_wait_ms: int = Field(
        200, description="How long the dispatcher waits to fill a micro-batch."
    )
    lease_seconds: int = Field(
        300, description="A claimed queue row not finished within this is claimed again."
    )
    poll_seconds: float = Field(
        2.0, description="Dispatcher's polling interval when no NOTIFY arrives."
    )
    max_attempts: int = Field(5, description="Attempts before a row ends as `failed`.")
    retry_backoff_s: float = Field(
        2.0, description="Base of the exponential retry backoff, in seconds."
    )
    target_precision: float = Field(
        0.97, description="Precision the auto-accept threshold is chosen for."
    )
    audit_rate: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Share of auto-accepted products set aside for a person to audit "
        "(0 to 1) once the champion is proven (see SHELVER_AUDIT_NEW_MODEL_DAYS).",
    )
    audit_rate_new_model: float = Field(
        0.10,
        ge=0.0,
        le=1.0,
        description="Share audited while the champion is new: its live precision is not known yet.",
    )
    audit_new_model_days: float = Field(
        7.0, ge=0.0, description="How long after its promotion a champion counts as new."
    )
    session_minutes: int = Field(
        480, gt=0, description="A web sign-in lasts this long; then the user signs in again."
    )
    promote_min_improvement: float = Field(
        0.005, description="Macro-F1 gain over the champion a candidate needs to be promoted."
    )
    promote_max_class_drop: float = Field(
        0.05, description="Largest per-class F1 drop a promoted candidate may have."
    )
    model_poll_seconds: float = Field(5.0, description="How often workers look for a new champion.")
    zero_label_merge: bool = Field(
        False,
        description="With a champion, also suggest the catalog's categories it was never "
        "trained on, from their names (docs/cold_start.md); those wait for review. Off: it "
        "cost known categories accuracy where measured. Without a champion the names are "
        "always used.",
    )
    ort_threads: int | None = Field(
        None,
        ge=1,
        description="onnxruntime intra-op threads in each worker process, for the encoders and "
        "the fusion model. Unset: `shelver worker` gives each pool process its share of the "
        "cores (`--threads` overrides).",
    )
    image_batch_size: int | None = Field(
        None,
        ge=1,
        description="Images per image-encoder run in a worker. Unset: 4 with one onnxruntime "
        "thread (as fast there as 32, and onnxruntime keeps about 50 MB of activations instead "
        "of 325), else 32.",
    )
    text_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Padded tokens per text-encoder run in a worker. Unset: 512 with one "
        "onnxruntime thread (faster there than 2048, and about 40 MB of activations instead of "
        "130), else 2048.",
    )
    retrain_cron: str = Field("0 3 * * *", description="When `shelver beat` considers retraining.")
    retrain_min_new_labels: int = Field(
        100, description="Labels added or changed since the last run needed to retrain."
    )
    adapt_min_new_products: int = Field(
        1_000,
        ge=0,
        description="At SHELVER_RETRAIN_CRON times, `shelver beat` adapts the zero-label "
        "scorer to the catalog (`shelver taxonomy adapt`) once this many products arrived "
        "since the last adaptation, or the taxonomy changed; 0: never on a schedule.",
    )
    adapt_rescore: bool = Field(
        True,
        description="After a scheduled adaptation, with no champion, re-score the "
        "suggestions waiting for review (`shelver backfill --suggestions`): people see the "
        "adapted scorer's. Off: they keep the old suggestion until a backfill.",
    )

    def require_database_url(self) -> str:
        """The database URL in SQLAlchemy form, with the psycopg2 driver made explicit."""
        if not self.database_url:
            raise SettingsError(
                "SHELVER_DATABASE_URL is not set. Point it at PostgreSQL, e.g. "
                "export SHELVER_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/shelver"
            )
        return sqlalchemy_url(self.database_url)

    def require_broker_url(self) -> str:
        if not self.broker_url:
            raise SettingsError(
                "SHELVER_BROKER_URL is not set. Point it at Redis, e.g. "
                "export SHELVER_BROKER_URL=redis://127.0.0.1:6379/0"
            )
        return self.broker_url


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; Shelver ships psycopg2."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg2://" + url[len(plain) :]
    return url


def libpq_url(url: str) -> str:
    """The same URL as libpq (psql, psycopg2.connect) spells it."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


class SettingsError(RuntimeError):
    """A setting is missing or invalid; the message says which and how to set it."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings, so the next call re-reads the environment."""
    get_settings.cache_clear()
