"""The `relay` command: serve, check-config, queue, demo-sink."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from pathlib import Path

from relay import __version__
from relay.config import Config, ConfigError, default_config_path, load_config


def _load(path: str | None) -> Config:
    return load_config(path or default_config_path())


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        _load(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    print(f"{args.config or default_config_path()}: ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.app import serve

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        print("relay: refusing to start with configuration errors", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    return 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.queue.sqlite import SQLiteQueueStore

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    if not cfg.queue.path.exists():
        print(f"relay: no queue at {cfg.queue.path}", file=sys.stderr)
        return 1

    async def run() -> int:
        store = SQLiteQueueStore(cfg.queue.path)
        await store.open()
        try:
            if args.action == "list":
                entries = await store.list()
                if args.json:
                    print(json.dumps([{
                        "queue_id": e.queue_id, "sender": e.sender, "size": e.size,
                        "received_at": e.received_at, "client": e.client,
                        "recipients": [{"address": r.address, "state": r.state.value,
                                        "attempts": r.attempts, "next_attempt": r.next_attempt,
                                        "last_reply": r.last_reply} for r in e.recipients],
                    } for e in entries], indent=2))
                    return 0
                for e in entries:
                    print(f"{e.queue_id:<16} {e.size:>9} {_when(e.received_at)}  <{e.sender}>")
                    for r in e.recipients:
                        why = f" ({r.last_reply})" if r.last_reply else ""
                        print(f"{'':>28}<{r.address}> {r.state.value}, attempts={r.attempts}"
                              f"{why}")
                print(f"-- {len(entries)} message(s) in queue")
                return 0
            if args.action == "show":
                e = await store.get(args.id)
                if e is None:
                    print(f"relay: no message {args.id} in queue", file=sys.stderr)
                    return 1
                print(f"queue_id: {e.queue_id}\nsender: <{e.sender}>\nsize: {e.size}\n"
                      f"received: {_when(e.received_at)}\nclient: {e.client}")
                for r in e.recipients:
                    print(f"recipient: <{r.address}> state={r.state.value} attempts={r.attempts}"
                          f" next={_when(r.next_attempt)} last_reply={r.last_reply or '-'}")
                print()
                print(e.headers.decode("utf-8", "replace"))
                return 0
            if args.action == "flush":
                n = await store.flush(time.time())
                print(f"{n} recipient(s) made due now")
                return 0
            if args.action == "delete":
                if not await store.delete(args.id):
                    print(f"relay: no message {args.id} in queue", file=sys.stderr)
                    return 1
                print(f"{args.id}: deleted")
                return 0
            return 2
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_app(args: argparse.Namespace) -> int:
    import getpass

    from relay.policy.access import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("relay: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_demo_sink(args: argparse.Namespace) -> int:
    from relay.demo import run_sink

    host, _, port = args.listen.rpartition(":")
    asyncio.run(run_sink(host or "127.0.0.1", int(port), Path(args.dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="SMTP relay for application mail")
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="relay.toml (default: $RELAY_CONFIG, then ./relay.toml)")
        return sp

    with_config(sub.add_parser("serve", help="run the relay")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("check-config", help="validate relay.toml")).set_defaults(
        func=cmd_check_config)

    q = with_config(sub.add_parser("queue", help="inspect and control the queue"))
    qsub = q.add_subparsers(dest="action", required=True)
    ql = qsub.add_parser("list")
    ql.add_argument("--json", action="store_true")
    qsub.add_parser("show").add_argument("id")
    qsub.add_parser("flush")
    qsub.add_parser("delete").add_argument("id")
    q.set_defaults(func=cmd_queue)

    a = sub.add_parser("app", help="application accounts")
    asub = a.add_subparsers(dest="action", required=True)
    asub.add_parser("hash-password", help="read a password, print [[app]].password_hash")
    a.set_defaults(func=cmd_app)

    d = sub.add_parser("demo-sink", help="a local SMTP server that saves what it receives")
    d.add_argument("--listen", default="127.0.0.1:2526")
    d.add_argument("--dir", default="var/demo-mail")
    d.set_defaults(func=cmd_demo_sink)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
