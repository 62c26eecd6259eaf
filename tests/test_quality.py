"""Quality on MovieLens 100K against Spark MLlib ALS, both tuned on a validation split."""

from __future__ import annotations

from benchmarks.quality import compare


def test_velox_beats_the_target_and_mllib_tuned_the_same_way(ml100k, spark):
    velox, mllib = compare(ml100k, spark)
    assert (velox.engine, mllib.engine) == ("velox", "mllib")
    assert velox.test_rmse <= 0.910, velox
    assert velox.test_rmse <= mllib.test_rmse, (velox, mllib)
