"""The one function that interprets a next hop's reply (STYLE rule 3).

Nothing else in the relay looks at reply codes: delivery turns every outcome (a reply, a
lost connection, a time-out) into an `SmtpReply`, and `classify` gives its category and
what the queue does with it.

The classification is data, in the manner of KumoMTA's bounce classifier: an ordered list
of rules in TOML (`[[rule]]` tables), the first that matches wins. The rules shipped with
the relay live beside this module (relay/outbound/bounce_rules.toml); an admin's own file
(conf/bounce_rules.toml is the example) is tried before them. A rule is::

    [[rule]]
    category = "hard"             # hard | soft | rate-limited | block | content
                                  # | relay-side | unknown
    code = "5xx"                  # optional: 550, "55x", "5xx", or a list of these
    enhanced = "5.1.1"            # optional: regex for the WHOLE RFC 3463 code ("" if none)
    text = 'no such user'         # optional: regex searched, case-insensitive, in the text
    note = "where it was seen"    # optional, ignored

What a category does is fixed here, not in the data (invariant 5 of DESIGN.md: only a reply
that is really about the recipient suppresses):

=============  ===================  ========  ========
category       action               suppress  throttle
=============  ===================  ========  ========
hard           bounce (5xx only)    yes       no
soft           defer, even for 5xx  no        no
rate-limited   defer, even for 5xx  no        yes
block          bounce 5xx/defer 4xx no        no
content        bounce 5xx/defer 4xx no        no
relay-side     bounce 5xx/defer 4xx no        no
unknown        bounce 5xx/defer 4xx no        no
=============  ===================  ========  ========

A soft bounce is retried; the queue counts consecutive soft bounces in the suppression store
and suppresses only past a configured number spread over a minimum number of days.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class SmtpReply:
    """One reply of a next hop (or one the relay made up for an outcome without a reply)."""

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
        lines = [_without_enhanced(ln, enhanced) for ln in lines]
    return SmtpReply(code, enhanced, " ".join(ln for ln in lines if ln))


def _without_enhanced(line: str, enhanced: str) -> str:
    m = _ENHANCED.match(line)
    return line[m.end():].strip() if m and m.group(0) == enhanced else line


def from_catalogue(reply: object, **kw: object) -> SmtpReply:
    """An `SmtpReply` for an outcome the relay itself determined (relay.replies entry)."""
    from relay.replies import Reply

    assert isinstance(reply, Reply)
    return SmtpReply(reply.code, reply.enhanced, reply.text.format(**kw) if kw else reply.text)


class Category(StrEnum):
    DELIVERED = "delivered"
    HARD = "hard"                  # the recipient does not exist (5.1.1, 5.1.10)
    SOFT = "soft"                  # mailbox full, temporarily unavailable
    RATE_LIMITED = "rate-limited"  # slow down: the destination, our IP or our account
    BLOCK = "block"                # reputation or policy
    CONTENT = "content"            # spam, virus, a malformed message
    RELAY_SIDE = "relay-side"      # our own configuration or our message
    UNKNOWN = "unknown"


class Action(StrEnum):
    DELIVERED = "delivered"
    DEFER = "deferred"
    BOUNCE = "bounced"


@dataclass(frozen=True)
class Verdict:
    """What a reply means: its category, what the queue does, and why (`rule`)."""

    category: Category
    action: Action
    suppress: bool = False
    throttle: bool = False   # slow the destination down (rate-limited)
    rule: str = ""           # "shipped#12", "/etc/relay/bounce_rules.toml#3" or "default"


# --- rules ------------------------------------------------------------------------------------

SHIPPED = "bounce_rules.toml"   # package data of relay.outbound
SHIPPED_LABEL = "shipped"
DEFAULT_RULE = "default"        # Verdict.rule when no rule matched
_RULE_CATEGORIES = {str(c): c for c in Category if c is not Category.DELIVERED}
_RULE_KEYS = ("category", "code", "enhanced", "text", "note")
_CODE_PATTERN = re.compile(r"[45][0-9x]{2}")
_PLAIN_ENHANCED = re.compile(r"[0-9.]+")


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file, rule and key."""


@dataclass(frozen=True)
class Rule:
    """One `[[rule]]`: every condition given must hold (an absent one always holds)."""

    category: Category
    origin: str                              # "<label>#<n>", n counting [[rule]] from 1
    codes: tuple[str, ...] = ()              # "550", "55x", "5xx"
    enhanced: re.Pattern[str] | None = None  # full match against the enhanced code or ""
    text: re.Pattern[str] | None = None      # searched in the joined text
    note: str = ""

    def matches(self, reply: SmtpReply) -> bool:
        """Does `reply` meet every condition of this rule?"""
        code = str(reply.code)
        # A transient reply is never about a mailbox that does not exist (RFC 5321 4.2.1).
        if self.category is Category.HARD and not code.startswith("5"):
            return False
        if self.codes and not any(_code_matches(p, code) for p in self.codes):
            return False
        if self.enhanced is not None and not self.enhanced.fullmatch(reply.enhanced or ""):
            return False
        return self.text is None or self.text.search(reply.text) is not None


def _code_matches(pattern: str, code: str) -> bool:
    return len(code) == 3 and all(p in ("x", c) for p, c in zip(pattern, code, strict=True))


