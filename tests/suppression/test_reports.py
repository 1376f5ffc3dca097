"""parse_report over real-world shaped DSNs, NDRs, plain-text bounces and ARF complaints
(anonymised samples in tests/data/reports), and over garbage, which must never raise."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.outbound.verp import Verp
from relay.suppression.reports import Report, ReportRecipient, parse_report

REPORTS = Path(__file__).resolve().parents[1] / "data" / "reports"
SAMPLES = sorted(p.name for p in REPORTS.glob("*.eml"))


def sample(name: str) -> bytes:
    return (REPORTS / name).read_bytes()


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def token_address(suffix: str) -> str:
    return f"bounces+{suffix}@bounce.example.com"


# --- DSNs: one row per sample ---------------------------------------------------------------

DSN_TABLE = [
    # sample, source, reporting domain, message-id, return path, recipients
    ("gmail-dsn.eml", "rfc3464", "googlemail.example.net",
     "<20261203100000.7F3A9C21D04B2E@example.com>",
     token_address("g5ddgqjzimzdcrbqgrbderl2dkmf5eoxrrwsy2q"),
     [("nobody@example.net", "failed", "5.1.1", None, "mx.example.net")]),
    ("outlook-ndr.eml", "rfc3464", "bn8pr12mb0001.namprd12.prod.outlook.example.net",
     "<20261203100000.7F3A9C21D14C31@example.com>",
     token_address("g5ddgqjzimzdcrbrgrbtgmibaibz7drjekhtsha"),
     [("gone@example.net", "failed", "5.1.10", "gone@example.net", None)]),
    ("postfix-dsn.eml", "rfc3464", "mx.example.net",
     "<20261203100000.7F3A9C21E0A1F7@example.com>",
     token_address("g5ddgqjzimzdcrjqieyumn6fyohln6s5pv2ghwq"),
     [("missing@example.net", "failed", "5.1.1", "missing@example.net",
       "mailstore1.example.net")]),
    ("qmail-bounce.eml", "flufl.bounce", "mail.example.org",
     "<20261203100000.7F3A9C21F2B3C4@example.com>",
     token_address("g5ddgqjzimzdcrrsiizugnf6nybhb5g4wir7oca"),
     [("user@example.org", "failed", "5.1.1", None, None)]),
    ("delayed-dsn.eml", "rfc3464", "mx2.example.org",
     "<20261203100000.7F3A9C2201D5E6@example.com>",
     token_address("g5ddgqjzimzdembriq2uknxbzajzwfgl3dqdqnq"),
     [("slow@example.org", "delayed", "4.2.2", "slow@example.org", "mail.example.org")]),
    ("multi-recipient-dsn.eml", "rfc3464", "mail.example.org",
     "<20261203100000.7F3A9C2210E7F8@example.com>",
     token_address("g5ddgqjzimzdemjqiu3umoe6fydsngmqmv22lei"),
     [("alice.gone@example.org", "failed", "5.1.1", None, "mailhub.example.org"),
      ("bob.full@example.org", "delayed", "4.2.2", None, "mailhub.example.org"),
      ("carol@lists.example.org", "relayed", "2.0.0", "Carol@Example.ORG",
       "legacy.example.org"),
      ("dave@example.org", "delivered", "2.0.0", None, None)]),
]


@pytest.mark.parametrize("line_ending", ["lf", "crlf"])
@pytest.mark.parametrize(("name", "source", "domain", "message_id", "return_path", "rcpts"),
                         DSN_TABLE, ids=[row[0] for row in DSN_TABLE])
def test_dsn(name: str, source: str, domain: str, message_id: str, return_path: str,
             rcpts: list[tuple[str, str, str, str | None, str | None]],
             line_ending: str) -> None:
    raw = sample(name) if line_ending == "lf" else crlf(sample(name))
    report = parse_report(raw, verp_address=return_path)
    assert report.kind == "dsn"
    assert report.source == source
    assert report.errors == []
    assert report.reporting_domain == domain
    assert report.original_message_id == message_id
    assert report.original_return_path == return_path
    assert report.original_from == "news@example.com"
    assert report.verp_address == return_path
    assert report.raw == raw
    assert report.feedback_type is None
    got = [(r.address, r.action, r.status, r.original_recipient, r.remote_mta)
           for r in report.recipients]
    assert got == rcpts


def test_gmail_details() -> None:
    report = parse_report(sample("gmail-dsn.eml"))
    (rcpt,) = report.recipients
    assert rcpt.permanent
    # Folding undone, the "smtp;" type dropped, multi-line reply kept whole.
    assert rcpt.diagnostic.startswith("550-5.1.1 The email account that you tried to reach")
    assert rcpt.diagnostic.endswith("a1si1234567qkb.1 - gsmtp")
    assert "\n" not in rcpt.diagnostic
    assert report.reporting_mta == "googlemail.example.net"
    assert report.arrival_date == "Thu, 03 Dec 2026 02:00:01 -0800 (PST)"
    assert report.original_recipients == ["nobody@example.net"]


def test_outlook_ndr_details() -> None:
    report = parse_report(sample("outlook-ndr.eml"))
    (rcpt,) = report.recipients
    assert rcpt.diagnostic == ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient "
                               "gone@example.net not found by SMTP address lookup")
    assert report.original_recipients == ["gone@example.net"]   # display name dropped


def test_postfix_return_path_falls_back_to_x_postfix_sender() -> None:
    raw = sample("postfix-dsn.eml").replace(
        b"Return-Path: <bounces+g5ddgqjzimzdcrjqieyumn6fyohln6s5pv2ghwq@bounce.example.com>\n"
        b"Received: from relay", b"Received: from relay")
    report = parse_report(raw)
    assert report.original_return_path == \
        token_address("g5ddgqjzimzdcrjqieyumn6fyohln6s5pv2ghwq")
    assert "Recipient address rejected" in report.recipients[0].diagnostic


def test_delayed_is_not_permanent() -> None:
    (rcpt,) = parse_report(sample("delayed-dsn.eml")).recipients
    assert (rcpt.action, rcpt.permanent) == ("delayed", False)
    assert rcpt.diagnostic == "452 4.2.2 <slow@example.org>: Mailbox full"


def test_multi_recipient_details() -> None:
    report = parse_report(sample("multi-recipient-dsn.eml"))
    assert [r.permanent for r in report.recipients] == [True, False, False, False]
    assert report.original_recipients == ["alice.gone@example.org", "bob.full@example.org",
                                          "Carol@Example.ORG", "dave@example.org"]


def test_qmail_through_flufl() -> None:
    report = parse_report(sample("qmail-bounce.eml"))
    (rcpt,) = report.recipients
    # The status comes from the bounce text next to the address, not the 5.0.0 default.
    assert rcpt.status == "5.1.1" and rcpt.permanent
    assert "Remote host said: 550 5.1.1" in rcpt.diagnostic
    assert "192.0.2.31" in rcpt.diagnostic
    assert report.original_recipients == ["user@example.org"]


def test_flufl_without_a_status_code_assumes_5_0_0() -> None:
    raw = sample("qmail-bounce.eml").replace(
        b"Remote host said: 550 5.1.1 <user@example.org>... User unknown\n", b"")
    (rcpt,) = parse_report(raw).recipients
    assert (rcpt.address, rcpt.action, rcpt.status) == ("user@example.org", "failed", "5.0.0")
    assert "192.0.2.31" in rcpt.diagnostic  # an IP address is not taken for a status code


@pytest.mark.parametrize("sender", [b"From: \n", "From: Mäiler <ma\u00efler@example.org>\n".encode()])
def test_flufl_detector_crash_does_not_hide_the_bounce(sender: bytes,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """flufl 6.0's Yale detector raises on an empty From and its Sina detector on an 8-bit
    one, both before the qmail detector runs: the bounce is still read, quietly."""
    raw = sample("qmail-bounce.eml").replace(b"From: MAILER-DAEMON@mail.example.org\n", sender)
    report = parse_report(raw)
    assert report.kind == "dsn" and report.source == "flufl.bounce"
    assert [r.address for r in report.recipients] == ["user@example.org"]
    assert not [r for r in caplog.records if r.name.startswith("flufl")]


# --- ARF complaints ----------------------------------------------------------------------------

ARF_TABLE = [
    # sample, reporting domain, user agent, version, arrival date, source ip, reporting mta,
    # original recipients, message-id, VERP suffix
    ("yahoo-arf.eml", "arf.mail.yahoo.example.net", "Yahoo!-Mail-Feedback/2.0", "0.1",
     "Thu, 03 Dec 2026 10:00:01 +0000", None, None, ["reader@example.net"],
     "<20261203100000.7F3A9C2322A1B2@example.com>", "g5ddgqjzimzdgmrsieyuems7ci2jdndyp76zv7q"),
    ("microsoft-jmrp.eml", "hotmail.example.net", "Hotmail FBL", "1",
     "Thu, 03 Dec 2026 02:00:01 -0800", "192.0.2.10", None, ["reader2@example.net"],
     "<20261203100000.7F3A9C2333C3D4@example.com>", "g5ddgqjzimzdgmztimzuincrqhfzig6iqml5pgi"),
    ("aol-arf.eml", "omr-m10.mx.aol.example.net", "AOL SComp", "0.1",
     "Thu, 03 Dec 2026 05:00:01 -0500", "192.0.2.10", "omr-m10.mx.aol.example.net", [],
     "<20261203100000.7F3A9C2344E5F6@example.com>", "g5ddgqjzimzdgnbuiu2umnsbmugan5twe6lct4a"),
]


@pytest.mark.parametrize("line_ending", ["lf", "crlf"])
@pytest.mark.parametrize(("name", "domain", "agent", "version", "arrival", "ip", "mta",
                          "rcpts", "message_id", "token"),
                         ARF_TABLE, ids=[row[0] for row in ARF_TABLE])
def test_arf(name: str, domain: str, agent: str, version: str, arrival: str, ip: str | None,
             mta: str | None, rcpts: list[str], message_id: str, token: str,
             line_ending: str) -> None:
    raw = sample(name) if line_ending == "lf" else crlf(sample(name))
    report = parse_report(raw, verp_address="fbl@bounce.example.com")
    assert (report.kind, report.source) == ("arf", "rfc5965")
    assert report.errors == []
    assert report.feedback_type == "abuse"
    assert report.reporting_domain == domain
    assert report.user_agent == agent
    assert report.version == version
    assert report.arrival_date == arrival
    assert report.source_ip == ip
    assert report.reporting_mta == mta
    assert report.original_recipients == rcpts
    assert report.original_message_id == message_id
    assert report.original_mail_from == token_address(token)
    assert report.original_return_path == token_address(token)
    assert report.original_from == "news@example.com"
    assert report.recipients == []
    assert report.verp_address == "fbl@bounce.example.com"


def test_arf_headers_only_and_several_rcpt_to() -> None:
    """RFC 5965 2: the third part may be text/rfc822-headers; Original-Rcpt-To repeats."""
    raw = (b"From: fbl@isp.example.net\r\n"
           b"To: fbl@bounce.example.com\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; report-type=feedback-report; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
           b"--b\r\nContent-Type: message/feedback-report\r\n\r\n"
           b"Feedback-Type: Abuse\r\nUser-Agent: SomeFBL/1.0\r\nVersion: 1\r\n"
           b"Original-Rcpt-To: <one@example.net>\r\nOriginal-Rcpt-To: two@example.net\r\n"
           b"Reporting-MTA: dns; 192.0.2.9\r\n"
           b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
           b"Message-ID: <m1@example.com>\r\nTo: one@example.net\r\n"
           b"From: news@example.com\r\n\r\n"
           b"--b--\r\n")
    report = parse_report(raw)
    assert report.kind == "arf"
    assert report.feedback_type == "abuse"
    assert report.original_recipients == ["one@example.net", "two@example.net"]
    assert report.original_message_id == "<m1@example.com>"
    # An address literal is no reporting domain: fall back to the From domain.
    assert report.reporting_mta == "192.0.2.9"
    assert report.reporting_domain == "isp.example.net"


def test_arf_unregistered_feedback_type_is_noted() -> None:
    raw = sample("aol-arf.eml").replace(b"Feedback-Type: abuse", b"Feedback-Type: spam")
    report = parse_report(raw)
    assert report.kind == "arf" and report.feedback_type == "spam"
    assert report.errors == ["unregistered Feedback-Type 'spam'"]


# --- VERP: the sample's return path names the message and recipient ----------------------------

@pytest.mark.parametrize(("name", "queue_id", "rcpt"), [
    ("gmail-dsn.eml", "7F3A9C21D04B2E", "nobody@example.net"),
    ("postfix-dsn.eml", "7F3A9C21E0A1F7", "missing@example.net"),
    ("qmail-bounce.eml", "7F3A9C21F2B3C4", "user@example.org"),
    ("yahoo-arf.eml", "7F3A9C2322A1B2", "reader@example.net"),
])
def test_verp_matches_after_parsing(name: str, queue_id: str, rcpt: str) -> None:
    """Tokens made now (the secret never sits in the repo) replace the samples' ones."""
    verp = Verp(secrets.token_bytes(32), domain="bounce.example.com")
    address = verp.return_path(queue_id, rcpt)
    raw = sample(name)
    old = parse_report(raw).original_return_path
    assert old is not None
    report = parse_report(raw.replace(old.encode(), address.encode()), verp_address=address)
    assert report.original_return_path == address
    for found in (report.verp_address, report.original_return_path):
        assert verp.verify(found, lambda q: [rcpt, "other@example.net"] if q == queue_id
                           else []) == (queue_id, rcpt)
    if report.kind == "arf":
        assert report.original_mail_from == address


