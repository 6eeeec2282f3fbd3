"""Celery app and tasks, the dispatcher, the inference runtime, backfill and the CLI."""
