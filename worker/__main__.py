"""``python -m worker`` runs the ``shelver`` command line."""

from worker.cli import main

main()
