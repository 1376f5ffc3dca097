"""CSV import and export of suppressions, over both stores.

Column layouts are modelled on what sending services export (an address column under one of
several names, their own reason words, dates as ISO 8601, Unix seconds or RFC 5322).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.suppression import GLOBAL, Reason, Suppression
from relay.suppression.csvio import (
    HEADER,
    CsvFormatError,
    ImportResult,
    export_csv,
    import_csv,
    parse_time,
    reason_of,
)
from relay.suppression.store import MemorySuppressionStore, SQLiteSuppressionStore

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
Store = SQLiteSuppressionStore | MemorySuppressionStore


def make_store(kind: str, tmp_path: Path, name: str = "s.db") -> Store:
    if kind == "sqlite":
        return SQLiteSuppressionStore(tmp_path / name, clock=lambda: NOW)
    return MemorySuppressionStore(clock=lambda: NOW)


@pytest.fixture(params=["sqlite", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path) -> Iterator[Store]:
    s = make_store(kind, tmp_path)
    yield s
    s.close()


def load(store: Store, text: str, **kw: object) -> ImportResult:
    return import_csv(store, io.StringIO(text, newline=""), now=NOW, **kw)  # type: ignore[arg-type]


def export(store: Store) -> str:
    out = io.StringIO(newline="")
    export_csv(store, out)
    return out.getvalue()


# --- export ----------------------------------------------------------------------------------

def test_export_columns_and_iso_times(store: Store) -> None:
    store.add(Suppression("bob@Example.NET", GLOBAL, Reason.HARD_BOUNCE,
                          detail="550 5.1.1 <bob@example.net>: user unknown, sorry",
                          created_at=T0))
    store.add(Suppression('"odd user"@example.net', "shop.example", Reason.UNSUBSCRIBE,
                          created_at=T0 + 0.5, expires_at=T0 + 86400))
    assert export(store).splitlines() == [
        ",".join(HEADER),
        ('"""odd user""@example.net",unsubscribe,shop.example,,2023-11-14T22:13:20.500000Z,'
         "2023-11-15T22:13:20Z"),
        ('bob@example.net,hard-bounce,global,"550 5.1.1 <bob@example.net>: user unknown, sorry",'
         "2023-11-14T22:13:20Z,"),
    ]
    assert HEADER == ("email", "reason", "scope", "detail", "created_at", "expires_at")


def test_export_of_an_empty_store_is_the_header(store: Store) -> None:
    assert export(store) == "email,reason,scope,detail,created_at,expires_at\r\n"


# --- round trips -----------------------------------------------------------------------------

SERVICE_EXPORT = """\
Email Address,Reason,Created,Notes
bob@Example.NET,bounced,2023-11-14T22:13:20Z,x
\"\"\"odd user\"\"@example.net\",spamreport,1700000000,y
Carol@example.org,unsubscribed,"Tue, 14 Nov 2023 22:13:20 +0000",
dave@example.org,,,
jos\u00e9@b\u00fccher.example,Hard Bounce,2023-11-14 22:13:20,
"""


def test_import_then_export_gives_back_the_same_list(kind: str, tmp_path: Path) -> None:
    first = make_store(kind, tmp_path, "first.db")
    result = load(first, SERVICE_EXPORT)
    assert (result.added, result.updated, result.skipped, result.errors) == (5, 0, 0, [])
    exported = export(first)

    second = make_store(kind, tmp_path, "second.db")
    again = load(second, exported)
    assert (again.added, again.updated, again.skipped) == (5, 0, 0)
    assert second.list() == first.list()
    assert export(second) == exported
    first.close()
    second.close()


def test_our_export_round_trips_every_field(kind: str, tmp_path: Path) -> None:
    first = make_store(kind, tmp_path, "first.db")
    entries = [
        Suppression("bob@example.net", GLOBAL, Reason.HARD_BOUNCE,
                    detail="550-5.1.1 first line\n550 5.1.1 second, with comma", created_at=T0),
        Suppression("bob@example.net", "shop.example", Reason.SOFT_BOUNCE_LIMIT,
                    detail='  "quoted" and padded  ', created_at=T0 + 0.25,
                    expires_at=T0 + 30 * 86400),
        Suppression('"a@b"@example.net', "list:news", Reason.COMPLAINT, created_at=T0),
        Suppression("\u00fcser@\u00e9xample.net", GLOBAL, Reason.MANUAL, detail="caf\u00e9",
                    created_at=T0),
    ]
    for e in entries:
        first.add(e)
    second = make_store(kind, tmp_path, "second.db")
    result = load(second, export(first))
    assert result.errors == []
    assert second.list() == first.list()
    assert sorted(second.list(), key=lambda e: (e.address, e.scope)) == sorted(
        entries, key=lambda e: (e.address, e.scope))
    first.close()
    second.close()


