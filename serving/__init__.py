"""The serving tier: the HTTP API of DESIGN.md section 5 over the durable online model.

* :mod:`serving.app` — ``create_app`` and the routes; :mod:`serving.http` what
  every route shares (tokens, JSON errors, request metrics).
* :mod:`serving.schemas` — request bodies, decoded and checked;
  :mod:`serving.openapi` — the OpenAPI document generated from them.
* :mod:`serving.observe` and :mod:`serving.batcher` — micro-batches, group
  commit, idempotency keys.
* :mod:`serving.deadline` — the deadline policy of reads (degraded answers).
* :mod:`serving.versions` — which version serves: the registry's pointer,
  followed live.
* :mod:`serving.metrics` — the Prometheus metrics.
* :mod:`serving.cli` and :mod:`serving.models_cli` — ``velox serve`` and
  ``velox models``.
"""
