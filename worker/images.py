"""Safe loading of product images: confinement to image roots, opt-in URL fetching, size and
decompression-bomb limits, and normalization of every decodable image to upright RGB.

Anything that cannot be loaded raises ImageRejected with a short machine-readable reason; the
worker then classifies the product from its text alone and records the reason.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shelver.catalog.images import RootCheck, confine, image_roots

log = logging.getLogger(__name__)

# Formats a product photo plausibly comes in. Pillow can open more (EPS, for one, shells out to
# Ghostscript), and a hostile upload should not get to choose the decoder.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# Where transparency is flattened onto: product shots are shown on white.
BACKGROUND = (255, 255, 255)

REASONS = (
    "invalid_uri",
    "unsupported_scheme",
    "outside_root",
    "not_found",
    "not_a_file",
    "unreadable",
    "too_large",
    "empty",
    "url_fetch_disabled",
    "host_not_allowed",
    "fetch_failed",
    "http_error",
    "not_an_image",
    "decompression_bomb",
    "truncated",
    "corrupt",
    "unsupported_mode",
    # Not a refusal we foresaw: a bug in a decoder, say. Logged with its traceback.
    "unexpected_error",
)


class ImageSettings(Protocol):
    """The part of catalog.settings.Settings this module reads."""

    image_roots: list[Path]
    allow_url_fetch: bool
    url_allowlist: list[str]
    fetch_timeout_s: float
    max_image_bytes: int
    max_image_pixels: int


class ImageRejected(Exception):
    """An image that will not be used; ``reason`` is one of REASONS, the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class ImageUsage:
    """Of some rows: how many gave the model an image, and why the others did not.

    Training, evaluation and the worker all count with this, so a fusion model that
    quietly became a text model (every image refused) is visible wherever images are read.
    """

    rows: int = 0
    usable: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    roots: RootCheck = field(default_factory=lambda: RootCheck([]))

    @classmethod
    def count(
        cls,
        uris: Sequence[str | None],
        usable: Sequence[bool],
        refusals: Sequence[ImageRejected | None],
        settings: ImageSettings,
    ) -> ImageUsage:
        """Usage of rows given, per row, the image reference, whether its image was used,
        and the refusal when one was raised."""
        usage = cls(len(uris), sum(bool(u) for u in usable), roots=RootCheck(settings.image_roots))
        usage.refused.update(refusal.reason for refusal in refusals if refusal is not None)
        for uri in uris:
            usage.roots.add(uri)
        return usage

    def __add__(self, other: ImageUsage) -> ImageUsage:
        return ImageUsage(
            self.rows + other.rows,
            self.usable + other.usable,
            self.refused + other.refused,
            self.roots.merge(other.roots),
        )

    @property
    def without_image(self) -> int:
        return self.rows - self.usable - self.refused.total()

    @property
    def all_refused(self) -> bool:
        """Images were given and not one could be used: the model saw text alone."""
        return self.usable == 0 and self.refused.total() > 0

    @property
    def roots_setting(self) -> str | None:
        """The SHELVER_IMAGE_ROOTS that would admit the images refused as outside the roots."""
        return self.roots.setting() if self.refused["outside_root"] else None

    def text_only_warning(self) -> str | None:
        """The one line to show when every image was refused, with the fix if there is one."""
        if not self.all_refused:
            return None
        line = (
            f"every image was refused ({self.refused.total()} of {self.rows} rows: "
            f"{_by_reason(self.refused)}); the model saw text alone"
        )
        if self.roots_setting:
            line += f"; to let the images outside the roots in, set {self.roots_setting}"
        return line

    def describe(self) -> str:
        """One sentence for people, e.g. "3 of 10 rows had a usable image; 7 refused
        (outside_root 7)"."""
        line = f"{self.usable} of {self.rows} rows had a usable image"
        if self.refused:
            line += f"; {self.refused.total()} refused ({_by_reason(self.refused)})"
        if self.without_image:
            line += f"; {self.without_image} had none"
        return line

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "usable": self.usable,
            "without_image": self.without_image,
            "refused": dict(self.refused.most_common()),
            "all_refused": self.all_refused,
            "roots_setting": self.roots_setting,
        }


def _by_reason(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())


def load_image(uri: str, settings: ImageSettings) -> Image.Image:
    """Load the image at ``uri`` (a path, file:// or, if allowed, http(s) URL) as RGB."""
    data = read_image_bytes(uri, settings)
    return decode_image(data, settings.max_image_pixels)