# --- odd but legal encodings ----------------------------------------------------------------------

def _dsn(status_part: bytes, ctype: bytes = b"message/delivery-status") -> bytes:
    return (b"From: MAILER-DAEMON@mx.example.net\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nFailed.\r\n"
            b"--b\r\nContent-Type: " + ctype + b"\r\n" + status_part +
            b"--b--\r\n")


FIELDS = (b"Reporting-MTA: dns; mx.example.net\r\nOriginal-Envelope-Id: 7F3A9C21D04B2E\r\n\r\n"
          b"Final-Recipient: rfc822; <x@example.net>\r\nAction: Failed\r\n"
          b"Status: 5.1.1 (bad destination mailbox address)\r\n")


def test_base64_delivery_status_part() -> None:
    part = (b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(FIELDS).replace(b"\n", b"\r\n"))
    report = parse_report(_dsn(part))
    assert report.kind == "dsn"
    assert report.recipients == [ReportRecipient("x@example.net", "failed", "5.1.1")]
    assert report.envelope_id == "7F3A9C21D04B2E"


def test_global_delivery_status() -> None:
    """RFC 6533 3: the UTF-8 delivery-status of an SMTPUTF8 message."""
    fields = FIELDS.replace(b"rfc822; <x@example.net>",
                            "utf-8; jürgen@例え.example.net".encode())
    report = parse_report(_dsn(b"\r\n" + fields, b"message/global-delivery-status"))
    assert report.kind == "dsn"
    assert report.recipients[0].address == "jürgen@例え.example.net"


