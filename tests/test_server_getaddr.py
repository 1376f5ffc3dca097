"""The fast path of the edge's address parser gives exactly aiosmtpd's answers.

`RelaySMTP._getaddr` answers the common path forms ("<>", "<dot-atom@ldh.domain>",
"<a@[192.0.2.1]>") with one regular expression and leaves everything else to aiosmtpd's
parser (the stdlib's RFC 5322 header parser). The fast path is only allowed to be faster:
over a large table of valid, odd and invalid arguments (the tests' tables, the shared
cases, wrappers with parameters and comments, and seeded random strings) both paths must
return the same tuple, and SMTP replies must not change.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.queue.memory import MemoryQueueStore
from relay.server import Edge, RelaySMTP, _fast_getaddr
from tests.conftest import relay_config
from tests.support.downstream import Downstream
from tests.support.transcript import parse
from tests.support.wire import Wire
from tests.test_address import MAILBOXES
from tests.test_server import open_wire

LONG = "x" * 64

# Path arguments as aiosmtpd hands them to _getaddr: after "FROM:"/"TO:", stripped.
ODD_ARGS = [
    "", "<", ">", "<>", "<> ", "<> SIZE=10", "<>  SIZE=10", "<>(c)", "<>x", "<><>", "<<>>",
    "<a@example.net>", "<A.B-c+tag@Example.NET>", "<!#$%&'*+/=?^_`{|}~-@example.net>",
    "<a@b>", "<a@localhost>", "<a@123.example>", "<a@xn--bcher-kva.example>",
    "<a@example.net.>", "<a@.example.net>", "<a@-bad.example>", "<a@bad-.example>",
    "<a@exa_mple.net>", "<a@example..net>", "<a.@example.net>", "<.a@example.net>",
    "<a..b@example.net>", "<a@@example.net>", "<@example.net>", "<a@>", "<a>", "<a@ b>",
    "<a @b>", "< a@b>", "<a@b >", "<a@b\t>", "<a@b", "<a@b>>", "<<a@b>>",
    "<a@[192.0.2.1]>", "<a@[IPv6:2001:db8::1]>", "<a@[IPv6:::1]>", "<a@[300.1.1.1]>",
    "<a@[192.0.2]>", "<a@[2001:db8::1]>", "<a@[example.net]>", "<a@[192.0.2.1>",
    "<a@[ 192.0.2.1 ]>", "<a@[192.0.2.1] >", "<a@[1.2\\.3]>", "<a@[]>",
    "<a@example.net> SIZE=1000 BODY=8BITMIME", "<a@example.net>  SIZE=10",
    "<a@example.net>\tSIZE=10", "<a@example.net> \tSIZE=10", "<a@example.net> ",
    "<a@example.net>SIZE=10", "<a@example.net>(comment)", "<a@example.net> (comment) X=1",
    "<a@example.net>(a(b)c) X", "<a@example.net> (unterminated", "<a@example.net>\x0bX",
    "<a@example.net> \x0bX", "<a@example.net> \x85X", "<a@example.net> \u3000X",
    "<a@example.net> \r\nX", "<a@example.net>\x00", "<a@example.net> NOTIFY=NEVER",
    "<=?utf-8?q?abc?=@example.net>", "<=?utf-8?q?a=40b?=@example.net>", "<=?x@example.net>",
    "<a=?utf-8?q?abc?=@example.net>", "<=a@example.net>", "<?=@example.net>",
    "<a@=?utf-8?q?x?=.example>", '<"odd user"@example.net>', '<"a@b"@example.net>',
    '<"a>b"@example.net>', '<"a\\"b"@example.net>', '<"a\\\\"@example.net>',
    '<"a b"@example.net> NOTIFY=NEVER', '<""@example.net>', '<"abc"@example.net>',
    '<"a"b@example.net>', '<a"b"@example.net>', '<"a\\', "<a\\b@example.net>",
    "<a(comment)@example.net>", "<a@(comment)example.net>", "<(c)a@example.net>",
    "<a,b@example.net>", "<a;b@example.net>", "<a:b@example.net>", "<a[b@example.net>",
    "<@hop1.example.org,@hop2.example.org:a@example.net>", "<@hop1.example.org:a@example.net>",
    "<@[192.0.2.1]:a@example.net>", "<@hop1.example.org a@example.net>",
    "<@hop1.example.org,hop2.example.org:a@example.net>", "<@-bad-.example:a@example.net>",
    "<jörg@example.net>", "<a@bücher.example>", "<用户@例子.广告>", "<\udcff@example.net>",
    "<a\udcff@example.net>", "<jörg@example.net> SMTPUTF8",
    "a@example.net", "a@example.net SIZE=10", "a@example.net>", " <a@example.net>",
    "\t<a@example.net>", "(c)<a@example.net>", "no-domain", "<no-domain>",
    "<a@example.net\x00>", "<a\x00@example.net>", "<a@exam\x7fple.net>",
    f"<{LONG}@example.net>", f"<{LONG}x@example.net>", f"<{LONG}.{LONG}@example.net>",
    "<a@" + "d" * 63 + ".example>", "<a@" + "d" * 64 + ".example>",
    "<a@" + ".".join(["label"] * 60) + ">", "<" + "a" * 3000 + "@" + "b" * 3000,
    "<" + "a." * 500 + "@example.net>", "<a@" + "b-" * 1000 + ">",
]

WRAPPERS = [
    "<{}>", "<{}> SIZE=10", "<{}>  SIZE=10 BODY=8BITMIME", "<{}>\tSIZE=10", "<{}>(c) X",
    "<{}> (c)", "<{}>x", "<{}", "{}", " <{}>", "<{}>>", "<<{}>>", "<{}> ", "<{}>\x0bX",
]


def _case_args() -> list[str]:
    """Every MAIL FROM:/RCPT TO:/VRFY argument of the shared cases, as aiosmtpd sees it."""
    from tests.conftest import CASES

    args = []
    for path in sorted(Path(CASES).glob("*.smtp")):
        for step in parse(path).steps:
            if step[0] != "send":
                continue
            for line in b"".join(step[1]).split(b"\r\n"):
                for keyword in (b"MAIL FROM:", b"RCPT TO:", b"VRFY "):
                    if line.upper().startswith(keyword):
                        args.append(line[len(keyword):].strip().decode(
                            "utf-8", "surrogateescape"))
    return args


def _random_args(count: int) -> list[str]:
    """Seeded random strings over the characters that matter to either parser."""
    rng = random.Random(5321)
    pieces = ["<", ">", "a", "Z", "0", "9", ".", "..", "@", "-", "=?", "?=", "=", "?", "[",
              "]", "IPv6:", ":", "1", "192.0.2.1", " ", "\t", "(", ")", '"', "\\", "é",
              "\udcff", "!", "example", "net", "\x00", "\x0b", "\x85", "_", "+", ",", ";",
              " SIZE=1", "xn--", "/", "{", "|"]
    locals_ = ["a", "A.b", "a-b", "a+tag", "=?x?=", "a..b", ".a", "a.", '"q"', "é", "", "a b",
               "a(c)", "x" * 65, "o'neil", "a=?b"]
    domains = ["example.net", "b", "ex-ample.net", "-x.net", "x-.net", "[192.0.2.1]",
               "[IPv6:::1]", "[x]", "", "bücher.example", "a..b", "a_b.net", "a.b.c.d.e",
               "EXAMPLE.NET", "1.2.3.4", "[1.2.3.4", "x" * 70 + ".net"]
    tails = ["", " ", " SIZE=10", "  A B", "\tX", "(c)", " (c) X", "x", ">", "\x0b", "\x85Y"]
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
        else:
            out.append(f"<{rng.choice(locals_)}@{rng.choice(domains)}>{rng.choice(tails)}")
    return out


def _table() -> list[str]:
    args = list(ODD_ARGS) + _case_args() + _random_args(6000)
    for mailbox, _, _ in MAILBOXES:
        args += [wrapper.format(mailbox) for wrapper in WRAPPERS]
    return list(dict.fromkeys(args))


TABLE = _table()


def _outcome(getaddr: Callable[[str], tuple[str | None, str | None]],
             arg: str) -> tuple[str | None, str | None] | str:
    """The parser's answer, or the name of what it raised (the same for both paths)."""
    try:
        return getaddr(arg)
    except Exception as error:  # noqa: BLE001 - compared, not hidden
        return type(error).__name__


