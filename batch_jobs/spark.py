"""The SparkSession of a job: Java checked first, settings from ``conf/`` and the command line.

Spark's own failure when Java is missing or too old is a page of JVM output;
:func:`check_java` says it in one sentence before the JVM starts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from velox.errors import ConfigError

log = logging.getLogger(__name__)

SPARK_DEFAULTS = Path("conf/spark-defaults.conf")
JAVA_VERSIONS = (17, 21)
"""Java releases Spark 4 runs on."""


def java_command() -> str | None:
    """The ``java`` Spark will start: ``$JAVA_HOME/bin/java``, else the one on ``PATH``."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if candidate.is_file() else None
    return shutil.which("java")


def check_java() -> int:
    """The Java major version; :class:`ConfigError` when there is none or it is unsupported."""
    java = java_command()
    wanted = " or ".join(str(v) for v in JAVA_VERSIONS)
    if java is None:
        where = f"JAVA_HOME={os.environ['JAVA_HOME']}" if "JAVA_HOME" in os.environ else "PATH"
        raise ConfigError(
            f"no Java found (looked in {where}); Spark needs Java {wanted}: install it "
            "or point JAVA_HOME at it"
        )
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{java} could not be run ({exc}); check the Java install") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if match is None:
        raise ConfigError(f"could not read the version of {java}; Spark needs Java {wanted}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major not in JAVA_VERSIONS:
        raise ConfigError(
            f"{java} is Java {major}, but Spark needs Java {wanted}; install one of them "
            "and point JAVA_HOME at it"
        )
    return major


def read_spark_defaults(path: Path = SPARK_DEFAULTS) -> dict[str, str]:
    """``key value`` lines of a spark-defaults file (absent file: no settings)."""
    settings: dict[str, str] = {}
    if not path.is_file():
        return settings
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if not key.startswith("spark.") or not value.strip():
            raise ConfigError(f"{path}:{number}: expected 'spark.<key> <value>', got {line!r}")
        settings[key] = value.strip()
    return settings


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """``spark.key=value`` strings from the command line."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("spark."):
            raise ConfigError(f"--conf {pair!r} is not of the form spark.<key>=<value>")
        settings[key] = value
    return settings


def spark_session(master: str | None, settings: Mapping[str, str], app: str = "velox-train"):
    """Start (or, under ``spark-submit``, join) the session with ``settings`` applied.

    ``master`` is ignored when ``spark-submit`` already chose one. Local
    workers run this interpreter, so they see the same packages.
    """
    check_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app)
    if master and "spark.master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        builder = builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    log.info("Spark %s, master %s", session.version, session.sparkContext.master)
    return session
