"""Configuration: typed sections, validated, with precedence file < environment < CLI.

Each section is a frozen dataclass whose fields carry their documentation and
constraints, so the schema is declared once and drives validation, error
messages and the ``velox config`` listing. ``conf/velox.toml`` is the commented
copy of the defaults (a test keeps the two in step).

Environment variables are ``VELOX_<SECTION>__<KEY>`` (for example
``VELOX_TRAIN__RANK=64``); CLI overrides are ``section.key=value`` strings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from croniter import croniter

from velox.errors import ConfigError

ENV_PREFIX = "VELOX_"
DEFAULT_CONFIG_PATH = Path("conf/velox.toml")


def setting(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """Declare a setting: its default, what it means, and the values allowed.

    ``check`` covers a rule that bounds and choices cannot state: it returns
    what is wrong with a value (the end of a sentence), or None when it fits.
    """
    return field(
        default=default,
        metadata={
            "doc": doc,
            "low": low,
            "high": high,
            "low_open": low_open,
            "choices": choices,
            "check": check,
        },
    )


def cron_problem(expression: str) -> str | None:
    """Why ``expression`` is not a cron schedule croniter can follow; None when it is (or empty)."""
    if not expression.strip() or croniter.is_valid(expression):
        return None
    return (
        "is not a cron expression; write five fields (minute hour day month weekday) "
        "like '0 3 * * *', or leave it empty for no schedule"
    )


@dataclass(frozen=True)
class DataConfig:
    """Where Velox keeps its state."""

    dir: str = setting("data", "Data folder; the RocksDB and Parquet stores live under it.")


@dataclass(frozen=True)
class ModelConfig:
    """The per-user online model; its feature dimension is the served version's (``train.rank``).

    The defaults of this section and of ``[train]`` are the settings that won
    ``velox evaluate --tune`` on MovieLens 100K's training part, in time order
    (``benchmarks/defaults.py``, recorded in ``benchmarks/RESULTS.md``).
    """

    regularization: float = setting(
        5.0,
        "Ridge lambda of a new user's prior (A_u starts at lambda * I); keep it at "
        "train.user_regularization, the prior a trained user had.",
        low=0.0,
        low_open=True,
    )
    prior: str = setting(
        "mean",
        "Prior mean w0 of a new user: mean of known users, or zero.",
        choices=("mean", "zero"),
    )
    forgetting: float = setting(
        1.0,
        "Forgetting factor gamma in (0, 1]; 1 keeps every observation.",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    bias_drift: float = setting(
        0.003,
        "Variance of the random walk a user's bias takes before each of the user's "
        "observations (0: none).",
        low=0.0,
    )
    dtype: str = setting(
        "float64", "Floating type of user states and features.", choices=("float64", "float32")
    )
    bias_regularization: float = setting(
        10.0, "Pseudo-count pulling an item's online bias to its trained value.", low=0.0
    )
    bias_count_weight: float = setting(
        1.0,
        "Pseudo-observations per training rating of an item behind its trained bias "
        "(added to bias_regularization).",
        low=0.0,
    )
    mean_regularization: float = setting(
        100.0,
        "Pseudo-count of the global mean when the model has no training count.",
        low=0.0,
        low_open=True,
    )
    foldin_regularization: float = setting(
        1.0,
        "Ridge lambda of the online fold-in of items the model does not know.",
        low=0.0,
        low_open=True,
    )
    refactor_interval: int = setting(
        1000, "Re-factorise a user's state from its exact statistics every N updates.", low=1
    )


@dataclass(frozen=True)
class ComputeConfig:
    """Which array library runs the kernels."""

    device: str = setting(
        "auto",
        "auto: CuPy when it imports and sees a GPU, else NumPy; cpu; gpu (error if none).",
        choices=("auto", "cpu", "gpu"),
    )


@dataclass(frozen=True)
class StoreConfig:
    """The online store: user-state cache and checkpoints."""

    cache_users: int = setting(
        100_000, "User states held in memory; least recently used clean ones are evicted.", low=1
    )
    checkpoint_interval: float = setting(
        10.0,
        "Seconds between background write-backs of changed states (0: only on eviction and exit).",
        low=0.0,
    )
    state_dtype: str = setting(
        "float64",
        "Precision of stored user states: float64 (exact) or float32 (half the disk).",
        choices=("float64", "float32"),
    )


@dataclass(frozen=True)
class RegistryConfig:
    """The model registry: how many versions stay ready to roll back to."""

    keep: int = setting(
        3,
        "Newest ready versions kept besides the active one; the log keeps what rolling back to "
        "any of them needs (velox store trim).",
        low=1,
    )


@dataclass(frozen=True)
class TrainConfig:
    """The Spark training job (``velox train``)."""

    engine: str = setting(
        "velox",
        "velox: biased ALS on Velox's kernels; mllib: Spark MLlib ALS.",
        choices=("velox", "mllib"),
    )
    mode: str = setting(
        "auto",
        "single: Spark reads, the driver solves; distributed: each half-step is a Spark stage; "
        "auto: single while the ratings fit single_node_max_ratings.",
        choices=("auto", "single", "distributed"),
    )
    single_node_max_ratings: int = setting(
        50_000_000, "Largest rating count that auto mode trains on the driver.", low=1
    )
    master: str = setting("local[*]", "Spark master (ignored under spark-submit).")
    blocks: int = setting(
        0, "Blocks per half-step in distributed mode (0: Spark's parallelism).", low=0
    )
    rank: int = setting(
        5, "Latent factors per item; the served features are [factors, 1].", low=1, high=1024
    )
    user_regularization: float = setting(
        5.0,
        "User ridge strength lambda; scaled by n^regularization_exponent (n: user's ratings).",
        low=0.0,
        low_open=True,
    )
    item_regularization: float = setting(
        5.0,
        "Item ridge strength; scaled by n^regularization_exponent. MLlib's regParam.",
        low=0.0,
        low_open=True,
    )
    regularization_exponent: float = setting(
        0.0,
        "Exponent e of the per-row ridge strength lambda * n^e (0: fixed, 1: MLlib's linear).",
        low=0.0,
        high=1.0,
    )
    iterations: int = setting(15, "ALS iterations (each a user and an item half-step).", low=1)
    forgetting: float = setting(
        0.99,
        "Weight gamma^k for a rating followed by k later ratings of its user (1: no ageing).",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    validation: float = setting(
        0.1, "Share of (user, item) pairs held out for the validation RMSE.", low=0.0, high=0.5
    )
    rating_min: float = setting(0.0, "Ratings below this are rejected.")
    rating_max: float = setting(5.0, "Ratings above this are rejected.")
    seed: int = setting(0, "Seed of the initial factors and the validation split.", low=0)


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP serving tier (``velox serve``)."""

    host: str = setting("127.0.0.1", "Address to listen on.")
    port: int = setting(8080, "TCP port to listen on.", low=0, high=65535)
    batch_wait_ms: float = setting(
        2.0, "Longest an observation waits for others to share its micro-batch.", low=0.0
    )
    batch_max: int = setting(256, "Most observations in one micro-batch.", low=1)
    max_body_bytes: int = setting(1_048_576, "Largest request body accepted.", low=1024)
    max_list: int = setting(1000, "Most items, candidates or observations in one request.", low=1)
    max_id_length: int = setting(256, "Longest user or item id, in characters.", low=1)
    max_k: int = setting(1000, "Largest k of a top-K request.", low=1)
    rating_min: float = setting(0.0, "Smallest rating accepted by observe.")
    rating_max: float = setting(5.0, "Largest rating accepted by observe.")
    ts_window_days: float = setting(
        36500.0,
        "How far an observation's ts may lie from the server's clock, in days, either way "
        "(the default admits replays of data sets collected since 1970).",
        low=0.0,
        low_open=True,
    )
    follow_interval: float = setting(
        1.0,
        "Seconds between reads of the registry's active pointer; the server switches to the "
        "version it names (0: switch only through POST /models/{v}/activate).",
        low=0.0,
    )
    deadline_ms: float = setting(
        50.0,
        "Latency bound of predict and top-K; a request that would miss it gets the prior's "
        "answer, flagged degraded (0: no bound).",
        low=0.0,
    )
    read_token: str = setting("", "Bearer token for reads (empty: reads are open).")
    write_token: str = setting("", "Bearer token for observe and deletion (empty: open).")
    idempotency_ttl: float = setting(
        86_400.0,
        "Seconds an observe request's idempotency key is remembered; a retry after that is new.",
        low=0.0,
        low_open=True,
    )
    admin_token: str = setting("", "Bearer token for model activation (empty: open).")


