"""A PostgreSQL backend of the test suite's own: proves the replica monitor connects through it."""
