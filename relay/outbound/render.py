"""Render a queued message for delivery: per-recipient headers first, DKIM signature last.

DESIGN.md: "render per recipient: List-Unsubscribe (+Post), VERP return path, then DKIM
sign LAST". Nothing changes the bytes after `Signer.sign` (invariant 4), and the headers
added here are covered by the signature because they are added before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from relay.address import domain_of
from relay.metrics import Metrics
from relay.outbound.dkim import Signer
from relay.outbound.verp import Verp
from relay.policy.unsubscribe import Tokens, apply_unsubscribe, unsubscribe_headers
from relay.queue import Job, Recipient


@dataclass(frozen=True)
class UnsubscribeSettings:
    tokens: Tokens
    public_url: str
    mail_domain: str
    existing_header: str = "replace"      # replace | keep | merge
    scope: str = "global"                 # global | sender-domain

    def scope_for(self, sender: str) -> str:
        if self.scope == "sender-domain" and sender:
            return domain_of(sender)
        return "global"


class Renderer:
    def __init__(self, *, unsubscribe: UnsubscribeSettings | None = None,
                 signer: Signer | None = None,
                 fallback_domains: dict[str, str] | None = None, verp: Verp | None = None):
        self.unsubscribe = unsubscribe
        self.signer = signer
        self.fallback_domains = fallback_domains or {}   # app name -> DKIM fallback domain
        self.verp = verp
        self.metrics: Metrics | None = None

    def per_recipient(self, job: Job) -> bool:
        """Marketing mail gets List-Unsubscribe per recipient, so one transaction each.
        Mail from the null sender (notifications) is not list mail (case 11)."""
        if job.sender == "":
            return False
        if self.verp is not None:
            return True    # each recipient its own return path
        return self.unsubscribe is not None and job.stream == "marketing"

    def sender(self, job: Job, rcpt: Recipient | None) -> str:
        """The envelope sender for this copy: VERP bounces+TOKEN@domain, or the original.
        Never for the null sender (notifications must not bounce back)."""
        if self.verp is None or rcpt is None or job.sender == "":
            return job.sender
        return self.verp.return_path(job.queue_id, rcpt.address)

    def render(self, job: Job, rcpt: Recipient | None) -> bytes:
        body = self._headers(job, rcpt)
        if self.signer is not None:
            fallback = self.fallback_domains.get(job.app or "")
            started = time.perf_counter()
            body = self.signer.sign(body, fallback_domain=fallback)   # last
            self._observe(started)
        return body

    async def render_async(self, job: Job, rcpt: Recipient | None) -> bytes:
        """`render`, signing with the RSA work on the signer's threads (the loop serves
        sessions meanwhile). The same bytes as `render`."""
        body = self._headers(job, rcpt)
        if self.signer is not None:
            fallback = self.fallback_domains.get(job.app or "")
            started = time.perf_counter()
            body = await self.signer.sign_async(body, fallback_domain=fallback)   # last
            self._observe(started)
        return body

    def _headers(self, job: Job, rcpt: Recipient | None) -> bytes:
        body = job.body
        if rcpt is not None and self.unsubscribe is not None and job.stream == "marketing":
            u = self.unsubscribe
            headers = unsubscribe_headers(
                tokens=u.tokens, recipient=rcpt.address, scope=u.scope_for(job.sender),
                queue_id=job.queue_id, public_url=u.public_url, mail_domain=u.mail_domain)
            body = apply_unsubscribe(body, headers, u.existing_header)
        return body

    def _observe(self, started: float) -> None:
        if self.metrics is not None:
            self.metrics.dkim_seconds.observe(time.perf_counter() - started)