@pytest.fixture
async def protocol(tmp_path: Path) -> RelaySMTP:
    edge = Edge(relay_config(tmp_path, 1), MemoryQueueStore(), lambda: None)
    return edge._protocol(False)


@pytest.mark.parametrize("local_part_limit", [0, 3, 64])
async def test_fast_and_slow_getaddr_agree_on_every_argument(protocol: RelaySMTP,
                                                            local_part_limit: int) -> None:
    protocol.local_part_limit = local_part_limit
    fast_taken = 0
    mismatches = []
    for arg in TABLE:
        slow = _outcome(protocol._slow_getaddr, arg)
        fast = _fast_getaddr(arg, local_part_limit)
        if fast is not None:
            fast_taken += 1
            if fast != slow:
                mismatches.append((arg, fast, slow))
        if _outcome(protocol._getaddr, arg) != slow:
            mismatches.append((arg, _outcome(protocol._getaddr, arg), slow))
    assert mismatches == []
    assert len(TABLE) > 5000 and fast_taken > 200   # the table exercises both paths


@pytest.mark.parametrize("arg", [
    "<>", "<> SIZE=10", "<a@example.net>", "<news@example.com> SIZE=10000",
    "<a.b-c+tag@sub.example.net> BODY=8BITMIME SMTPUTF8", "<a@[192.0.2.1]>",
    "<a@[IPv6:2001:db8::1]>", "<!#$%&'*+/=?^_`{|}~-@example.net>", f"<{LONG}@example.net>",
])
def test_common_forms_take_the_fast_path(arg: str) -> None:
    assert _fast_getaddr(arg, 0) is not None


