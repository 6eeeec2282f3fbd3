"""Odd and hostile images: each is either normalized to upright RGB or refused with its reason."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shelver.catalog.settings import Settings
from shelver.worker.images import ImageRejected, load_image


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def settings(root: Path) -> Settings:
    return Settings(image_roots=[root], max_image_bytes=2_000_000, max_image_pixels=4_000_000)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A gradient, so JPEG has real entropy to lose when cut short."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


def write(root: Path, name: str, data: bytes) -> str:
    (root / name).write_bytes(data)
    return name


def rejected(uri: str, settings: Settings) -> str:
    with pytest.raises(ImageRejected) as info:
        load_image(uri, settings)
    assert info.value.message  # people get a sentence, not just a code
    return info.value.reason


# --- refused ---------------------------------------------------------------------------------


def test_empty_file_is_refused(root: Path, settings: Settings) -> None:
    assert rejected(write(root, "empty.jpg", b""), settings) == "empty"


def test_text_file_is_not_an_image(root: Path, settings: Settings) -> None:
    assert rejected(write(root, "notes.jpg", b"name,price\nlamp,12\n"), settings) == "not_an_image"


def test_truncated_jpeg_is_refused(root: Path, settings: Settings) -> None:
    data = encode(photo((256, 256)), "JPEG", quality=95)
    assert rejected(write(root, "cut.jpg", data[: len(data) // 2]), settings) == "truncated"


def test_truncated_png_is_refused(root: Path, settings: Settings) -> None:
    data = encode(photo((256, 256)), "PNG")
    assert rejected(write(root, "cut.png", data[: len(data) // 2]), settings) == "truncated"


def test_corrupt_png_data_is_refused(root: Path, settings: Settings) -> None:
    data = bytearray(encode(photo((128, 128)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 40] = b"\xff" * 32  # garbage inside the compressed stream
    assert rejected(write(root, "corrupt.png", bytes(data)), settings) in ("corrupt", "truncated")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming a huge 1-bit canvas: a few hundred bytes that would inflate to gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_bomb_is_refused_before_decoding(root: Path, settings: Settings) -> None:
    data = png_header_only(50_000, 50_000)
    assert len(data) < 1_000
    assert rejected(write(root, "bomb.png", data), settings) == "decompression_bomb"


@pytest.fixture
def root_settings_small(root: Path) -> Settings:
    return Settings(image_roots=[root], max_image_bytes=1_000, max_image_pixels=10_000)


def test_image_over_the_pixel_limit_is_refused(root: Path, root_settings_small: Settings) -> None:
    uri = write(root, "big.png", encode(Image.new("L", (300, 300)), "PNG"))
    assert rejected(uri, root_settings_small) == "decompression_bomb"


def test_file_over_the_byte_limit_is_refused(root: Path, root_settings_small: Settings) -> None:
    uri = write(root, "heavy.jpg", encode(photo((64, 64)), "JPEG", quality=100))
    assert rejected(uri, root_settings_small) == "too_large"


def test_format_outside_the_allowlist_is_refused(root: Path, settings: Settings) -> None:
    # Pillow decodes PCX fine; we still do not hand hostile bytes to rarely-used decoders.
    assert rejected(write(root, "old.pcx", encode(photo(), "PCX")), settings) == "not_an_image"


def test_parent_traversal_is_outside_root(root: Path, settings: Settings) -> None:
    (root.parent / "secret.jpg").write_bytes(encode(photo(), "JPEG"))
    assert rejected("../secret.jpg", settings) == "outside_root"
    assert rejected("sub/../../secret.jpg", settings) == "outside_root"


def test_absolute_path_outside_root_is_refused(root: Path, settings: Settings) -> None:
    outside = root.parent / "elsewhere.jpg"
    outside.write_bytes(encode(photo(), "JPEG"))
    assert rejected(str(outside), settings) == "outside_root"
    assert rejected(outside.as_uri(), settings) == "outside_root"


def test_symlink_escaping_the_root_is_refused(root: Path, settings: Settings) -> None:
    outside = root.parent / "target.jpg"
    outside.write_bytes(encode(photo(), "JPEG"))
    (root / "innocent.jpg").symlink_to(outside)
    assert rejected("innocent.jpg", settings) == "outside_root"


def test_symlinked_directory_escaping_the_root_is_refused(root: Path, settings: Settings) -> None:
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.jpg").write_bytes(encode(photo(), "JPEG"))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    assert rejected("linked/a.jpg", settings) == "outside_root"


def test_missing_file_is_not_found(settings: Settings) -> None:
    assert rejected("nowhere/123.jpg", settings) == "not_found"


def test_directory_is_not_a_file(root: Path, settings: Settings) -> None:
    (root / "folder.jpg").mkdir()
    assert rejected("folder.jpg", settings) == "not_a_file"


def test_empty_uri_is_invalid(settings: Settings) -> None:
    assert rejected("   ", settings) == "invalid_uri"


def test_unknown_scheme_is_refused(settings: Settings) -> None:
    assert rejected("ftp://example.com/a.jpg", settings) == "unsupported_scheme"


def test_url_is_not_fetched_while_fetching_is_disabled(settings: Settings) -> None:
    assert rejected("https://cdn.example.com/a.jpg", settings) == "url_fetch_disabled"


def test_url_host_outside_allowlist_is_refused(root: Path) -> None:
    settings = Settings(image_roots=[root], allow_url_fetch=True, url_allowlist=["cdn.example.com"])
    assert rejected("https://evil.example.net/a.jpg", settings) == "host_not_allowed"


# --- fetched over http -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A local HTTP server: a photo, a redirect off the allowlist, and an oversized body."""
    payload = encode(photo(), "JPEG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/photo.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header(
                    "Location", f"http://localhost:{self.server.server_port}/photo.jpg"
                )
                self.end_headers()
            elif self.path == "/huge":
                self.send_response(200)
                self.end_headers()  # no Content-Length: the cap must hold while reading
                self.wfile.write(b"\xff" * 5_000_000)
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fetch_settings(root: Path) -> Settings:
    return Settings(
        image_roots=[root],
        allow_url_fetch=True,
        url_allowlist=["127.0.0.1"],
        fetch_timeout_s=5,
        max_image_bytes=1_000_000,
    )


