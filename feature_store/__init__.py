"""Feature store: RocksDB online store, Parquet offline store, state codec (registry to come)."""