@pytest.mark.parametrize("arg", [
    '<"odd user"@example.net>', "<@hop1.example.org:a@example.net>", "<jörg@example.net>",
    "<a@example.net>(comment)", "<a@example.net> (c) SIZE=1", "<=?utf-8?q?a?=@example.net>",
    "<a..b@example.net>", "<a@-bad.example>", "a@example.net", "<a@example.net",
])
def test_other_forms_are_left_to_aiosmtpd(arg: str) -> None:
    assert _fast_getaddr(arg, 0) is None


# SMTP-level: the replies for paths at the border of the fast path (recorded before it).
@pytest.mark.parametrize("mail, rcpt, code, enhanced", [
    ("<>", "<reader@example.net>", 250, "2.1.5"),
    ("<> SIZE=100", "<reader@example.net>", 250, "2.1.5"),
    ("<a@example.com>  SIZE=100", "<reader@example.net>  ", 250, "2.1.5"),
    ("<a@example.com>", "<reader@example.net>(comment)", 501, "5.1.3"),
    ("<a@example.com>", "<reader@example.net> (comment)", 250, "2.1.5"),
    ("<a@example.com>", "<reader@example.net>x", 555, "5.5.4"),
    ("<a@example.com>", "<=?utf-8?q?abc?=@example.net>", 250, "2.1.5"),
    ("<a@example.com>", "<reader@example.net> FOO", 555, "5.5.4"),
    ("<a@example.com>", "<reader@localhost>", 501, "5.1.3"),
    ("<a@example.com>", "<reader@[IPv6:2001:db8::1]>", 250, "2.1.5"),
    ("<a@example.com>", f"<{LONG}x@example.net>", 501, "5.1.3"),
])
async def test_rcpt_replies_around_the_fast_path(downstream: Downstream, start_relay, mail,
                                                 rcpt, code, enhanced) -> None:
    relay = await start_relay(downstream.port)
    wire: Wire = await open_wire(relay)
    assert (await wire.cmd(f"MAIL FROM:{mail}")).code == 250
    reply = await wire.cmd(f"RCPT TO:{rcpt}")
    assert (reply.code, reply.enhanced) == (code, enhanced), reply
    await wire.close()


@pytest.mark.parametrize("line", ["MAIL FROM:<a@[192.0.2.1>", "MAIL FROM:<a@[IPv6:::1> SIZE=1"])
async def test_unclosed_address_literal_is_a_syntax_error(downstream: Downstream, start_relay,
                                                          line: str) -> None:
    """The stdlib parser raises AttributeError here; that is the client's error (5xx),
    not an internal one (451, retried for ever)."""
    relay = await start_relay(downstream.port)
    wire: Wire = await open_wire(relay)
    reply = await wire.cmd(line)
    assert (reply.code, reply.enhanced) == (553, "5.1.3"), reply
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    reply = await wire.cmd("RCPT TO:<r@[192.0.2.1>")
    assert (reply.code, reply.enhanced) == (553, "5.1.3"), reply
    await wire.close()
