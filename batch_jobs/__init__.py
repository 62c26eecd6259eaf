"""Batch jobs: ``velox train``, the Spark job that trains a model version.

Training engines (Velox ALS on the driver or on Spark tasks, Spark MLlib) all
end in a :class:`velox.trained.TrainedModel` written to the registry; the
serving tier meets this package only through the registry and the stores.
"""
