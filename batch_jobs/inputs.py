"""What a training job reads, and the rules that make it trainable.

Sources: the offline store up to a watermark (the default), a MovieLens file
or folder, or any Parquet file or folder with ``user``, ``item``, ``rating``
and ``ts`` columns. Every source becomes one Spark DataFrame of
``user, item: string; rating: double; ts: timestamp; seq: long``.

Rules, applied in Spark before anything is indexed:

* **Rejects**: a row without a user or item id (null or empty), without a
  timestamp, or whose rating is not a finite number inside the configured
  range goes to the reject output with its reason, and is counted.
* **Duplicates**: when a user rated an item more than once, the latest rating
  wins (largest ``ts``, then largest log ``seq``); the others are counted.
* **Validation split**: a fixed share of the (user, item) pairs, chosen by a
  hash of the pair and the seed, so the split is the same in every mode and
  on every cluster layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from velox.datasets import load_movielens
from velox.datasets.movielens import FORMATS
from velox.errors import DataError

COLUMNS = ("user", "item", "rating", "ts", "seq")


@dataclass
class Prepared:
    """Clean training and validation ratings, and what was set aside."""

    train: object
    """DataFrame of the training ratings."""
    validation: object
    """DataFrame of the held-out ratings."""
    rejects: object
    """DataFrame of rejected rows with a ``reason`` column."""
    rows: int
    rejected: int
    duplicates: int


def is_movielens(path: Path) -> bool:
    """A MovieLens ratings file, or a folder holding one."""
    if path.is_dir():
        return any((path / name).is_file() for name in FORMATS)
    return path.name in FORMATS or path.suffix in (".data", ".dat")


def read_source(spark, source: str | Path, *, watermark: int | None = None):
    """The observations of ``source`` as a DataFrame of :data:`COLUMNS`.

    ``watermark`` keeps offline-store rows with ``seq <= watermark``; the other
    sources have no log sequence numbers (``seq`` is null) and ignore it.
    """
    from pyspark.sql import functions as F

    path = Path(source)
    if not path.exists():
        raise DataError(f"training input {path} does not exist; check the path")
    if is_movielens(path):
        table = load_movielens(path)
        frame = spark.createDataFrame(table).withColumn("seq", F.lit(None).cast("long"))
        return frame.select(*COLUMNS)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(f"{path} holds no Parquet files; pass a store, a Parquet path or MovieLens")
    reader = spark.read.option("basePath", str(path)) if path.is_dir() else spark.read
    frame = reader.parquet(str(path))
    missing = [c for c in ("user", "item", "rating", "ts") if c not in frame.columns]
    if missing:
        raise DataError(
            f"training input {path} lacks the column(s) {', '.join(missing)}; it needs "
            "user, item, rating and ts"
        )
    logged = "seq" in frame.columns
    if not logged:
        frame = frame.withColumn("seq", F.lit(None).cast("long"))
    frame = frame.select(
        F.col("user").cast("string"),
        F.col("item").cast("string"),
        F.col("rating").cast("double"),
        F.col("ts").cast("timestamp"),
        F.col("seq").cast("long"),
    )
    if not logged:
        return frame
    if watermark is not None:
        frame = frame.where(F.col("seq") <= watermark)
    # An append that died between its files and the watermark can leave a sequence number twice.
    return frame.dropDuplicates(["seq"])


def prepare(
    frame, *, rating_min: float, rating_max: float, validation: float, seed: int
) -> Prepared:
    """Apply the rules of this module; the clean data are cached for the iterations."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rating = F.col("rating")
    reason = (
        F.when(F.col("user").isNull() | (F.length("user") == 0), "missing user")
        .when(F.col("item").isNull() | (F.length("item") == 0), "missing item")
        .when(F.col("ts").isNull(), "missing timestamp")
        .when(rating.isNull() | F.isnan(rating), "rating is not a number")
        .when(
            (rating < rating_min) | (rating > rating_max),
            f"rating outside [{rating_min:g}, {rating_max:g}]",
        )
    )
    marked = frame.withColumn("reason", reason).cache()
    rejects = marked.where(F.col("reason").isNotNull())
    valid = marked.where(F.col("reason").isNull()).drop("reason")
    latest = Window.partitionBy("user", "item").orderBy(
        F.col("ts").desc(), F.col("seq").desc_nulls_last()
    )
    ranked = valid.withColumn("_n", F.row_number().over(latest))
    clean = ranked.where(F.col("_n") == 1).drop("_n")
    held_out = (F.xxhash64("user", "item", F.lit(seed)) % 1_000_000).cast("double")
    clean = clean.withColumn("_held", F.abs(held_out) < validation * 1_000_000).cache()
    rows = marked.count()
    rejected = rejects.count()
    kept = clean.count()
    return Prepared(
        train=clean.where(~F.col("_held")).drop("_held"),
        validation=clean.where(F.col("_held")).drop("_held"),
        rejects=rejects,
        rows=rows,
        rejected=rejected,
        duplicates=rows - rejected - kept,
    )
