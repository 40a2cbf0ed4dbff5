"""Storage: the role protocols (`storage.base`) and their SQLite and PostgreSQL backends."""