# --- column layouts --------------------------------------------------------------------------

@pytest.mark.parametrize("column", [
    "email", "Email", "EMAIL", "email_address", "Email Address", "EmailAddress",
    "email-address", "address", "Address", "recipient", "Recipient", " email ",
])
def test_email_column_names(store: Store, column: str) -> None:
    result = load(store, f"id,{column},other\n1,bob@example.net,x\n")
    assert (result.added, result.errors) == (1, [])
    assert store.check("bob@example.net") is not None


@pytest.mark.parametrize(("layout", "rows"), [
    # SendGrid-like: email, created (Unix seconds).
    ("email,created\nbob@example.net,1700000000\n", [("bob@example.net", Reason.MANUAL)]),
    # Mailgun-like bounces: address, code, error, created_at (RFC 5322 date, quoted).
    (('address,code,error,created_at\nbob@example.net,550,No such user,'
      '"Tue, 14 Nov 2023 22:13:20 UTC"\n'), [("bob@example.net", Reason.MANUAL)]),
    # Amazon SES-like: EmailAddress, Reason in capitals.
    (("EmailAddress,Reason,LastUpdateTime\nbob@example.net,BOUNCE,x\n"
      "eve@example.net,COMPLAINT,y\n"),
     [("bob@example.net", Reason.HARD_BOUNCE), ("eve@example.net", Reason.COMPLAINT)]),
    # Postmark-like: SuppressionReason, CreatedAt.
    (("EmailAddress,SuppressionReason,Origin,CreatedAt\n"
      "bob@example.net,HardBounce,Recipient,2023-11-14T22:13:20Z\n"
      "eve@example.net,SpamComplaint,Recipient,2023-11-14T22:13:20Z\n"),
     [("bob@example.net", Reason.HARD_BOUNCE), ("eve@example.net", Reason.COMPLAINT)]),
    # Mailchimp-like: "Email Address" first among many columns.
    ('Email Address,First Name,Last Name,UNSUB_TIME\nbob@example.net,Bob,"Smith, Jr",\n',
     [("bob@example.net", Reason.MANUAL)]),
    # Semicolons (a spreadsheet in a comma-decimal locale), and a byte order mark.
    ("\ufeffE-mail;Reason\nbob@example.net;unsubscribe\n",
     [("bob@example.net", Reason.UNSUBSCRIBE)]),
    ("\ufeffEmail\tReason\nbob@example.net\tspam\n", [("bob@example.net", Reason.COMPLAINT)]),
    # Only the address.
    ("email\nbob@example.net\n", [("bob@example.net", Reason.MANUAL)]),
])
def test_service_layouts(store: Store, layout: str, rows: list[tuple[str, Reason]]) -> None:
    result = load(store, layout)
    assert result.errors == []
    assert [(e.address, e.reason) for e in store.list()] == rows


def test_no_email_column_names_the_columns_seen(store: Store) -> None:
    with pytest.raises(CsvFormatError) as err:
        load(store, "\ufeffname,mail_to,when\nbob,bob@example.net,1\n")
    assert "no email column" in str(err.value)
    assert "'name', 'mail_to', 'when'" in str(err.value)
    assert store.count() == 0


@pytest.mark.parametrize("text", ["", "\n", "\r\n\r\n"])
def test_an_empty_file_is_unusable(store: Store, text: str) -> None:
    with pytest.raises(CsvFormatError, match="empty file"):
        load(store, text)


def test_a_header_without_rows_imports_nothing(store: Store) -> None:
    assert load(store, "email,reason\n") == ImportResult(0, 0, 0, [])


# --- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("word", "reason"), [
    ("unsubscribe", Reason.UNSUBSCRIBE), ("Unsubscribed", Reason.UNSUBSCRIBE),
    ("bounce", Reason.HARD_BOUNCE), ("bounced", Reason.HARD_BOUNCE),
    ("hard_bounce", Reason.HARD_BOUNCE), ("hard-bounce", Reason.HARD_BOUNCE),
    ("Hard Bounce", Reason.HARD_BOUNCE), ("HardBounce", Reason.HARD_BOUNCE),
    ("invalid", Reason.HARD_BOUNCE), ("INVALID", Reason.HARD_BOUNCE),
    ("complaint", Reason.COMPLAINT), ("spam", Reason.COMPLAINT),
    ("spamreport", Reason.COMPLAINT), ("spam_report", Reason.COMPLAINT),
    ("SpamComplaint", Reason.COMPLAINT),
    ("soft-bounce-limit", Reason.SOFT_BOUNCE_LIMIT), ("manual", Reason.MANUAL),
    ("cleaned", Reason.MANUAL), ("blocked", Reason.MANUAL), ("soft bounce", Reason.MANUAL),
])
def test_reason_words(word: str, reason: Reason) -> None:
    assert reason_of(word) is reason


