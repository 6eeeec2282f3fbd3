"""What a worker process keeps loaded: the encoders, and the champion model it swaps in place.

Encoders load once per process. The champion is looked up at most every
``model_poll_seconds``; a new one is verified and loaded *before* the old one
is dropped, so a worker never goes without a model, and an artifact that fails
its sha256 check is refused while the old champion keeps serving.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, text

from shelver.catalog.settings import Settings
from shelver.worker.encoders import ImageEncoder, TextEncoder, load_encoders
from shelver.worker.fusion import ArtifactRejected, FusionModel

log = logging.getLogger(__name__)


# Encoder runs with one intra-op thread. Measured on one thread: 512 padded tokens per text
# run were faster than the 2048 chosen for two threads, with about 40 MB of activations
# instead of 130; 4 images per run as fast as 32, with 50 MB instead of 325.
SINGLE_THREAD_BATCH_TOKENS = 512
SINGLE_THREAD_IMAGE_BATCH = 4


@dataclass(frozen=True)
class Champion:
    """The model in service: its registry row and the loaded artifact."""

    model_version_id: int
    version: str
    sha256: str
    threshold: float
    model: FusionModel

    @property
    def labels(self) -> list[str]:
        return self.model.labels


@dataclass(frozen=True)
class _Seen:
    """What the registry row looked like when we last acted on it."""

    model_version_id: int
    sha256: str
    row_version: str


CHAMPION_PROBE_SQL = text(
    """
    SELECT id, sha256, xmin::text
    FROM model_versions
    WHERE status = 'champion'
    """
)
"""Reads the champion's identity only, so an unchanged artifact is not shipped every poll.
``xmin`` changes with every UPDATE of the row, so an artifact altered in place is still
noticed; it costs nothing, where ``md5(artifact)`` hashed the whole artifact (about 80 ms
of server CPU for a 26 MB model) on every poll of every worker process."""

CHAMPION_LOAD_SQL = text(
    """
    SELECT id, version, sha256, threshold, artifact
    FROM model_versions
    WHERE id = :id
    """
)


def encoders_match(
    meta: dict, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> str | None:
    """Why a model cannot run on these encoders, or None if it can.

    A model only understands embeddings from the encoders it was trained on;
    fed another encoder's vectors it would answer confidently and wrongly.
    """
    wanted = meta.get("encoders") or {}
    loaded = {"text": text_encoder.identity, "image": image_encoder.identity}
    for kind, identity in loaded.items():
        expected = wanted.get(kind)
        if isinstance(expected, dict):
            expected = expected.get("identity")
        if expected is not None and expected != identity:
            return f"model expects {kind} encoder {expected}, this worker has {identity}"
    if meta.get("image_dim") not in (None, image_encoder.dim):
        return (
            f"model expects {meta['image_dim']}-d image embeddings, "
            f"encoder gives {image_encoder.dim}"
        )
    return None


class Runtime:
    """Encoders and the current champion of one worker process."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self._champion: Champion | None = None
        self._seen: _Seen | None = None
        self._checked_at = float("-inf")
        # A pool process forked after the main process loaded this shares its weights.
        self.loaded_by_pid = os.getpid()
        # Thread pools share one Runtime; only one of them should load a model.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, engine: Engine, settings: Settings, model_dir: Path | None = None) -> Runtime:
        text_encoder, image_encoder = load_encoders(
            model_dir or settings.model_dir, intra_op_threads=settings.ort_threads
        )
        # onnxruntime keeps a session's largest run's activations; with one thread, small
        # runs are as fast, so a worker keeps them small (docs/operations.md, Memory).
        one_thread = text_encoder.session.get_session_options().intra_op_num_threads == 1
        image_encoder.batch_size = settings.image_batch_size or (
            SINGLE_THREAD_IMAGE_BATCH if one_thread else image_encoder.batch_size
        )
        text_encoder.max_batch_tokens = settings.text_batch_tokens or (
            SINGLE_THREAD_BATCH_TOKENS if one_thread else text_encoder.max_batch_tokens
        )
        log.info(
            "encoders loaded; onnxruntime intra-op threads per session: %d",
            text_encoder.session.get_session_options().intra_op_num_threads,
        )
        return cls(engine, settings, text_encoder, image_encoder)

    def champion(self) -> Champion | None:
        """The model to classify with, looking for a new one if the last look is old enough."""
        if time.monotonic() - self._checked_at >= self.settings.model_poll_seconds:
            with self._lock:
                if time.monotonic() - self._checked_at >= self.settings.model_poll_seconds:
                    self.refresh()
        return self._champion

    def refresh(self) -> Champion | None:
        """Look at the registry now; swap in a new, verified champion if there is one."""
        self._checked_at = time.monotonic()
        with self.engine.connect() as conn:
            row = conn.execute(CHAMPION_PROBE_SQL).one_or_none()
            if row is None:
                if self._champion is not None:
                    log.warning(
                        "the registry has no champion; still serving %s", self._champion.version
                    )
                return self._champion
            seen = _Seen(row[0], row[1], row[2])
            if seen == self._seen:
                return self._champion
            loaded = conn.execute(CHAMPION_LOAD_SQL, {"id": seen.model_version_id}).one_or_none()
        self._seen = seen
        if loaded is None:  # demoted and deleted between the two reads; look again next poll
            self._seen = None
            return self._champion
        candidate = self._verify(loaded)
        if candidate is not None:
            previous = self._champion
            self._champion = candidate
            log.info(
                "champion is now %s (id %s, threshold %.3f)%s",
                candidate.version,
                candidate.model_version_id,
                candidate.threshold,
                f", replacing {previous.version}" if previous else "",
            )
        return self._champion

    def _verify(self, row) -> Champion | None:  # noqa: ANN001 - a SQLAlchemy Row
        model_version_id, version, sha256, threshold, artifact = row
        keeping = f"keeping {self._champion.version}" if self._champion else "no model in service"
        try:
            model = FusionModel.from_artifact(
                bytes(artifact), sha256, intra_op_threads=self.settings.ort_threads
            )
        except ArtifactRejected as exc:
            log.error(
                "refusing champion %s (id %s): %s; %s", version, model_version_id, exc, keeping
            )
            return None
        mismatch = encoders_match(model.meta, self.text_encoder, self.image_encoder)
        if mismatch:
            log.error("refusing champion %s: %s; %s", version, mismatch, keeping)
            return None
        return Champion(model_version_id, version, sha256, float(threshold), model)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """This process's runtime, loaded on first use (worker processes warm it up at start)."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                from shelver.catalog.db import get_engine
                from shelver.catalog.settings import get_settings

                _runtime = Runtime.load(get_engine(), get_settings())
    return _runtime


def native_threads() -> int:
    """Threads of this process, Python's and native ones (onnxruntime's pools)."""
    return len(os.listdir("/proc/self/task"))


def preload_runtime() -> Runtime | None:
    """Load this process's runtime (encoders, and the champion if PostgreSQL answers) to fork from.

    For a prefork parent: pool processes forked afterwards share the weights' pages
    copy-on-write instead of each loading its own copy (docs/operations.md). Forking keeps
    only the forking thread, so this is only safe when loading starts no thread, which is
    what one intra-op thread per session gives; it is checked, and if loading did start
    threads the runtime is dropped again (each pool process then loads its own) and that is
    logged. Returns the runtime, or None when it was dropped.
    """
    global _runtime
    before = native_threads()
    runtime = get_runtime()
    try:
        runtime.refresh()
    except Exception as exc:  # PostgreSQL not reachable: pool processes look for it
        log.warning("main process could not load the champion (%s); pool processes will", exc)
    finally:
        runtime.engine.dispose()  # no connection of this process is handed to the pool
    started = native_threads() - before
    if started:
        log.error(
            "loading the encoders started %d thread(s), which a forked pool process would not "
            "have; each pool process loads its own copy instead (run with --threads 1 to "
            "share them, or --no-preload to say so)",
            started,
        )
        _runtime = None
        return None
    # Objects made so far outlive the fork: keep the pool processes' garbage collector off
    # them, since touching an object's header copies its page into the pool process.
    gc.collect()
    gc.freeze()
    champion = runtime._champion
    log.info(
        "encoders%s loaded in the main process (pid %d); pool processes share them",
        f" and champion {champion.version}" if champion else "",
        runtime.loaded_by_pid,
    )
    return runtime


def check_encoders(model_dir: Path) -> None:
    """Raise EncoderUnavailable unless the default encoders are exported and intact.

    Reads and hashes the files without creating onnxruntime sessions, so a
    prefork parent can check before forking and leave loading to its children.
    """
    from shelver.worker.encoders import Manifest, TextPreprocessing, verify_file

    manifest = Manifest.read(model_dir)
    for name in (manifest.default_text, manifest.default_image):
        spec = manifest.encoders[name]
        verify_file(model_dir, spec.file, spec.sha256)
        if isinstance(spec.preprocessing, TextPreprocessing):
            pre = spec.preprocessing
            verify_file(model_dir, pre.tokenizer, pre.tokenizer_sha256)
