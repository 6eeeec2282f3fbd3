"""Where local product images may be read from, and how a refused image is recorded.

Judged on paths alone, without opening a file, so the catalog core (``shelver import``,
``shelver status``) can say which images will be refused, and what setting lets them in,
without Pillow. ``shelver.worker.images`` confines every read with the same functions.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import Connection, text

IMAGE_NOT_USED = "image not used: "
"""How ``products.error`` begins when a product was classified without its image. The
refusal reason (one of ``shelver.worker.images.REASONS``) follows, then ``: `` and a message
for people; ``shelver status`` counts refusals by that reason."""

IMAGE_NOT_USED_PATTERN = r"image not used: ([a-z_]+)"
"""The reason, as a PostgreSQL regular expression capture (failures quote the note inside
their own message, so it is searched for, not anchored)."""


def image_not_used(reason: str, message: str) -> str:
    return f"{IMAGE_NOT_USED}{reason}: {message}"


REFUSED_SQL = text(
    """
    SELECT substring(error FROM :pattern) AS reason, count(*)
    FROM products
    WHERE error ~ :pattern
    GROUP BY 1
    ORDER BY 2 DESC, 1
    """
)
"""Products whose image was refused at their last classification, by reason. A plain read;
a sequential scan of ``products`` like the status counts beside it."""


def refused_images(conn: Connection) -> dict[str, int]:
    """Reason -> products whose image was refused when they were last classified."""
    rows = conn.execute(REFUSED_SQL, {"pattern": IMAGE_NOT_USED_PATTERN}).all()
    return {reason: count for reason, count in rows}


def image_roots(configured: Sequence[Path]) -> list[Path]:
    """The directories local images may be read from, symlinks resolved.

    None configured (the default ``SHELVER_IMAGE_ROOTS``) means the current directory.
    """
    return [Path(root).resolve() for root in configured or [Path.cwd()]]


def confine(path: Path, roots: Sequence[Path]) -> list[Path]:
    """Where ``path`` really leads, for each root it would lie inside; empty when outside all.

    A relative path is tried against every root. ``resolve()`` follows every symlink, so
    ``../`` and a link pointing out of a root are judged by where they lead, not by how the
    path is spelled.
    """
    candidates = [(path if path.is_absolute() else root / path).resolve() for root in roots]
    return [c for c in candidates if any(c.is_relative_to(root) for root in roots)]


def roots_setting(roots: Sequence[Path]) -> str:
    """The shell assignment that sets SHELVER_IMAGE_ROOTS to ``roots``, as settings.py parses it."""
    return "SHELVER_IMAGE_ROOTS=" + shlex.quote(json.dumps([str(root) for root in roots]))


@dataclass
class RootCheck:
    """Image references checked against the image roots (paths only, nothing read).

    ``setting()`` is what would let every checked local image in: the roots configured
    now, plus the narrowest directory holding the ones outside them.
    """

    configured: Sequence[Path]
    local: int = 0
    outside: int = 0
    outside_dirs: set[Path] = field(default_factory=set)
    inside_default_root: bool = False

    def __post_init__(self) -> None:
        self.roots = image_roots(self.configured)

    def add(self, uri: str | None) -> None:
        """Count ``uri`` if it names a local file (a path or file:// URI)."""
        path = _local_path(uri)
        if path is None:
            return
        self.local += 1
        if confine(path, self.roots):
            self.inside_default_root = self.inside_default_root or not self.configured
            return
        self.outside += 1
        real = (path if path.is_absolute() else self.roots[0] / path).resolve()
        self.outside_dirs.add(real.parent)

    def merge(self, other: RootCheck) -> RootCheck:
        """Both checks together, against the same roots (an empty check takes the other's)."""
        merged = RootCheck(self.configured or other.configured)
        merged.local = self.local + other.local
        merged.outside = self.outside + other.outside
        merged.outside_dirs = self.outside_dirs | other.outside_dirs
        merged.inside_default_root = self.inside_default_root or other.inside_default_root
        return merged

    def setting(self) -> str | None:
        """The SHELVER_IMAGE_ROOTS that admits every image checked, or None if all are in."""
        if not self.outside:
            return None
        # Setting the variable replaces the default (the current directory): keep it when
        # some of these images were found there.
        kept = list(self.roots) if self.configured or self.inside_default_root else []
        return roots_setting(kept + _covering(self.outside_dirs))


def _local_path(uri: str | None) -> Path | None:
    """The file a reference names, read as ``shelver.worker.images`` reads it; None if not one."""
    uri = (uri or "").strip()
    if not uri or "\x00" in uri:
        return None
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return Path(unquote(parts.path)) if parts.netloc in ("", "localhost") else None
    # A one-letter "scheme" is a Windows drive.
    return None if len(scheme) > 1 else Path(uri)


def _covering(dirs: set[Path]) -> list[Path]:
    """One directory holding all of ``dirs``, unless that would be the filesystem root."""
    common = Path(os.path.commonpath([str(d) for d in dirs]))
    if common != Path(common.anchor):
        return [common]
    # Widening to / would let every file in; name each directory instead.
    return sorted(d for d in dirs if not any(d.is_relative_to(o) and d != o for o in dirs))
