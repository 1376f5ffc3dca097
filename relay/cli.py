"""The `relay` command: serve, check-config, queue, demo-sink."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sqlite3
import sys
import time
from pathlib import Path

from relay import __version__
from relay.config import Config, ConfigError, default_config_path, load_config


def _load(path: str | None) -> Config:
    return load_config(path or default_config_path())


def _load_or_report(path: str | None) -> Config | None:
    """The configuration, or None after printing one line per problem to stderr."""
    try:
        return _load(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def _check_keys(cfg: Config) -> list[str]:
    """[[dkim]] keys must load and [bounces].rules must parse, or the relay won't start."""
    from relay.outbound.classify import Rules, RulesError
    from relay.outbound.dkim import DkimKeyError, load_keys

    where = cfg.path or default_config_path()
    problems = []
    try:
        load_keys(cfg.dkim)
    except DkimKeyError as exc:
        problems.append(f"{where}: dkim: {exc.path}: {exc.why}")
    try:
        Rules.load(cfg.bounces.rules)
    except RulesError as exc:
        problems.append(f"{where}: bounces.rules: {exc}")
    return problems


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
        problems = _check_keys(cfg)
        if problems:
            raise ConfigError(problems)
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
        problems = _check_keys(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        print("relay: refusing to start with configuration errors", file=sys.stderr)
        return 1
    from relay.app import QueueLockedError

    try:
        asyncio.run(serve(cfg))
    except (OSError, QueueLockedError) as exc:
        print(f"relay: fatal: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"relay: fatal: queue database {cfg.queue.path}: {exc}", file=sys.stderr)
        return 1
    return 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.queue.sqlite import SQLiteQueueStore

    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    if not cfg.queue.path.exists():
        print(f"relay: no queue at {cfg.queue.path}", file=sys.stderr)
        return 1

    async def run() -> int:
        store = SQLiteQueueStore(cfg.queue.path)
        await store.open()
        try:
            if args.action == "list":
                entries = _filter(await store.list(), args)
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
                from relay.queue.pacing import describe_states, state_path

                for line in describe_states(state_path(cfg.queue.path)):
                    print(f"-- destination {line}")
                return 0
            if args.action == "show":
                e = await store.get(args.id)
                if e is None:
                    print(f"relay: no message {args.id} in queue", file=sys.stderr)
                    return 1
                if args.json:
                    print(json.dumps({
                        "queue_id": e.queue_id, "sender": e.sender, "size": e.size,
                        "received_at": e.received_at, "client": e.client,
                        "headers": e.headers.decode("utf-8", "replace"),
                        "recipients": [{"address": r.address, "state": r.state.value,
                                        "attempts": r.attempts, "next_attempt": r.next_attempt,
                                        "last_reply": r.last_reply} for r in e.recipients],
                    }, indent=2))
                    return 0
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
            if args.action in ("hold", "release"):
                n = await store.hold(args.id, args.action == "hold")
                if n == 0 and await store.get(args.id) is None:
                    print(f"relay: no message {args.id} in queue", file=sys.stderr)
                    return 1
                print(f"{args.id}: {n} recipient(s) {args.action}" + ("ed" if args.action ==
                                                                       "hold" else "d"))
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


def cmd_suppress(args: argparse.Namespace) -> int:
    """`relay suppress add|remove|check|list|import|export`: the suppression store by hand."""
    import csv

    from relay.address import canonical, check_mailbox
    from relay.config import parse_duration
    from relay.suppression import GLOBAL, Reason, Suppression
    from relay.suppression.csvio import CsvFormatError, export_csv, import_csv
    from relay.suppression.store import (
        MemorySuppressionStore,
        SQLiteSuppressionStore,
        suppression_path,
    )

    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    now = round(time.time(), 6)  # to the microsecond, as exported: export/import is lossless
    address = getattr(args, "address", "")
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    address = canonical(address)
    expires_at = None
    if args.action == "add":
        if check_mailbox(address, smtputf8=True, sender=False) is not None:
            print(f"relay: not a valid address: {address!r}", file=sys.stderr)
            return 1
        if args.expires:
            try:
                expires_at = now + parse_duration(args.expires)
            except ValueError as exc:
                print(f"relay: --expires: {exc}", file=sys.stderr)
                return 1

    path = suppression_path(cfg)
    # Reading a store that does not exist yet reads an empty one; it is not created.
    store: MemorySuppressionStore | SQLiteSuppressionStore
    if path.exists() or args.action in ("add", "import"):
        store = SQLiteSuppressionStore(path)
    else:
        store = MemorySuppressionStore()

    def since(e: Suppression) -> str:
        text = f"{e.reason} since {_when(e.created_at)} UTC"
        if e.expires_at is not None:
            state = "expired" if e.expires_at <= now else "until"
            text += f", {state} {_when(e.expires_at)} UTC"
        return text + (f": {e.detail}" if e.detail else "")

    try:
        if args.action == "add":
            entry = Suppression(address=address, scope=args.scope, reason=Reason(args.reason),
                                detail=args.detail, created_at=now, expires_at=expires_at)
            new = store.add(entry)
            print(f"{address}: {'suppressed' if new else 'updated'} in {args.scope}"
                  f" ({args.reason})")
            return 0
        if args.action == "remove":
            if not store.remove(address, args.scope):
                print(f"relay: {address} is not suppressed in {args.scope}", file=sys.stderr)
                return 1
            print(f"{address}: removed from {args.scope}")
            return 0
        if args.action == "check":
            scopes = (GLOBAL,) if args.scope in (None, GLOBAL) else (GLOBAL, args.scope)
            found = store.check(address, scopes, now)
            if found is None:
                print(f"{address}: not suppressed (scopes: {', '.join(scopes)})")
                return 1
            print(f"{address}: suppressed in {found.scope}: {since(found)}")
            return 0
        if args.action == "list":
            entries = store.list(args.scope)
            if args.json:
                print(json.dumps([{
                    "address": e.address, "scope": e.scope, "reason": str(e.reason),
                    "detail": e.detail, "created_at": e.created_at,
                    "expires_at": e.expires_at} for e in entries], indent=2))
                return 0
            for e in entries:
                print(f"{e.address:<40} {e.scope:<16} {since(e)}")
            print(f"-- {len(entries)} suppression(s)")
            return 0
        if args.action == "import":
            try:
                with open(args.file, encoding="utf-8-sig", newline="") as f:
                    result = import_csv(store, f, default_reason=Reason(args.reason), now=now,
                                        scope=args.scope)
            except OSError as exc:
                print(f"relay: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
                return 1
            except UnicodeDecodeError:
                print(f"relay: {args.file}: not UTF-8 text", file=sys.stderr)
                return 1
            except (CsvFormatError, csv.Error) as exc:
                print(f"relay: {args.file}: {exc}", file=sys.stderr)
                return 1
            for line, problem in result.errors:
                print(f"{args.file}:{line}: skipped: {problem}", file=sys.stderr)
            print(f"{args.file}: added {result.added}, updated {result.updated},"
                  f" skipped {result.skipped}")
            return 0 if result.added + result.updated or not result.skipped else 1
        if args.action == "export":
            if args.file in (None, "-"):
                export_csv(store, sys.stdout, args.scope)
                return 0
            try:
                with open(args.file, "w", encoding="utf-8", newline="") as f:
                    n = export_csv(store, f, args.scope)
            except OSError as exc:
                print(f"relay: cannot write {args.file}: {exc.strerror}", file=sys.stderr)
                return 1
            print(f"{n} suppression(s) written to {args.file}")
            return 0
        return 2
    finally:
        store.close()


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


def _filter(entries: list, args: argparse.Namespace) -> list:
    """`relay queue list` filters: state, sender, destination, age."""
    from relay.address import domain_of
    from relay.config import parse_duration

    cutoff = time.time() - parse_duration(args.older_than) if args.older_than else None
    out = []
    for e in entries:
        states = {r.state.value for r in e.recipients}
        domains = {domain_of(r.address) for r in e.recipients}
        if args.state and args.state not in states:
            continue
        if args.sender and args.sender.lower() not in e.sender.lower():
            continue
        if args.destination and not any(d == args.destination or d.endswith(
                "." + args.destination) for d in domains):
            continue
        if cutoff is not None and e.received_at > cutoff:
            continue
        out.append(e)
    return out


def cmd_demo_sink(args: argparse.Namespace) -> int:
    from relay.demo import run_sink

    host, _, port = args.listen.rpartition(":")
    asyncio.run(run_sink(host or "127.0.0.1", int(port), Path(args.dir)))
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    """`relay dkim keygen`: write DIR/DOMAIN.SELECTOR.pem (0600, never overwritten) and print
    the TXT record to publish at SELECTOR._domainkey.DOMAIN (RFC 6376 3.6.2.1)."""
    from relay.outbound.dkim import (
        MIN_RSA_BITS,
        DkimKey,
        generate_private_key,
        txt_zone_entry,
        valid_name,
        write_private_key,
    )

    domain = args.domain.strip().rstrip(".").lower()
    selector = args.selector.strip()
    if not valid_name(domain):
        print(f"relay: {args.domain!r} is not a valid domain name", file=sys.stderr)
        return 2
    if not valid_name(selector):
        print(f"relay: {args.selector!r} is not a valid selector (letters, digits, hyphens, "
              "dots)", file=sys.stderr)
        return 2
    if args.algorithm == "rsa" and args.bits < MIN_RSA_BITS:
        print(f"relay: RSA keys need at least {MIN_RSA_BITS} bits (RFC 8301)", file=sys.stderr)
        return 2
    # DESIGN: DIR defaults to dkim/ beside the config file; ./dkim when there is none.
    config = Path(args.config) if args.config else default_config_path()
    config_dir = config.resolve().parent if config.is_file() else None
    if args.out:
        out_dir = Path(args.out)
    else:
        out_dir = config_dir / "dkim" if config_dir else Path("dkim")
    path = out_dir / f"{domain}.{selector}.pem"
    if path.exists():
        print(f"relay: {path} exists; refusing to overwrite a key (choose a new selector)",
              file=sys.stderr)
        return 1
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_key(path, generate_private_key(args.algorithm, args.bits))
        key = DkimKey.load(domain, selector, path)
    except FileExistsError:
        print(f"relay: {path} exists; refusing to overwrite a key", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # relay.toml paths are relative to the config file's folder: say it that way, or absolute.
    shown = path.resolve()
    if config_dir and shown.is_relative_to(config_dir):
        shown = shown.relative_to(config_dir)
    print(f"relay: wrote {path}; add to relay.toml:\n\n[[dkim]]\ndomain = \"{domain}\"\n"
          f"selector = \"{selector}\"\nkey = \"{shown}\"\n\nand publish:", file=sys.stderr)
    print(txt_zone_entry(key))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """`relay doctor`: check DKIM, SPF, DMARC and MX records of every sending domain."""
    from relay.doctor import run_doctor

    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    return run_doctor(cfg, outbound_ips=args.ip or None)


def cmd_stats(args: argparse.Namespace) -> int:
    """`relay stats`: per app and campaign, outcomes and rates from the event log, with a
    WARNING line for each row over the bounce or complaint threshold. Read-only: safe while
    the relay runs."""
    from relay.config import parse_duration
    from relay.events import (
        DEFINITIONS,
        format_table,
        read_stats,
        since_text,
        with_app_totals,
    )

    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    since: float | None = None
    if args.since != "all":
        try:
            since = time.time() - parse_duration(args.since)
        except (TypeError, ValueError) as exc:
            print(f"relay: --since: {exc} (or \"all\")", file=sys.stderr)
            return 2
    if not cfg.queue.path.exists():
        print(f"relay: no queue at {cfg.queue.path}", file=sys.stderr)
        return 1
    try:
        rows = with_app_totals(read_stats(cfg.queue.path, since=since, app=args.app))
    except sqlite3.Error as exc:
        print(f"relay: cannot read {cfg.queue.path}: {exc}", file=sys.stderr)
        return 1
    warnings = [w for r in rows for w in r.warnings()]
    if args.json:
        print(json.dumps({"since": since, "app": args.app, "definitions": list(DEFINITIONS),
                          "rows": [r.to_json() for r in rows]}, indent=2))
        return 0
    print(f"-- {since_text(since)}" + (f", app {args.app or '-'}" if args.app is not None
                                       else ""))
    if rows:
        print(format_table(rows))
    else:
        print("no events")
    for line in DEFINITIONS:
        print(f"-- {line}")
    for line in warnings:
        print(line)
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
    ql.add_argument("--state", choices=["queued", "active", "held"],
                    help="messages with a recipient in this state")
    ql.add_argument("--sender", help="envelope sender contains this")
    ql.add_argument("--destination", help="a recipient domain is this (or a subdomain)")
    ql.add_argument("--older-than", help="received longer ago than this (30m, 2h, 1d)")
    qsub.add_parser("hold").add_argument("id")
    qsub.add_parser("release").add_argument("id")
    qs = qsub.add_parser("show")
    qs.add_argument("id")
    qs.add_argument("--json", action="store_true")
    qsub.add_parser("flush")
    qsub.add_parser("delete").add_argument("id")
    q.set_defaults(func=cmd_queue)

    s = with_config(sub.add_parser("suppress", help="manage suppressed addresses"))
    ssub = s.add_subparsers(dest="action", required=True)

    def suppress_action(name: str, text: str) -> argparse.ArgumentParser:
        from relay.suppression import GLOBAL, Reason

        sp = ssub.add_parser(name, help=text, description=text)
        sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name in ("add", "remove", "check"):
            sp.add_argument("address")
        if name in ("add", "import"):
            sp.add_argument("--reason", choices=[r.value for r in Reason],
                            default=Reason.MANUAL.value,
                            help="why (for import: of rows that do not say; default manual)")
        if name in ("add", "remove", "import"):
            sp.add_argument("--scope", default=GLOBAL,
                            help="\"global\" (the default), a sending domain or a list name")
        if name in ("check", "list", "export"):
            sp.add_argument("--scope", default=None,
                            help="only this scope (check: this scope and global)")
        return sp

    sa = suppress_action("add", "suppress an address (replaces its entry in the scope)")
    sa.add_argument("--detail", default="", help="a note kept with the entry")
    sa.add_argument("--expires", help="lift the suppression after this long, e.g. 30d")
    suppress_action("remove", "lift the suppression of an address in a scope")
    suppress_action("check", "exit 0 and say why if the address is suppressed, else exit 1")
    suppress_action("list", "list the entries").add_argument("--json", action="store_true")
    suppress_action("import", "add the addresses of a CSV file (ours or a sending service's)"
                    ).add_argument("file")
    suppress_action("export", "write the entries as CSV").add_argument(
        "file", nargs="?", help="default: standard output")
    s.set_defaults(func=cmd_suppress)

    a = sub.add_parser("app", help="application accounts")
    asub = a.add_subparsers(dest="action", required=True)
    asub.add_parser("hash-password", help="read a password, print [[app]].password_hash")
    a.set_defaults(func=cmd_app)

    dk = sub.add_parser("dkim", help="DKIM keys")
    dksub = dk.add_subparsers(dest="action", required=True)
    kg = dksub.add_parser("keygen", help="make a key, print the TXT record to publish")
    kg.add_argument("--domain", required=True)
    kg.add_argument("--selector", required=True)
    kg.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    kg.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    kg.add_argument("--out", help="folder for the key (default: dkim/ beside the config)")
    with_config(kg)
    dk.set_defaults(func=cmd_dkim)

    doc = with_config(sub.add_parser("doctor", help="check the DNS records of sending domains"))
    doc.add_argument("--ip", action="append", metavar="ADDRESS",
                     help="an outbound address to check SPF for (repeatable; default: "
                          "[outbound].source_addresses, else the address that reaches the "
                          "smarthost)")
    doc.set_defaults(func=cmd_doctor)

    st = with_config(sub.add_parser(
        "stats", help="sent, delivered, bounce, complaint and unsubscribe rates per app",
        description="Per app and campaign, from the event log of the queue database. Warns "
                    "(a line starting with WARNING) when a bounce rate is over 2 % or a "
                    "complaint rate over 0.3 %."))
    st.add_argument("--since", default="7d",
                    help="only events this recent, e.g. 24h, 30d, or \"all\" (default 7d)")
    st.add_argument("--app", help="only this app (\"\" for mail from mynetworks clients)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_stats)

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
