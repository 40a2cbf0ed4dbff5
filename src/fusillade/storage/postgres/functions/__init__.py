"""Database functions of the PostgreSQL backend, one per file, installed by `migration` after the migrations."""