def test_missing_status_and_action_are_derived() -> None:
    fields = (b"\r\nReporting-MTA: dns; mx.example.net\r\n\r\n"
              b"Final-Recipient: rfc822; a@example.net\r\nAction: failed\r\n"
              b"Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\r\n"
              b"Final-Recipient: rfc822; b@example.net\r\nStatus: 4.4.7\r\n")
    report = parse_report(_dsn(fields))
    assert [(r.address, r.action, r.status) for r in report.recipients] == [
        ("a@example.net", "failed", "5.1.1"), ("b@example.net", "delayed", "4.4.7")]
    assert len(report.errors) == 2


# --- garbage --------------------------------------------------------------------------------------

def test_malformed_sample() -> None:
    report = parse_report(sample("malformed.eml"), verp_address="bounces+zzzz@x.example")
    assert report.kind == "unknown"
    assert report.recipients == []
    assert report.verp_address == "bounces+zzzz@x.example"
    assert "per-recipient block without a usable Final-Recipient skipped" in report.errors
    assert any("x400" in e for e in report.errors)
    assert "delivery-status part without a usable recipient" in report.errors


@pytest.mark.parametrize("raw", [
    b"", b"\r\n\r\n", b"\x00\xff\xfe", b"not a message at all",
    (b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"unterminated\r\n"
     b"\r\n--unterminated\r\nContent-Type: message/delivery-status\r\n\r\nAction: failed\r\n"),
    (b"Content-Type: multipart/report; report-type=feedback-report; boundary=b\r\n\r\n"
     b"--b\r\nContent-Type: text/plain\r\n\r\nno report part\r\n--b--\r\n"),
    b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary\r\n",
    b"Content-Type: message/rfc822\r\n\r\n" * 200,
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" * 300,
    b"From: =?utf-8?b?////?= <@>\r\nSubject: \xff\xfe\r\n\r\nbody\r\n",
    _dsn(b"\r\n" + b"Final-Recipient: rfc822; x@example.net\r\nAction: failed\r\n" * 3),
])
def test_garbage_never_raises(raw: bytes) -> None:
    report = parse_report(raw)
    assert isinstance(report, Report)
    if report.kind == "unknown":
        assert report.errors


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000) | st.sampled_from(SAMPLES).flatmap(
    lambda name: st.tuples(st.just(sample(name)), st.integers(0, 4000),
                           st.binary(max_size=40)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])))
def test_fuzz_never_raises(raw: bytes) -> None:
    report = parse_report(raw)
    assert report.kind in ("dsn", "arf", "unknown")
    assert report.kind != "unknown" or report.errors


def test_every_sample_is_covered() -> None:
    covered = {row[0] for row in DSN_TABLE} | {row[0] for row in ARF_TABLE} | {"malformed.eml"}
    assert covered == set(SAMPLES)
