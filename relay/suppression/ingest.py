"""Reports arriving later: DSNs and complaints sent to the bounce domain.

A report is parsed (reports.py), matched to the message and recipient it is about (by its
VERP token, else by the queue ID in our Received header of the returned original), judged
(trust.py: VERP, SPF or DKIM of the reporting domain) and, when trusted, applied: a hard
bounce (classified by the one classifier) or a complaint suppresses the recipient and is
an event. Every report is kept on disk with its Authentication-Results verdict; an
untrusted one is kept and logged, and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from relay.address import canonical
from relay.events import EventKind, record
from relay.outbound.classify import classify, parse_reply
from relay.outbound.verp import Verp
from relay.queue import QueueStore
from relay.suppression import GLOBAL, Reason, Suppression, SuppressionStore
from relay.suppression.reports import Report, parse_report
from relay.suppression.trust import assess

LOG = logging.getLogger("relay.bounce")
_OUR_QUEUE_ID = re.compile(rb"\(relay\) with [A-Z0-9]+ id ([0-9A-F]{8,20})\b")


@dataclass
class Outcome:
    report: Report
    trusted: bool
    reason: str
    applied: list[tuple[str, str]]        # (recipient, what) that was done
    stored_as: Path | None = None


class Ingestor:
    def __init__(self, *, queue: QueueStore, suppressions: SuppressionStore,
                 verp: Verp | None, hostname: str, report_dir: Path,
                 nameservers: list[tuple[str, int]] | None = None):
        self.queue = queue
        self.suppressions = suppressions
        self.verp = verp
        self.hostname = hostname
        self.report_dir = report_dir
        self.nameservers = nameservers

    async def _recipients_of(self, queue_id: str) -> list[str]:
        return sorted({row[1] for row in await self.queue.events(queue_id)})

    async def _match(self, report: Report, envelope_rcpt: str) -> tuple[str | None, list[str],
                                                                          bool]:
        """(queue ID, recipients the report is about, VERP verified)."""
        if self.verp is not None:
            claimed = self.verp.queue_id(envelope_rcpt)
            if claimed:
                known = await self._recipients_of(claimed)
                hit = self.verp.verify(envelope_rcpt, lambda _qid: known)
                if hit is not None:
                    return hit[0], [hit[1]], True
        m = _OUR_QUEUE_ID.search(report.raw)
        if m is None:
            return None, [], False
        queue_id = m.group(1).decode()
        known = {canonical(r): r for r in await self._recipients_of(queue_id)}
        named = [r.address for r in report.recipients] or report.original_recipients
        return queue_id, [known[canonical(a)] for a in named if canonical(a) in known], False

    async def ingest(self, message: bytes, *, envelope_rcpt: str, client_ip: str, helo: str,
                     mail_from: str) -> Outcome:
        report = parse_report(message, verp_address=envelope_rcpt)
        queue_id, recipients, verp_ok = await self._match(report, envelope_rcpt)
        verdict = await assess(
            message, client_ip=client_ip, helo=helo, mail_from=mail_from,
            reporting_domain=report.reporting_domain or "", verp_ok=verp_ok,
            dns_txt=None, resolver_nameservers=self.nameservers, authserv_id=self.hostname)
        stored = await asyncio.to_thread(self._keep, message, verdict.authres_header)
        outcome = Outcome(report, verdict.trusted, verdict.reason, [], stored)
        if not verdict.trusted:
            LOG.warning("%s: untrusted %s report from %s kept, not applied: %s",
                        queue_id or "NOQUEUE", report.kind, client_ip, verdict.reason)
            return outcome
        if not recipients or queue_id is None:
            LOG.info("%s: %s report matched no recipient of ours; kept",
                     queue_id or "NOQUEUE", report.kind)
            return outcome
        now = time.time()
        if report.kind == "arf":
            for rcpt in recipients:
                await self._suppress(rcpt, Reason.COMPLAINT,
                                     f"complaint ({report.feedback_type or 'abuse'}) via "
                                     f"{report.reporting_domain}", now)
                await record(self.queue, EventKind.COMPLAINT, rcpt, queue_id=queue_id,
                             category="complaint", reply=report.feedback_type or "abuse")
                outcome.applied.append((rcpt, "complaint"))
        elif report.kind == "dsn":
            by_address = {canonical(r.address): r for r in report.recipients}
            for rcpt in recipients:
                entry = by_address.get(canonical(rcpt))
                if entry is None or not entry.permanent:
                    continue
                code = 550 if entry.status.startswith("5") else 450
                reply = parse_reply(code, f"{entry.status} {entry.diagnostic}".strip())
                verdict_r = classify(reply)
                await record(self.queue, EventKind.BOUNCED, rcpt, queue_id=queue_id,
                             category=str(verdict_r.category), reply=str(reply))
                if verdict_r.suppress:   # invariant 5: only a reply about the mailbox
                    await self._suppress(rcpt, Reason.HARD_BOUNCE, f"DSN: {reply}", now)
                    outcome.applied.append((rcpt, "hard-bounce"))
                else:
                    outcome.applied.append((rcpt, f"bounce ({verdict_r.category})"))
        for rcpt, what in outcome.applied:
            LOG.info("%s: to=<%s>, report=%s, trusted by %s: %s", queue_id, rcpt, report.kind,
                     verdict.method, what)
        return outcome

    async def _suppress(self, rcpt: str, reason: Reason, detail: str, now: float) -> None:
        entry = Suppression(canonical(rcpt), GLOBAL, reason, detail, now)
        await asyncio.to_thread(self.suppressions.add, entry)

    def _keep(self, message: bytes, authres: str) -> Path:
        """Store the report with our verdict on top (RFC 8601 Authentication-Results)."""
        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns()}.eml"
        path.write_bytes(authres.encode("utf-8", "replace") + b"\r\n" + message)
        return path
