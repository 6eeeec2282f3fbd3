"""``python -m shelver.worker`` runs the ``shelver`` command line."""

from shelver.worker.cli import main

main()
