"""``velox store``: inspect, verify, back up, restore, recover, forget and trim.

Registered as a ``velox.commands`` entry point (see :mod:`velox.cli`).
``inspect`` works next to a running server (a read-only view) and shows the
log's extent, what holds it back, the durable sequence number and every loss
accepted; ``verify`` (also beside a server) reads every block and every
registry artifact against its checksum and exits 1 on any problem;
``backup``, ``restore``, ``recover``, ``forget`` and ``trim`` need the store
to themselves and say so when a server holds it (``DELETE /users/{id}``
forgets on a running one). ``forget`` takes the server's path: it opens the active version and calls
:meth:`~feature_store.durable.DurableModel.delete_user`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from feature_store.backup import backup, restore, summarize
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.retention import trim
from feature_store.storage_errors import describe_loss
from feature_store.verify import verify
from feature_store.versions import open_active
from velox.backend import CPU
from velox.config import VeloxConfig
from velox.errors import DataError


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``velox store ...`` to the command line."""
    store = commands.add_parser("store", help="online/offline store and registry tools")
    actions = store.add_subparsers(dest="store_command", required=True)
    inspect = actions.add_parser("inspect", help="print log positions, counts, model versions")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=_inspect)
    check = actions.add_parser(
        "verify", help="check every block of the online store and every registry artifact"
    )
    check.set_defaults(handler=_verify)
    recover = actions.add_parser(
        "recover", help="open a store whose log lost acknowledged observations, recording the loss"
    )
    recover.add_argument(
        "--accept-loss",
        action="store_true",
        help="give up what the damaged or missing write-ahead log held (recorded; sequence "
        "numbers continue after it)",
    )
    recover.set_defaults(handler=_recover)
    save = actions.add_parser("backup", help="back the data folder up into a new folder")
    save.add_argument("dir", help="backup folder to create")
    save.set_defaults(handler=_backup)
    back = actions.add_parser("restore", help="restore a backup as the data folder's stores")
    back.add_argument("dir", help="backup folder made by velox store backup")
    back.add_argument(
        "--replace", action="store_true", help="move existing stores aside (never deleted)"
    )
    back.set_defaults(handler=_restore)
    forget = actions.add_parser(
        "forget", help="forget a user: state, log records, offline rows, registry artifacts"
    )
    forget.add_argument("user", help="user id")
    forget.set_defaults(handler=_forget)
    trim = actions.add_parser(
        "trim",
        help="retention: drop log records that are exported, checkpointed and older than every "
        "version kept (registry.keep), and expired idempotency receipts",
    )
    trim.set_defaults(handler=_trim)


def _inspect(args: argparse.Namespace, config: VeloxConfig) -> None:
    layout = DataLayout.from_config(config)
    if not any(path.is_dir() for path in layout.parts.values()):
        raise DataError(f"no Velox store in data folder {layout.root}; check data.dir")
    summary = summarize(layout, keep=config.registry.keep)
    if args.json:
        print(json.dumps({"data": str(layout.root), **summary}, indent=2))
        return
    print(_describe(layout, summary))


def _describe(layout: DataLayout, summary: dict[str, Any]) -> str:
    lines = [f"data folder       {layout.root}"]
    if "last_seq" in summary:
        first = summary["log_first"]
        extent = "empty" if first is None else f"seq {first} .. {summary['last_seq']}"
        lines.append(
            f"online log        {extent}, {summary['log_bytes']} bytes, "
            f"checkpoint at {summary['checkpoint_seq']}"
        )
        held = ", ".join(f"{k} {v}" for k, v in summary["holds"].items() if v is not None)
        lines.append(f"log held back by  {summary['held_by']} at seq {summary['held_at']} ({held})")
        lines.append(
            f"online states     ~{summary['users_estimate']} users, "
            f"~{summary['folded_in_items_estimate']} folded-in items"
        )
        lines.append(f"durable seq       {summary['durable_seq']}{_missing(summary['missing'])}")
        lines += [
            f"accepted loss     seq {loss['first']} .. {loss['last']} (at {loss['accepted']})"
            for loss in summary["accepted_losses"]
        ]
    if "offline_watermark" in summary:
        days = summary["offline_days"]
        span = f"{days[0]} .. {days[-1]}" if days else "no days"
        lines.append(f"offline store     watermark {summary['offline_watermark']}, {span}")
    for v in summary.get("versions", []):
        metrics = " ".join(f"{k}={val:.4f}" for k, val in sorted(v["metrics"].items()))
        lines.append(
            f"model {v['version']:<11} {v['state']:<8} {v['created']}  {v['engine']}  "
            f"watermark {v['watermark']}  {metrics}".rstrip()
        )
    return "\n".join(lines)


