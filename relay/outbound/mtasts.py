"""MTA-STS (RFC 8461): a recipient domain's published demand for verified TLS to listed MX hosts.

With [outbound].mta_sts = true, direct delivery asks `MtaSts.policy(domain)` before it
connects:

1. the TXT record at `_mta-sts.DOMAIN` ("v=STSv1; id=...;", RFC 8461 3.1) says a policy
   exists and names its version (`id`);
2. the policy itself comes over HTTPS, with a certificate valid for `mta-sts.DOMAIN`, from
   `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (3.3): no redirects, 200 only,
   text/plain, 64 KiB at most;
3. it is cached for its `max_age`; it is fetched again only when the TXT id changes (5.1),
   and a cached policy stays in force while the TXT record is missing or DNS fails (3.2).

What the deliverer does with it (`Policy.mode`, RFC 8461 5): "enforce" means only MX hosts
that match the policy's `mx` patterns, over STARTTLS with a certificate verified for the MX
host name, never plaintext; "testing" delivers as usual and logs what enforce would have
refused; "none" is as if there were no policy. A policy that cannot be fetched (and is not
cached) is no policy: delivery goes on as if the domain had not published one (3.3).

For tests, the fetch is injectable (`fetch=`), and `HttpsFetcher` takes a URL template and
an SSL context (a test CA).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import aiohttp

from relay.log import SMTP
from relay.outbound.mx import MxResolver

MAX_AGE_LIMIT = 31557600        # RFC 8461 3.2: max_age is at most one year
MAX_POLICY_SIZE = 64 * 1024     # RFC 8461 3.3: senders may limit the body to 64 KiB
RETRY_FAILED_FETCH = 300.0      # a failed fetch is not tried again for every message
MAX_CACHED = 100_000            # policies kept at most

_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MX_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")

Fetch = Callable[[str], Awaitable[str]]
"""Fetch the policy text of a domain; raises on any failure (the caller treats it as none)."""


class PolicyError(ValueError):
    """A policy file or TXT record that does not follow RFC 8461."""


@dataclass(frozen=True)
class Policy:
    """A domain's MTA-STS policy (RFC 8461 3.2)."""

    mode: str                        # "enforce" | "testing" | "none"
    mx: tuple[str, ...]
    max_age: int
    id: str = ""                     # the TXT record's id it was fetched for

    def allows(self, host: str) -> bool:
        """RFC 8461 4.1: an MX host matches a pattern exactly, or a wildcard "*.example.net"
        matches one more leftmost label (not "example.net" itself, not "a.b.example.net")."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, _, rest = host.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parse_txt(records: list[str] | tuple[str, ...]) -> str | None:
    """The policy id of the `_mta-sts` TXT records, or None when there is no usable one.

    RFC 8461 3.1: records not starting with "v=STSv1" are ignored; anything but exactly one
    left, or one without a valid id, means no policy."""
    sts = [r for r in records if re.match(r"^v=STSv1\s*(;|$)", r)]
    if len(sts) != 1:
        return None
    fields = {}
    for part in sts[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text: str) -> Policy:
    """Parse a policy file (RFC 8461 3.2: "key: value" lines, CRLF or LF); raises
    PolicyError. Unknown keys are ignored (3.2: for future extensions)."""
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"not a 'key: value' line: {line[:60]!r}")
        fields.setdefault(key.strip(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version must be STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r}")
    age = (fields.get("max_age") or [""])[0]
    if not age.isdigit() or len(age) > 10:
        raise PolicyError(f"bad max_age {age!r}")
    mx = tuple(p.lower().rstrip(".") for p in fields.get("mx", []))
    for pattern in mx:
        if not _MX_PATTERN.match(pattern):
            raise PolicyError(f"bad mx pattern {pattern!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx patterns")   # RFC 8461 3.2: one or more for enforce/testing
    return Policy(mode=mode, mx=mx, max_age=min(int(age), MAX_AGE_LIMIT))


class HttpsFetcher:
    """Fetches policies over HTTPS with aiohttp (RFC 8461 3.3)."""

    def __init__(self, *, url: str = "https://mta-sts.{domain}/.well-known/mta-sts.txt",
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 20.0):
        self.url = url
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, domain: str) -> str:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(ssl=self.ssl_context))
        url = self.url.format(domain=domain)
        # RFC 8461 3.3: the certificate must be valid for mta-sts.DOMAIN (the context
        # checks it); redirects are not followed; only 200 counts.
        async with self._session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise PolicyError(f"{url}: HTTP {resp.status}")
            if resp.content_type != "text/plain":
                raise PolicyError(f"{url}: media type {resp.content_type}, not text/plain")
            body = b""
            while chunk := await resp.content.read(MAX_POLICY_SIZE + 1 - len(body)):
                body += chunk
                if len(body) > MAX_POLICY_SIZE:
                    raise PolicyError(f"{url}: larger than {MAX_POLICY_SIZE} octets")
        return body.decode("utf-8")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class _Cached:
    policy: Policy
    expires: float


class MtaSts:
    def __init__(self, resolver: MxResolver, *, fetch: Fetch | None = None,
                 clock: Callable[[], float] = time.time):
        self.resolver = resolver
        self.fetch: Fetch = fetch or HttpsFetcher()
        self.clock = clock
        self._cache: dict[str, _Cached] = {}
        self._failed: dict[tuple[str, str], float] = {}   # (domain, id) -> retry after
        self._inflight: dict[str, asyncio.Task[Policy | None]] = {}

    async def policy(self, domain: str) -> Policy | None:
        """The policy in force for `domain`, or None."""
        domain = domain.lower().rstrip(".")
        now = self.clock()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires <= now:
            del self._cache[domain]
            cached = None
        answer = await self.resolver.lookup(f"_mta-sts.{domain}", "TXT")
        policy_id = parse_txt(answer.records) if answer.kind == "ok" else None
        if policy_id is None:
            # RFC 8461 3.2/5.1: no (readable) TXT record: a cached policy stays in force.
            return cached.policy if cached is not None else None
        if cached is not None and cached.policy.id == policy_id:
            return cached.policy   # RFC 8461 5.1: same id, no refetch
        if self._failed.get((domain, policy_id), 0.0) > now:
            return cached.policy if cached is not None else None
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(domain, policy_id))
            self._inflight[domain] = task
            task.add_done_callback(lambda _t: self._inflight.pop(domain, None))
        fetched = await asyncio.shield(task)
        if fetched is None:
            return cached.policy if cached is not None else None
        return fetched

    async def _fetch(self, domain: str, policy_id: str) -> Policy | None:
        try:
            policy = parse_policy(await self.fetch(domain))
        except Exception as exc:  # noqa: BLE001 - RFC 8461 3.3: any failure is no policy
            now = self.clock()
            if len(self._failed) >= MAX_CACHED:
                self._failed = {k: t for k, t in self._failed.items() if t > now}
            self._failed[(domain, policy_id)] = now + RETRY_FAILED_FETCH
            SMTP.warning("%s: MTA-STS policy (id %s) cannot be fetched: %s: %s", domain,
                         policy_id, type(exc).__name__, exc)
            return None
        policy = replace(policy, id=policy_id)
        now = self.clock()
        if len(self._cache) >= MAX_CACHED:   # bounded: expired ones go first, then the oldest
            for old in [d for d, c in self._cache.items() if c.expires <= now]:
                del self._cache[old]
            for old in list(self._cache)[:max(0, len(self._cache) - MAX_CACHED // 2)]:
                del self._cache[old]
        self._cache[domain] = _Cached(policy, now + policy.max_age)
        SMTP.info("%s: MTA-STS policy id %s: mode %s, mx %s, max_age %d", domain, policy_id,
                  policy.mode, ",".join(policy.mx) or "-", policy.max_age)
        return policy

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        close = getattr(self.fetch, "close", None)
        if close is not None:
            await close()
