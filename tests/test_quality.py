"""Quality on MovieLens 100K against Spark MLlib ALS, each at its tuned setting.

The tuning itself (each engine's grid on a validation split) is the
benchmark's, ``python -m benchmarks.quality``; this test repeats its last
step at the settings the recorded run chose, so it fits the test run's time.
"""

from __future__ import annotations

from benchmarks.quality import picked


def test_velox_beats_the_target_and_mllib_at_their_tuned_settings(ml100k, spark):
    velox, mllib = picked(ml100k, spark)
    assert velox <= 0.910, velox
    assert velox <= mllib, (velox, mllib)