def _missing(missing: tuple[int, int] | None) -> str:
    if missing is None:
        return ""
    return (
        f"; MISSING seq {missing[0]} .. {missing[1]}: restore a backup (velox store restore) "
        "or accept the loss (velox store recover --accept-loss)"
    )


def _verify(args: argparse.Namespace, config: VeloxConfig) -> None:
    """Print what was checked and one line per problem; exit 1 when there is any."""
    found = verify(DataLayout.from_config(config))
    for line in found.checked:
        print(f"checked  {line}")
    for line in found.problems:
        print(f"PROBLEM  {line}")
    print(f"{len(found.problems)} problems found")
    if found.problems:
        raise SystemExit(1)


def _recover(args: argparse.Namespace, config: VeloxConfig) -> None:
    """Open the store past a lost log tail, recording the loss; without the flag, only say it."""
    layout = _online(config)
    if not args.accept_loss:
        with OnlineStore(layout.online, read_only=True) as view:
            gone = view.missing
        if gone is None:
            print(f"store {layout.online} has every acknowledged observation; nothing to recover")
            return
        raise DataError(
            f"{describe_loss(layout.online, gone)} (pass --accept-loss to give them up)"
        )
    with OnlineStore(layout.online, accept_loss=True) as store:
        loss = store.accepted_now
        upto = store.last_seq
    if loss is not None:
        print(
            f"recorded the loss of seq {loss.first} .. {loss.last} in {layout.online}; "
            f"the next observation gets seq {upto + 1}"
        )
    else:
        print(f"store {layout.online} opens with every acknowledged observation (up to seq {upto})")


def _backup(args: argparse.Namespace, config: VeloxConfig) -> None:
    manifest = backup(DataLayout.from_config(config), args.dir)
    print(f"backed up {config.data.dir} to {args.dir} (log up to {manifest['last_seq']})")


def _restore(args: argparse.Namespace, config: VeloxConfig) -> None:
    layout = DataLayout.from_config(config)
    aside = restore(args.dir, layout, replace=args.replace)
    moved = f"; the replaced stores are in {aside}" if aside else ""
    print(f"restored {args.dir} into {layout.root}{moved}")


def _online(config: VeloxConfig) -> DataLayout:
    """The data folder, which must hold an online store."""
    layout = DataLayout.from_config(config)
    if not layout.online.is_dir():
        raise DataError(f"no Velox store in data folder {layout.root}; check data.dir")
    return layout


def _trim(args: argparse.Namespace, config: VeloxConfig) -> None:
    """Retention on a stopped server's store (a running one trims through DurableModel.trim)."""
    layout = _online(config)
    with OnlineStore(layout.online) as store:
        done = trim(store, layout, config.registry.keep, config.serve.idempotency_ttl)
        extent = store.log_extent()
    print(
        f"log trimmed before seq {done.log_start} (held by {done.holds.holder} at "
        f"{done.holds.floor}); it now holds {extent.bytes} bytes; "
        f"{done.receipts_expired} idempotency receipts expired"
    )


def _forget(args: argparse.Namespace, config: VeloxConfig) -> None:
    """The server's path: the active version's durable model forgets (checkpoint first)."""
    _online(config)
    durable, _ = open_active(config, CPU)
    with durable:
        gone = durable.delete_user(args.user)
    print(
        f"forgot user {args.user!r}: {gone.log_records} log records, {gone.offline_rows} "
        f"offline rows and {gone.registry_rows} registry rows removed"
    )
