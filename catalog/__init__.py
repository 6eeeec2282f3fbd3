"""The system of record: settings, database access, queue SQL, importers; schema in migrations/."""
