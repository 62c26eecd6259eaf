"""Feature store: where Velox keeps what it learns, under one data folder.

* ``online/``: the RocksDB online store (:mod:`feature_store.online`, with a
  module per concern: log, checkpoints, rated, receipts, forget, retention,
  log_reader)
  and the crash-safe model over it (:mod:`feature_store.durable`);
* ``offline/``: the Parquet offline store of exported observations
  (:mod:`feature_store.offline`);
* ``registry/``: the model registry of trained versions
  (:mod:`feature_store.registry`), and serving a version over the online
  store (:mod:`feature_store.versions`);
* backups, restores and ``velox store`` (:mod:`feature_store.backup`,
  :mod:`feature_store.cli`); the binary records (:mod:`feature_store.codec`).
"""