@dataclass(frozen=True)
class RetrainConfig:
    """When the server retrains (``serving.triggers``) and how a retrain runs (``[retrain]``).

    The rolling RMSE is prequential: each observation is scored by the active
    version just before it is learned, so the figure is what users got.
    """

    enabled: bool = setting(
        False,
        "Retrain automatically when a policy below holds; when false the server only watches "
        "and reports (POST /retrain and velox retrain work either way).",
    )
    check_interval: float = setting(
        30.0, "Seconds between two checks of the policies.", low=0.0, low_open=True
    )
    window: int = setting(10_000, "Observations in the rolling prequential RMSE.", low=1)
    window_seconds: float = setting(
        3600.0,
        "Length of one per-time-window RMSE bucket, by observation time, in seconds.",
        low=0.0,
        low_open=True,
    )
    degradation_ratio: float = setting(
        1.1,
        "Retrain when the rolling RMSE exceeds this times the reference: the RMSE of the first "
        "window after activation, or the validation RMSE until that window is full.",
        low=1.0,
    )
    degradation_min_observations: int = setting(
        2000,
        "Fewest observations in the rolling window before degradation may trigger "
        "(at most window).",
        low=1,
    )
    max_observations: int = setting(
        0, "Retrain after this many observations since the version's watermark (0: off).", low=0
    )
    max_new_users: int = setting(
        0, "Retrain after this many new users since the version's watermark (0: off).", low=0
    )
    max_age: float = setting(
        0.0, "Retrain when the version was trained this many seconds ago (0: off).", low=0.0
    )
    cron: str = setting(
        "",
        "Cron schedule of retrains, in UTC, like '0 3 * * *' (empty: none).",
        check=cron_problem,
    )
    min_interval: float = setting(
        600.0, "Fewest seconds between the starts of two automatic retrains.", low=0.0
    )
    timeout: float = setting(
        3600.0, "Seconds a training job may run before it is killed.", low=0.0, low_open=True
    )
    retries: int = setting(
        3, "Automatic retries of a failed retrain before the policies stop retraining.", low=0
    )
    backoff: float = setting(
        60.0, "Seconds before the first retry; each further retry waits twice as long.", low=0.0
    )
    gate_tolerance: float = setting(
        0.01,
        "The gate rejects a candidate whose RMSE exceeds the active one's times (1 + this).",
        low=0.0,
    )
    gate_min_observations: int = setting(
        1000, "Fewest replayed observations the gate needs to judge a candidate.", low=0
    )

    def __post_init__(self) -> None:
        if self.degradation_min_observations > self.window:
            raise ConfigError(
                f"retrain.degradation_min_observations ({self.degradation_min_observations}) "
                f"exceeds retrain.window ({self.window}), so degradation could never trigger; "
                "lower it or widen the window"
            )


