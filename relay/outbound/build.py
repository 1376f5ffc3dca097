"""Building the delivery side from the configuration: the unsubscribe token signer, VERP,
the renderer (List-Unsubscribe, DKIM) and the deliverer (smarthost or direct to MX).

Used by the relay (relay/app.py) and by the delivery process (relay/outbound/worker.py);
kept apart from relay.app so that the delivery process imports only what delivery needs
(about 18 MB less resident memory than importing the whole relay).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping

from relay.config import Config
from relay.outbound import Deliverer
from relay.outbound.dkim import Signer, load_keys
from relay.outbound.render import Renderer, UnsubscribeSettings
from relay.outbound.smarthost import SmarthostDeliverer
from relay.outbound.verp import Verp
from relay.policy.unsubscribe import Tokens


def make_tokens(cfg: Config, environ: Mapping[str, str] | None = None) -> Tokens | None:
    """The unsubscribe token signer, from the secret in [unsubscribe].secret_env."""
    env = os.environ if environ is None else environ
    secret = env.get(cfg.unsubscribe.secret_env)
    if not secret:
        return None
    return Tokens(secret.encode("utf-8"), lifetime=cfg.unsubscribe.token_lifetime)


def make_verp(cfg: Config, environ: Mapping[str, str] | None = None) -> Verp | None:
    """VERP return paths ([bounces] verp = true), keyed by [bounces].secret_env."""
    env = os.environ if environ is None else environ
    if not cfg.bounces.verp or cfg.bounces.domain is None:
        return None
    return Verp(env[cfg.bounces.secret_env].encode("utf-8"), domain=cfg.bounces.domain)


def make_renderer(cfg: Config, tokens: Tokens | None, verp: Verp | None = None) -> Renderer:
    """List-Unsubscribe for the marketing stream, then DKIM with every [[dkim]] key.
    Raises DkimKeyError for an unreadable or unusable key: the relay must not start."""
    signer = Signer(load_keys(cfg.dkim)) if cfg.dkim else None
    unsubscribe = None
    if tokens is not None:
        u = cfg.unsubscribe
        unsubscribe = UnsubscribeSettings(
            tokens=tokens, public_url=cfg.http.public_url,
            mail_domain=u.mail_domain or cfg.server.hostname,
            existing_header=u.existing_header, scope=u.scope)
    fallbacks = {a.name: a.dkim_fallback_domain for a in cfg.apps if a.dkim_fallback_domain}
    return Renderer(unsubscribe=unsubscribe, signer=signer, fallback_domains=fallbacks,
                    verp=verp)


def make_deliverer(cfg: Config, renderer: Renderer, *, clock: Callable[[], float] = time.time,
                   rng: random.Random | None = None) -> Deliverer:
    """The smarthost deliverer, or direct delivery to MX hosts ([outbound] mode = "mx")
    with DNS from [dns].nameservers."""
    if cfg.outbound.mode != "mx":
        return SmarthostDeliverer(cfg.outbound, cfg.server.hostname, renderer=renderer)
    from relay.outbound.direct import DirectDeliverer
    from relay.outbound.mtasts import MtaSts
    from relay.outbound.mx import MxResolver, make_async_resolver
    from relay.queue.pacing import state_path

    resolver = MxResolver(make_async_resolver(cfg.dns.nameservers), rng=rng)
    mta_sts = MtaSts(resolver, clock=clock) if cfg.outbound.mta_sts else None
    return DirectDeliverer(cfg.outbound, cfg.server.hostname, resolver=resolver,
                           renderer=renderer, mta_sts=mta_sts, clock=clock,
                           state_file=state_path(cfg.queue.path))
