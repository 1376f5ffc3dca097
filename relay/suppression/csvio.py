"""Suppression lists as CSV: our own export, and the exports of common sending services.

Export writes `email,reason,scope,detail,created_at,expires_at` (times in ISO 8601 UTC).
Import reads that, and the layouts that sending services export: the address in a column
called email / Email / email_address / EmailAddress / "Email Address" / address /
recipient, an optional reason in their words, and an optional date (ISO 8601, Unix
seconds, or an RFC 5322 date). A bad row is reported with its line number and skipped;
the rest of the file is still imported, in one transaction.
"""

from __future__ import annotations

import csv
import datetime as dt
import email.utils
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from relay.address import canonical, check_mailbox
from relay.suppression import GLOBAL, Reason, Suppression, SuppressionStore

HEADER = ("email", "reason", "scope", "detail", "created_at", "expires_at")

# Header names are compared after lower-casing and dropping spaces, "_" and "-".
_EMAIL_COLUMNS = ("email", "emailaddress", "address", "recipient")
_REASON_COLUMNS = ("reason", "suppressionreason")
_SCOPE_COLUMNS = ("scope",)
_DETAIL_COLUMNS = ("detail",)
_CREATED_COLUMNS = ("createdat", "created", "date")
_EXPIRES_COLUMNS = ("expiresat", "expires")

# Sending services' words for why an address is suppressed, compared like column names
# (lower case, without spaces, "_" and "-"): "Hard Bounce", "hard_bounce", "HardBounce".
_REASON_WORDS = {
    "unsubscribe": Reason.UNSUBSCRIBE, "unsubscribed": Reason.UNSUBSCRIBE,
    "bounce": Reason.HARD_BOUNCE, "bounced": Reason.HARD_BOUNCE,
    "hardbounce": Reason.HARD_BOUNCE, "invalid": Reason.HARD_BOUNCE,
    "complaint": Reason.COMPLAINT, "spam": Reason.COMPLAINT,
    "spamreport": Reason.COMPLAINT, "spamcomplaint": Reason.COMPLAINT,
    "softbouncelimit": Reason.SOFT_BOUNCE_LIMIT, "manual": Reason.MANUAL,
}
_UNIX_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")


class CsvFormatError(ValueError):
    """The file cannot be imported at all (no header, no email column, not text)."""


@dataclass
class ImportResult:
    """What import_csv() did. `errors` holds (line number, problem), header = line 1."""

    added: int = 0
    updated: int = 0
    skipped: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)


def iso(ts: float) -> str:
    """A Unix time as ISO 8601 UTC with a Z: 2026-12-03T10:00:00Z (microseconds if any)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def export_csv(store: SuppressionStore, file: TextIO, scope: str | None = None) -> int:
    """Write every entry (of `scope`, if given) to `file` as CSV; how many rows."""
    writer = csv.writer(file)
    writer.writerow(HEADER)
    entries = store.list(scope)
    for e in entries:
        writer.writerow((e.address, str(e.reason), e.scope, e.detail, iso(e.created_at),
                         "" if e.expires_at is None else iso(e.expires_at)))
    return len(entries)


def parse_time(text: str) -> float:
    """ISO 8601 (naive = UTC), Unix seconds, or an RFC 5322 date -> Unix time."""
    text = text.strip()
    if _UNIX_SECONDS.match(text):
        return _checked(float(text), text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        try:  # Mailgun and others: "Fri, 21 Oct 2011 11:02:55 UTC"
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            raise ValueError(f"cannot read date {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _checked(ts: float, text: str) -> float:
    try:  # it must export again: refuse what has no ISO form (milliseconds, say)
        iso(ts)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"date out of range {text!r}") from None
    return ts


def reason_of(word: str, default: Reason = Reason.MANUAL) -> Reason:
    """Our reason for a service's word ("bounced", "spamreport"); `default` if empty,
    manual if unknown."""
    key = _key(word)
    if not key:
        return default
    return _REASON_WORDS.get(key, Reason.MANUAL)


def _key(column: str) -> str:
    return re.sub(r"[\s_\-]", "", column.lstrip("\ufeff").lower())


def _find(keys: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:  # in order of preference: "created_at" before "date"
        if name in keys:
            return keys.index(name)
    return None


def _delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in ",;\t"}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def import_csv(store: SuppressionStore, file: TextIO, *,
               default_reason: Reason = Reason.MANUAL, now: float,
               scope: str = GLOBAL) -> ImportResult:
    """Add the addresses of a CSV file to `store`, replacing entries for the same
    (address, scope). Rows without a scope column go to `scope`; rows without a date get
    `now`; rows without a reason, `default_reason`.

    Raises CsvFormatError when the file has no header or no recognisable email column.
    """
    first = file.readline()
    if not first.strip():
        raise CsvFormatError("empty file: expected a header line with an email column")
    lines: Iterator[str] = itertools.chain([first], file)
    reader = csv.reader(lines, delimiter=_delimiter(first))
    header = next(reader)
    keys = [_key(c) for c in header]
    col_email = _find(keys, _EMAIL_COLUMNS)
    if col_email is None:
        raise CsvFormatError(
            "no email column (email, email_address, Email Address, address or recipient);"
            f" columns seen: {', '.join(repr(c.lstrip(chr(0xfeff))) for c in header)}")
    col_reason = _find(keys, _REASON_COLUMNS)
    col_scope = _find(keys, _SCOPE_COLUMNS)
    col_detail = _find(keys, _DETAIL_COLUMNS)
    col_created = _find(keys, _CREATED_COLUMNS)
    col_expires = _find(keys, _EXPIRES_COLUMNS)

    def cell(row: list[str], col: int | None, *, strip: bool = True) -> str:
        text = row[col] if col is not None and col < len(row) else ""
        return text.strip() if strip else text

    result = ImportResult()
    entries: list[Suppression] = []
    end = reader.line_num  # the last physical line read; a quoted field may span lines
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field beyond csv.field_size_limit()
            raise CsvFormatError(f"line {start}: {exc}") from None
        end = reader.line_num
        if not any(c.strip() for c in row):
            continue  # a blank line is not a row
        address = cell(row, col_email)
        problem = _address_problem(address)
        if problem is None:
            word, detail = cell(row, col_reason), cell(row, col_detail, strip=False)
            reason = reason_of(word, default_reason)
            if word and _key(word) not in _REASON_WORDS and not detail:
                detail = word  # keep the service's own word when we have no better one
            try:
                created = cell(row, col_created)
                expires = cell(row, col_expires)
                entries.append(Suppression(
                    address=canonical(address), scope=cell(row, col_scope) or scope,
                    reason=reason, detail=detail,
                    created_at=parse_time(created) if created else now,
                    expires_at=parse_time(expires) if expires else None))
                continue
            except ValueError as exc:
                problem = str(exc)
        result.errors.append((start, problem))
    result.skipped = len(result.errors)
    if entries:
        result.added, result.updated = _add_all(store, entries)
    return result


def _address_problem(address: str) -> str | None:
    if not address:
        return "no address"
    if "@" not in address:
        return f"no @ in address {address!r}"
    refusal = check_mailbox(address, smtputf8=True, sender=False)
    if refusal is not None:
        return f"invalid address {address!r}"
    return None


def _add_all(store: SuppressionStore, entries: list[Suppression]) -> tuple[int, int]:
    """One transaction when the store can (both of ours can), else one add() each."""
    add_many = getattr(store, "add_many", None)
    if add_many is not None:
        added, updated = add_many(entries)
        return int(added), int(updated)
    added = sum(store.add(e) for e in entries)
    return added, len(entries) - added
