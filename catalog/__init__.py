"""The system of record: settings, database access, ORM models, queue SQL and importers."""
