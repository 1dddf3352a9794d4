"""rocksdict-backed online feature store."""
