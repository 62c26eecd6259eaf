"""Feature store: online RocksDB store, offline Parquet store, model registry (not built yet)."""
