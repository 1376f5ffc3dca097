"""Every SMTP reply the relay writes, in one table (in the manner of Postfix's cleanup_strerror.c).

A reply carries its basic code and its RFC 3463 enhanced status code; `str(reply)` is the
line that goes on the wire. aiosmtpd's own built-in replies have no enhanced codes, so
`with_enhanced_code()` gives them one on their way out (the edge calls it from `push`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def format(self, **kw: object) -> str:
        return f"{self.code} {self.enhanced} {self.text.format(**kw)}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500


# --- the edge ----------------------------------------------------------------------------
R221_BYE = Reply(221, "2.0.0", "Bye")
R250_OK = Reply(250, "2.0.0", "Ok")
R250_SENDER_OK = Reply(250, "2.1.0", "Ok")
R250_RCPT_OK = Reply(250, "2.1.5", "Ok")
R250_QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
R421_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
R421_TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many connections, try again later")
R421_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
R421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many unrecognized commands, closing connection")
R452_BUSY = Reply(452, "4.3.1", "Insufficient system resources, try again later")
R451_QUEUE_WRITE = Reply(451, "4.3.0", "Error: queue file write error, try again later")
R451_INTERNAL = Reply(451, "4.3.0", "Error: internal error, try again later")
R452_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
R501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R501_BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
R501_CONTROL_CHARS = Reply(501, "5.5.2", "Control characters are not allowed in addresses")
R503_NO_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
R550_RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
R550_BARE_NEWLINE = Reply(
    550, "5.6.0",
    "Message contains bare CR or LF; only CRLF ends a line (RFC 5322 2.3, RFC 5321 2.3.8)")
R550_NUL = Reply(550, "5.6.0", "Message contains a NUL octet (RFC 5322 2.3)")
R552_TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
R553_UTF8_NEEDS_SMTPUTF8 = Reply(
    553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter (RFC 6531 3.4)")
R554_LINE_TOO_LONG = Reply(
    554, "5.6.0", "Message content rejected: text line longer than 998 octets "
    "(RFC 5321 4.5.3.1.6)")
R554_NO_VALID_RCPTS = Reply(554, "5.5.1", "Error: no valid recipients")

# --- access and policy -------------------------------------------------------------------
R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R454_AUTH_LOCKED = Reply(
    454, "4.7.0", "Too many failed authentication attempts from your address, try again later")
R502_AUTH_DISABLED = Reply(502, "5.5.1", "Error: authentication not enabled")
R501_BAD_AUTH_PARAM = Reply(501, "5.5.4", "Malformed AUTH= parameter (RFC 4954 section 5)")
R553_SENDER_NOT_OWNED = Reply(
    553, "5.7.1", "Sender address rejected: domain not allowed for application {app}")
R550_FROM_NOT_OWNED = Reply(
    550, "5.7.1", "From header domain {domain} is not allowed for application {app}")
R550_NO_FROM = Reply(550, "5.6.0", "Message has no From header (RFC 5322 3.6)")
R550_MULTIPLE_FROM = Reply(550, "5.6.0", "Message has more than one From header (RFC 5322 3.6)")
R550_BAD_HEADER = Reply(550, "5.6.0", "Malformed header section (RFC 5322 2.2)")
R552_HEADER_TOO_BIG = Reply(552, "5.3.4", "Header section too big")
R550_HEADER_LINE_TOO_LONG = Reply(
    550, "5.6.0", "Header line longer than 998 octets that cannot be folded (RFC 5322 2.1.1)")
R550_NO_DKIM_KEY = Reply(
    550, "5.7.1", "No DKIM key is configured for From domain {domain}; unsigned mail refused")
R550_BAD_STREAM = Reply(
    550, "5.6.0", "X-Relay-Stream must be \"transactional\" or \"marketing\"")
R550_SUPPRESSED = Reply(550, "5.7.1", "Recipient address suppressed ({reason})")
R550_CANNOT_SIGN = Reply(550, "5.6.0", "Message cannot be DKIM-signed: {why}")
R250_LOCAL_TAKEN = Reply(250, "2.0.0", "Ok: received")
R451_RATE_APP = Reply(
    451, "4.7.1", "Rate limit for application {app} reached ({limit}), try again later")
R451_RATE_CLIENT = Reply(
    451, "4.7.1", "Rate limit for your address reached ({limit}), try again later")

# --- outbound (replies the relay records for a recipient when it did not get one) ------
R451_CONNECT_FAILED = Reply(451, "4.4.1", "Connection to next hop failed: {detail}")
R451_CONNECTION_LOST = Reply(451, "4.4.2", "Connection to next hop lost: {detail}")
R451_TIMEOUT = Reply(451, "4.4.2", "Timeout talking to next hop: {detail}")
R451_TLS_FAILED = Reply(451, "4.7.5", "TLS with next hop failed: {detail}")
R451_AUTH_FAILED = Reply(451, "4.7.0", "Authentication with next hop failed: {detail}")
R451_DELIVERY_ERROR = Reply(451, "4.3.0", "Local delivery error: {detail}")
R550_NEEDS_SMTPUTF8 = Reply(
    550, "5.6.7", "Next hop does not support SMTPUTF8, which this message needs (RFC 6531 3.4)")
R554_NEEDS_8BITMIME = Reply(
    554, "5.6.3", "Next hop does not support 8BITMIME, which this message needs (RFC 6152)")
R552_NEXT_HOP_SIZE = Reply(
    552, "5.3.4", "Message too big for next hop (its SIZE limit is {limit})")
# --- direct delivery (mode = "mx"): routing and TLS policy --------------------------------
R556_NULL_MX = Reply(
    556, "5.1.10", "Recipient domain {domain} does not accept mail (null MX, RFC 7505)")
R550_NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Host or domain name not found: {domain} (NXDOMAIN)")
R550_NO_MAIL_HOST = Reply(550, "5.4.4", "No MX and no address record for {domain}")
R451_DNS_FAILED = Reply(451, "4.4.3", "DNS lookup failed: {name} {rdtype}: {detail}")
R451_NO_MX_ADDRESS = Reply(451, "4.4.4", "No MX host of {domain} has an address: {detail}")
R451_MTA_STS_NO_MX = Reply(
    451, "4.7.5", "No MX host of {domain} is allowed by its MTA-STS policy (RFC 8461 4.1)")
R451_SUSPENDED = Reply(
    451, "4.4.1", "Delivery to {destination} temporarily suspended: {detail}")
R4XX_EXPIRED = Reply(451, "4.4.7", "Message expired in queue after {lifetime}; last error: {last}")

CATALOGUE: dict[str, Reply] = {
    name: value for name, value in globals().items() if isinstance(value, Reply)
}

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:[ -]|$)")

# aiosmtpd's built-in replies, matched by code and the start of their text, get a precise code.
_BUILTIN: list[tuple[int, str, int, str]] = [
    # (code, text prefix, new code, enhanced)
    (500, "Command line too long", 500, "5.5.2"),
    (500, "Error: bad syntax", 500, "5.5.2"),
    (500, "Error: strict ASCII mode", 500, "5.6.7"),
    (500, "Error: command", 500, "5.5.1"),
    (501, "Syntax", 501, "5.5.4"),
    (501, "Error: BODY", 501, "5.5.4"),
    (501, "Error: SMTPUTF8", 501, "5.5.4"),
    (502, "", 502, "5.5.1"),
    (503, "", 503, "5.5.1"),
    (504, "", 504, "5.5.4"),
    (552, "", 552, "5.3.4"),
    (553, "", 553, "5.1.3"),
    (555, "", 555, "5.5.4"),
    (530, "", 530, "5.7.0"),
    (421, "", 421, "4.4.2"),
    (554, "Command refused", 554, "5.7.0"),
]
# Built-in replies whose whole text is replaced by ours.
_REPLACED: list[tuple[int, str, Reply]] = [
    (500, "Line too long", R554_LINE_TOO_LONG),  # one reply after the final dot (case 05)
    (552, "Error: Too much mail data", R552_TOO_BIG),
]
_DEFAULT_ENHANCED = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}


def with_enhanced_code(line: str) -> str:
    """Give a reply line an enhanced status code if it lacks one (RFC 2034 section 3).

    Not for 220 greetings, 334 challenges, 354, or EHLO lines: the caller skips those.
    """
    if line.startswith("502 5.5.1 Too many unrecognized commands"):
        # aiosmtpd closes the connection after this one: RFC 5321 3.8 wants a 421 then.
        return str(R421_TOO_MANY_ERRORS)
    if len(line) < 3 or not line[:3].isascii() or not line[:3].isdigit() \
            or _HAS_ENHANCED.match(line):
        return line
    code = int(line[:3])
    sep = line[3:4] or " "
    text = line[4:]
    if code in (220, 334, 354) or code // 100 not in _DEFAULT_ENHANCED:
        return line
    for bcode, prefix, reply in _REPLACED:
        if bcode == code and text.startswith(prefix):
            return str(reply)
    for bcode, prefix, new_code, enhanced in _BUILTIN:
        if bcode == code and text.startswith(prefix):
            return f"{new_code}{sep}{enhanced} {text}"
    return f"{code}{sep}{_DEFAULT_ENHANCED[code // 100]} {text}"