@dataclass(frozen=True)
class VeloxConfig:
    """All settings, one attribute per section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


def sections() -> dict[str, type]:
    """The section name to dataclass mapping, in declaration order."""
    hints = get_type_hints(VeloxConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(VeloxConfig)}


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]


def _allowed(kind: type, meta: Mapping[str, Any]) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high = meta["low"], meta["high"]
    text = _type_name(kind)
    if low is not None and high is not None:
        opener = "greater than" if meta["low_open"] else "from"
        joiner = "and at most" if meta["low_open"] else "to"
        return f"{text} {opener} {low:g} {joiner} {high:g}"
    if low is not None:
        return f"{text} {'greater than' if meta['low_open'] else 'at least'} {low:g}"
    return text


def _coerce(raw: Any, kind: type, from_text: bool) -> Any:
    """Turn a raw value into ``kind``; raise ValueError when it does not fit."""
    if from_text and isinstance(raw, str):
        text = raw.strip()
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        raise ValueError(raw)
    if isinstance(raw, bool):
        raise ValueError(raw)
    if kind is float and isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, kind):
        return raw
    raise ValueError(raw)


def _validate(section: str, key: str, raw: Any, source: str, from_text: bool) -> Any:
    cls = sections()[section]
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    if key not in by_name:
        raise ConfigError(
            f"unknown setting {section}.{key} (from {source}); "
            f"the keys of [{section}] are: {', '.join(by_name)}"
        )
    kind = get_type_hints(cls)[key]
    meta = by_name[key].metadata
    problem = f"setting {section}.{key} = {raw!r} (from {source}) must be {_allowed(kind, meta)}"
    try:
        value = _coerce(raw, kind, from_text)
    except (TypeError, ValueError):
        raise ConfigError(problem) from None
    if kind is float and not math.isfinite(value):
        raise ConfigError(problem)
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(problem)
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        raise ConfigError(problem)
    if high is not None and value > high:
        raise ConfigError(problem)
    if meta["check"] and (wrong := meta["check"](value)):
        raise ConfigError(f"setting {section}.{key} = {raw!r} (from {source}) {wrong}")
    return value


def _from_file(path: Path) -> list[tuple[str, str, Any, str]]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; pass an existing file or omit --config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None
    known = sections()
    items = []
    for section, table in document.items():
        if section not in known or not isinstance(table, dict):
            raise ConfigError(
                f"unknown section [{section}] in {path}; the sections are: {', '.join(known)}"
            )
        items += [(section, key, value, str(path)) for key, value in table.items()]
    return items


def _from_env(env: Mapping[str, str]) -> list[tuple[str, str, Any, str]]:
    items = []
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        if section not in sections():
            raise ConfigError(
                f"environment variable {name} names no config section; "
                f"the sections are: {', '.join(sections())}"
            )
        items.append((section, key, value, f"environment variable {name}"))
    return items


def _from_overrides(overrides: Iterable[str]) -> list[tuple[str, str, Any, str]]:
    items = []
    for text in overrides:
        name, sep, value = text.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or section not in sections():
            raise ConfigError(
                f"command-line setting {text!r} must look like section.key=value "
                f"with a section among: {', '.join(sections())}"
            )
        items.append((section, key, value, f"command line {text!r}"))
    return items


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
) -> VeloxConfig:
    """Load settings: defaults < TOML file < ``VELOX_SECTION__KEY`` variables < CLI overrides.

    ``path=None`` reads ``$VELOX_CONFIG`` or ``conf/velox.toml`` when they exist,
    else keeps the built-in defaults. Any bad value raises :class:`ConfigError`
    with one sentence naming the key, the value, its source and what is allowed.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, str, Any, str]] = []
    if path is None and env.get("VELOX_CONFIG"):
        path = env["VELOX_CONFIG"]
    if path is not None:
        layers += _from_file(Path(path))
    elif DEFAULT_CONFIG_PATH.is_file():
        layers += _from_file(DEFAULT_CONFIG_PATH)
    file_count = len(layers)
    layers += _from_env(env)
    layers += _from_overrides(overrides)
    values: dict[str, dict[str, Any]] = {name: {} for name in sections()}
    for position, (section, key, raw, source) in enumerate(layers):
        from_text = position >= file_count
        values[section][key] = _validate(section, key, raw, source, from_text)
    built = {name: cls(**values[name]) for name, cls in sections().items()}
    return VeloxConfig(**built)


def describe() -> list[tuple[str, Any, str]]:
    """Every setting as (``section.key``, default, documentation), for listings and docs."""
    rows = []
    for name, cls in sections().items():
        for f in dataclasses.fields(cls):
            rows.append((f"{name}.{f.name}", f.default, f.metadata["doc"]))
    return rows