class Rules:
    """An ordered list of rules; the first that matches a reply wins."""

    def __init__(self, rules: Sequence[Rule] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: Rules) -> Rules:
        return Rules(self.rules + other.rules)

    def __repr__(self) -> str:
        return f"Rules({len(self.rules)} rules)"

    def match(self, reply: SmtpReply) -> Rule | None:
        """The first rule that `reply` matches, or None."""
        for rule in self.rules:
            if rule.matches(reply):
                return rule
        return None

    @classmethod
    def parse(cls, text: str, label: str) -> Rules:
        """Rules from TOML `text`; `label` names the source in errors and in `Rule.origin`."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"{label}: not valid TOML: {exc}") from None
        unknown = sorted(set(data) - {"rule"})
        if unknown:
            raise RulesError(f"{label}: unknown key {unknown[0]!r} (expected [[rule]] tables)")
        tables = data.get("rule", [])
        if not isinstance(tables, list):
            raise RulesError(f"{label}: 'rule' must be an array of tables ([[rule]])")
        return cls([_rule(t, label, n) for n, t in enumerate(tables, start=1)])

    @classmethod
    def read(cls, path: str | Path, label: str | None = None) -> Rules:
        """The rules of one file, in order (and nothing else)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesError(f"{path}: cannot read rules: {exc}") from None
        return cls.parse(text, str(path) if label is None else label)

    @classmethod
    def default(cls) -> Rules:
        """The rules shipped with the relay, read once per process."""
        return _shipped_rules()

    @classmethod
    def load(cls, path: str | Path | None = None) -> Rules:
        """The admin's rules from `path` (if given), tried first, then the shipped rules."""
        shipped = cls.default()
        return shipped if path is None else cls.read(path) + shipped


@functools.cache
def _shipped_rules() -> Rules:
    resource = importlib.resources.files("relay.outbound").joinpath(SHIPPED)
    return Rules.parse(resource.read_text(encoding="utf-8"), SHIPPED_LABEL)


def _rule(table: Any, label: str, n: int) -> Rule:
    where = f"{label}: rule {n}"
    if not isinstance(table, dict):
        raise RulesError(f"{where}: must be a table ([[rule]])")
    for key in table:
        if key not in _RULE_KEYS:
            raise RulesError(f"{where}: unknown key {key!r} (expected one of "
                             f"{', '.join(_RULE_KEYS)})")
    category = table.get("category")
    if category is None:
        raise RulesError(f"{where}: key 'category' is missing")
    if category not in _RULE_CATEGORIES:
        raise RulesError(f"{where}: key 'category': {category!r} is not one of "
                         f"{', '.join(_RULE_CATEGORIES)}")
    if not any(k in table for k in ("code", "enhanced", "text")):
        raise RulesError(f"{where}: needs at least one of 'code', 'enhanced', 'text'")
    note = table.get("note", "")
    if not isinstance(note, str):
        raise RulesError(f"{where}: key 'note': must be a string")
    return Rule(
        category=_RULE_CATEGORIES[category],
        origin=f"{label}#{n}",
        codes=_codes(table["code"], where) if "code" in table else (),
        enhanced=_regex(table, "enhanced", where, 0) if "enhanced" in table else None,
        text=_regex(table, "text", where, re.IGNORECASE) if "text" in table else None,
        note=note,
    )


def _codes(value: object, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RulesError(f"{where}: key 'code': the list is empty")
    codes = []
    for item in items:
        code = str(item).lower() if isinstance(item, (int, str)) else ""
        if isinstance(item, bool) or not _CODE_PATTERN.fullmatch(code):
            # 2xx is always "delivered" and never reaches the rules.
            raise RulesError(f"{where}: key 'code': {item!r} is not a 4xx/5xx code such as "
                             "550, \"55x\" or \"5xx\"")
        codes.append(code)
    return tuple(codes)


def _regex(table: dict[str, Any], key: str, where: str, flags: int) -> re.Pattern[str]:
    value = table[key]
    if not isinstance(value, str) or (key == "text" and not value):
        raise RulesError(f"{where}: key {key!r}: must be a non-empty string (a regex)")
    if key == "enhanced" and _PLAIN_ENHANCED.fullmatch(value):
        value = re.escape(value)   # "5.1.1" means exactly 5.1.1
    try:
        return re.compile(value, flags)
    except re.error as exc:
        raise RulesError(f"{where}: key {key!r}: bad regular expression: {exc}") from None


# --- classify ---------------------------------------------------------------------------------

def classify(reply: SmtpReply, rules: Rules | None = None) -> Verdict:
    """Map a reply to its category and the queue's action.

    Severity comes from the basic code (RFC 5321 4.2.1: 2yz done, 4yz transient, 5yz
    permanent); the category from the first rule that matches (`Rules.default()` when no
    rules are given), else "unknown". Only a "hard" reply suppresses (invariant 5): X.1.1
    user unknown and X.1.10 null MX (RFC 3463 3.2, RFC 7505 4.1), or wordings that say so.
    """
    if 200 <= reply.code < 300:
        return Verdict(Category.DELIVERED, Action.DELIVERED)
    rule = (Rules.default() if rules is None else rules).match(reply)
    if rule is None:
        return verdict_for(Category.UNKNOWN, reply.code, DEFAULT_RULE)
    return verdict_for(rule.category, reply.code, rule.origin)


def verdict_for(category: Category, code: int, rule: str = "") -> Verdict:
    """The fixed meaning of a category for a reply with basic code `code`."""
    permanent = code >= 500
    if category is Category.DELIVERED:
        return Verdict(category, Action.DELIVERED, rule=rule)
    if category is Category.HARD and permanent:
        return Verdict(category, Action.BOUNCE, suppress=True, rule=rule)
    if category is Category.SOFT:
        return Verdict(category, Action.DEFER, rule=rule)
    if category is Category.RATE_LIMITED:
        return Verdict(category, Action.DEFER, throttle=True, rule=rule)
    return Verdict(category, Action.BOUNCE if permanent else Action.DEFER, rule=rule)
