"""Worker failures a user fixes, importable without onnxruntime.

The CLI shows them as one plain line from any command, and ``shelver status`` or
``shelver import`` must not load the inference stack just to know their type.
"""

from __future__ import annotations


class EncoderUnavailable(RuntimeError):
    """The exported encoders are missing, altered or unreadable; the message says how to fix it."""
