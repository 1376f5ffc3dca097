"""The one function that interprets a next hop's reply (STYLE rule 3).

Nothing else in the relay looks at reply codes: delivery turns every outcome (a reply, a
lost connection, a time-out) into an `SmtpReply`, and `classify` gives its category and
what the queue does with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class SmtpReply:
    code: int
    enhanced: str | None
    text: str

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


def parse_reply(code: int, message: str) -> SmtpReply:
    """Make one reply of a (possibly multi-line) server answer.

    RFC 5321 4.2: the lines of a multi-line reply are one reply. The enhanced code is taken
    from the last line (RFC 2034 section 4 has every line carry it) and removed from each
    line of the joined text.
    """
    lines = [ln.strip() for ln in message.replace("\r", "").split("\n") if ln.strip()]
    enhanced = None
    if lines:
        m = _ENHANCED.match(lines[-1])
        if m and m.group(1) == str(code)[0]:
            enhanced = m.group(0)
    if enhanced:
        lines = [ln[len(enhanced):].strip() if ln.startswith(enhanced) else ln for ln in lines]
    return SmtpReply(code, enhanced, " ".join(lines))


def from_catalogue(reply: object, **kw: object) -> SmtpReply:
    """An `SmtpReply` for an outcome the relay itself determined (relay.replies entry)."""
    from relay.replies import Reply

    assert isinstance(reply, Reply)
    return SmtpReply(reply.code, reply.enhanced, reply.text.format(**kw) if kw else reply.text)


class Category(StrEnum):
    DELIVERED = "delivered"
    HARD = "hard"                  # the recipient does not exist (5.1.1, 5.1.10)
    SOFT = "soft"                  # mailbox full, temporarily unavailable
    RATE_LIMITED = "rate-limited"
    BLOCK = "block"                # reputation or policy
    CONTENT = "content"
    RELAY_SIDE = "relay-side"      # our own configuration or our message
    UNKNOWN = "unknown"


class Action(StrEnum):
    DELIVERED = "delivered"
    DEFER = "deferred"
    BOUNCE = "bounced"


@dataclass(frozen=True)
class Verdict:
    category: Category
    action: Action
    suppress: bool = False


def classify(reply: SmtpReply) -> Verdict:
    """Map a reply to its category and the queue's action.

    Severity comes from the basic code (RFC 5321 4.2.1: 2yz done, 4yz transient, 5yz
    permanent). Only a reply that is really about the recipient's mailbox suppresses
    (invariant 5): X.1.1 user unknown and X.1.10 null MX (RFC 3463 3.2, RFC 7505 4.1).
    """
    code = reply.code
    if 200 <= code < 300:
        return Verdict(Category.DELIVERED, Action.DELIVERED)
    permanent = code >= 500
    action = Action.BOUNCE if permanent else Action.DEFER
    _, subject, detail = (reply.enhanced or "..").split(".")
    if permanent and subject == "1" and detail in ("1", "10"):
        return Verdict(Category.HARD, action, suppress=True)
    if subject == "7":
        return Verdict(Category.BLOCK, action)
    if subject == "2" and detail in ("1", "2"):
        return Verdict(Category.SOFT, action)
    if (subject, detail) in (("3", "4"), ("6", "0"), ("6", "3"), ("6", "7")):
        return Verdict(Category.RELAY_SIDE, action)
    if code in (421, 450, 451, 452, 454) and "too many" in reply.text.lower():
        return Verdict(Category.RATE_LIMITED, action)
    return Verdict(Category.UNKNOWN, action)
