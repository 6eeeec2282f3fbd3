"""Workers run on onnxruntime alone: importing their inference modules pulls in no torch or TF."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_worker_inference_modules_import_neither_torch_nor_tensorflow() -> None:
    probe = (
        "import sys\n"
        "import worker.encoders, worker.images, catalog.embeddings\n"
        "heavy = sorted(m for m in ('torch', 'tensorflow', 'keras', 'sentence_transformers')"
        " if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
