"""The PostgreSQL backend (asyncpg): `store.PostgresStorage` and its schema in `migrations/`."""