def read_image_bytes(uri: str, settings: ImageSettings) -> bytes:
    uri = (uri or "").strip()
    if not uri or "\x00" in uri:
        raise ImageRejected("invalid_uri", f"not a usable image reference: {uri!r}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_url(uri, settings)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ImageRejected("invalid_uri", f"file URI on another host: {uri}")
        return _read_local(Path(unquote(parts.path)), settings)
    # A one-letter "scheme" is a Windows drive, anything else is a protocol we do not speak.
    if scheme and len(scheme) > 1:
        raise ImageRejected("unsupported_scheme", f"cannot load {scheme}:// image URIs")
    return _read_local(Path(uri), settings)


def resolve_local(path: Path, settings: ImageSettings) -> Path:
    """The real path of ``path`` if it lies inside an image root, symlinks followed."""
    inside = confine(path, image_roots(settings.image_roots))
    if not inside:
        raise ImageRejected("outside_root", f"{path} is outside the configured image roots")
    for candidate in inside:
        if candidate.exists():
            return candidate
    raise ImageRejected("not_found", f"no image file at {path}")


def _read_local(path: Path, settings: ImageSettings) -> bytes:
    real = resolve_local(path, settings)
    try:
        # O_NOFOLLOW: the checked path must not be swapped for a link between check and open.
        # O_NONBLOCK: opening a FIFO (or a device) would otherwise block the worker until
        # someone writes to it; with it the open returns and fstat below refuses the file.
        fd = os.open(
            real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except FileNotFoundError as exc:
        raise ImageRejected("not_found", f"no image file at {path}") from exc
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot open {path}: {exc.strerror}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageRejected("not_a_file", f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > settings.max_image_bytes:
            raise ImageRejected(
                "too_large", f"{path} has {info.st_size} bytes, limit {settings.max_image_bytes}"
            )
        # Read one byte past the limit: a file that grew since fstat is still caught.
        data = fh.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise ImageRejected("too_large", f"{path} exceeds {settings.max_image_bytes} bytes")
    if not data:
        raise ImageRejected("empty", f"{path} is an empty file")
    return data


def _host_allowed(host: str | None, settings: ImageSettings) -> bool:
    allowed = {h.strip().lower().rstrip(".") for h in settings.url_allowlist}
    return bool(host) and host.lower().rstrip(".") in allowed


class _AllowlistRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to an allowlisted http(s) host, or the allowlist means nothing."""

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        target = urlsplit(newurl)
        if target.scheme not in ("http", "https") or not _host_allowed(
            target.hostname, self.settings
        ):
            raise ImageRejected("host_not_allowed", f"redirect to {newurl} is not allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_url(url: str, settings: ImageSettings) -> bytes:
    if not settings.allow_url_fetch:
        raise ImageRejected(
            "url_fetch_disabled",
            f"not fetching {url}: URL fetching is off (set SHELVER_ALLOW_URL_FETCH=true and "
            "SHELVER_URL_ALLOWLIST to enable it)",
        )
    host = urlsplit(url).hostname
    if not _host_allowed(host, settings):
        raise ImageRejected(
            "host_not_allowed", f"host {host!r} is not in SHELVER_URL_ALLOWLIST; not fetching {url}"
        )
    opener = urllib.request.build_opener(_AllowlistRedirects(settings))
    request = urllib.request.Request(url, headers={"User-Agent": "shelver-image-fetch"})
    limit = settings.max_image_bytes
    try:
        with opener.open(request, timeout=settings.fetch_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ImageRejected("too_large", f"{url} declares {declared} bytes, limit {limit}")
            data = response.read(limit + 1)
    except ImageRejected:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageRejected("http_error", f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        raise ImageRejected("fetch_failed", f"cannot fetch {url}: {exc}") from exc
    if len(data) > limit:
        raise ImageRejected("too_large", f"{url} sent more than {limit} bytes")
    if not data:
        raise ImageRejected("empty", f"{url} sent an empty body")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes into an upright RGB image, refusing bombs, truncation and non-images."""
    if not data:
        raise ImageRejected("empty", "no image bytes")
    with warnings.catch_warnings():
        # Pillow only warns below twice its own limit; make that an error like ours.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            # Checked on the header, before a single pixel is decompressed.
            if width * height > max_pixels:
                raise ImageRejected(
                    "decompression_bomb",
                    f"{width}x{height} is {width * height} pixels, limit {max_pixels}",
                )
            if width < 1 or height < 1:
                raise ImageRejected("corrupt", f"image has no pixels ({width}x{height})")
            # Animated images: the first frame is the product shot; only it is decoded.
            image.seek(0)
            image.load()
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("decompression_bomb", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageRejected("not_an_image", "bytes are not a supported image format") from exc
        except EOFError as exc:
            raise ImageRejected("truncated", "image data ends early") from exc
        except OSError as exc:
            reason = "truncated" if "truncated" in str(exc) else "corrupt"
            raise ImageRejected(reason, f"cannot decode image: {exc}") from exc
        except (SyntaxError, ValueError, TypeError, IndexError, MemoryError) as exc:
            # Pillow's plugins signal malformed headers with all of these.
            raise ImageRejected("corrupt", f"cannot decode image: {exc}") from exc
    return to_rgb(_upright(image))


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not cost us a good photo
        log.debug("ignoring unusable EXIF orientation: %s", exc)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, flattening transparency onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion clips these at 255, turning most 16-bit photos white.
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        eight_bit = np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageRejected("unsupported_mode", f"cannot convert {mode} to RGB") from exc