def test_empty_reason_takes_the_default(store: Store) -> None:
    load(store, "email,reason\nbob@example.net,\n", default_reason=Reason.UNSUBSCRIBE)
    load(store, "email\neve@example.net\n", default_reason=Reason.COMPLAINT)
    assert [e.reason for e in store.list()] == [Reason.UNSUBSCRIBE, Reason.COMPLAINT]


def test_an_unknown_reason_word_is_kept_as_detail(store: Store) -> None:
    load(store, "email,reason\nbob@example.net,cleaned\n")
    load(store, "email,reason,detail\neve@example.net,cleaned,by the list owner\n")
    assert [(e.reason, e.detail) for e in store.list()] == [
        (Reason.MANUAL, "cleaned"), (Reason.MANUAL, "by the list owner")]


@pytest.mark.parametrize(("text", "ts"), [
    ("2023-11-14T22:13:20Z", T0),
    ("2023-11-14T22:13:20+00:00", T0),
    ("2023-11-14T23:13:20+01:00", T0),
    ("2023-11-14 22:13:20", T0),  # no zone: UTC
    ("2023-11-14T22:13:20.500000Z", T0 + 0.5),
    ("2023-11-14", T0 - 22 * 3600 - 13 * 60 - 20),
    ("1700000000", T0),
    ("1700000000.5", T0 + 0.5),
    ("Tue, 14 Nov 2023 22:13:20 +0000", T0),
    ("Tue, 14 Nov 2023 22:13:20 UTC", T0),
])
def test_dates(text: str, ts: float) -> None:
    assert parse_time(text) == ts


def test_dates_go_into_created_at_and_default_to_now(store: Store) -> None:
    load(store, "email,date\nbob@example.net,1700000000\neve@example.net,\n")
    assert [e.created_at for e in store.list()] == [T0, NOW]


def test_scope_and_expiry_columns_and_the_default_scope(store: Store) -> None:
    load(store, "email,scope,expires_at\nbob@example.net,shop.example,2023-11-15T22:13:20Z\n"
                "eve@example.net,,\n", scope="news.example")
    assert [(e.scope, e.expires_at) for e in store.list()] == [
        ("shop.example", T0 + 86400), ("news.example", None)]


# --- bad rows --------------------------------------------------------------------------------

BAD_ROWS = """\
email,reason,created_at
good1@example.net,bounce,2023-11-14T22:13:20Z
no-at-sign,bounce,

unquoted space@example.net,spam,
bob@,bounce,
good2@EXAMPLE.net,,
bob@example.net,bounce,yesterday
"multi
line"@example.net,manual,
,bounce,
bob@example.net,bounce,1700000000000
bob@-bad-.example,bounce,
good3@example.net,unsubscribe,1700000000
"""


def test_bad_rows_are_reported_by_line_and_skipped(store: Store) -> None:
    result = load(store, BAD_ROWS)
    assert result.errors == [
        (3, "no @ in address 'no-at-sign'"),
        (5, "invalid address 'unquoted space@example.net'"),
        (6, "invalid address 'bob@'"),
        (8, "cannot read date 'yesterday'"),
        # CSV quoting ate the quotes: what is left is not a valid address.
        (9, "invalid address 'multi\\nline@example.net'"),
        (11, "no address"),
        (12, "date out of range '1700000000000'"),
        (13, "invalid address 'bob@-bad-.example'"),
    ]
    assert (result.added, result.updated, result.skipped) == (3, 0, 8)
    assert [e.address for e in store.list()] == [
        "good1@example.net", "good2@example.net", "good3@example.net"]


def test_repeated_and_existing_addresses_count_as_updated(store: Store) -> None:
    store.add(Suppression("old@example.net", GLOBAL, Reason.MANUAL, created_at=T0))
    result = load(store, "email,reason\nold@example.net,spam\nnew@example.net,bounce\n"
                         "NEW@example.net,bounce\nnew@Example.NET,spam\n")
    assert (result.added, result.updated, result.skipped) == (2, 2, 0)
    assert [(e.address, e.reason) for e in store.list()] == [
        ("NEW@example.net", Reason.HARD_BOUNCE), ("new@example.net", Reason.COMPLAINT),
        ("old@example.net", Reason.COMPLAINT)]