def test_allowlisted_url_is_fetched(image_server: str, fetch_settings: Settings) -> None:
    image = load_image(f"{image_server}/photo.jpg", fetch_settings)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_redirect_off_the_allowlist_is_refused(image_server: str, fetch_settings: Settings) -> None:
    assert rejected(f"{image_server}/redirect", fetch_settings) == "host_not_allowed"


def test_download_over_the_byte_limit_is_refused(
    image_server: str, fetch_settings: Settings
) -> None:
    assert rejected(f"{image_server}/huge", fetch_settings) == "too_large"


def test_http_error_is_reported(image_server: str, fetch_settings: Settings) -> None:
    assert rejected(f"{image_server}/missing.jpg", fetch_settings) == "http_error"


# --- accepted and normalized -----------------------------------------------------------------


def test_plain_path_and_file_uri_load_as_rgb(root: Path, settings: Settings) -> None:
    write(root, "ok.jpg", encode(photo(), "JPEG"))
    assert load_image("ok.jpg", settings).mode == "RGB"
    assert load_image((root / "ok.jpg").as_uri(), settings).size == (64, 48)


def test_symlink_inside_the_root_is_followed(root: Path, settings: Settings) -> None:
    write(root, "real.png", encode(photo(), "PNG"))
    (root / "alias.png").symlink_to(root / "real.png")
    assert load_image("alias.png", settings).size == (64, 48)


def test_cmyk_jpeg_becomes_rgb(root: Path, settings: Settings) -> None:
    uri = write(root, "cmyk.jpg", encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"))
    image = load_image(uri, settings)
    r, g, b = image.getpixel((16, 16))
    assert image.mode == "RGB" and r > 200 and g < 60 and b < 60  # still red


def test_palette_transparency_is_flattened_onto_white(root: Path, settings: Settings) -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    loaded = load_image(write(root, "p.png", encode(image, "PNG", transparency=0)), settings)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)


def test_palette_without_transparency_keeps_its_colours(root: Path, settings: Settings) -> None:
    image = photo().convert("P", palette=Image.Palette.ADAPTIVE)
    loaded = load_image(write(root, "p.gif", encode(image, "GIF")), settings)
    assert loaded.mode == "RGB" and loaded.size == (64, 48)


def test_grey_with_alpha_becomes_rgb(root: Path, settings: Settings) -> None:
    image = Image.new("LA", (8, 8), (100, 255))
    loaded = load_image(write(root, "la.png", encode(image, "PNG")), settings)
    assert loaded.mode == "RGB" and loaded.getpixel((4, 4)) == (100, 100, 100)


def test_sixteen_bit_grey_keeps_its_tones(root: Path, settings: Settings) -> None:
    image = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    loaded = load_image(write(root, "deep.png", encode(image, "PNG")), settings)
    r, g, b = loaded.getpixel((0, 0))
    assert loaded.mode == "RGB" and 120 <= r <= 135 and r == g == b  # mid grey, not clipped white


def test_animated_gif_uses_its_first_frame(root: Path, settings: Settings) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    loaded = load_image(write(root, "anim.gif", data), settings)
    r, g, b = loaded.getpixel((8, 8))
    assert loaded.mode == "RGB" and r > 200 and b < 60


def test_exif_orientation_is_applied(root: Path, settings: Settings) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    uri = write(root, "sideways.jpg", encode(photo((80, 40)), "JPEG", exif=exif))
    assert load_image(uri, settings).size == (40, 80)


def test_relative_paths_resolve_against_every_root(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    (second / "images").mkdir(parents=True)
    (second / "images" / "1.jpg").write_bytes(encode(photo(), "JPEG"))
    settings = Settings(image_roots=[first, second])
    assert load_image("images/1.jpg", settings).size == (64, 48)
