"""Three independent DKIM verifiers for tests: dkimpy, Perl's Mail::DKIM and Node's mailauth
(tests/js/verify.mjs), each fetching public keys from the loopback DNS server
(tests/support/dns.py) with its own resolver, never from a dict.

mailauth knows ed25519-sha256 (RFC 8463); Debian 12's Mail::DKIM does not, so there an
Ed25519 signature's second verifier is mailauth."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from relay.outbound.dkim import DkimKey
from tests.support.dns import Records, dkim_dnsfunc


def zone(keys: list[DkimKey]) -> Records:
    return {(k.dns_name, "TXT"): [k.txt_record()] for k in keys}


# --- the three verifiers ------------------------------------------------------------------------

async def dkimpy_results(message: bytes, port: int) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature, topmost first (in a thread: dnspython's
    synchronous resolver asks the server running in this loop)."""
    get_txt = dkim_dnsfunc(port)

    def run() -> list[bool]:
        d = dkim.DKIM(message, minkey=2048)
        count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
        out = []
        for idx in range(count):
            try:
                out.append(bool(dkim.DKIM(message, minkey=2048).verify(idx=idx,
                                                                       dnsfunc=get_txt)))
            except dkim.DKIMException:
                out.append(False)
        return out

    return await asyncio.to_thread(run)


PERL_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my $port = shift @ARGV;
# Only the loopback server: no /etc/resolv.conf, no recursion needed.
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, retry => 2,
    udp_timeout => 5, tcp_timeout => 5));
for my $file (@ARGV) {
    open(my $fh, '<:raw', $file) or die "$file: $!";
    my $v = Mail::DKIM::Verifier->new();
    while (my $line = <$fh>) { $v->PRINT($line); }
    $v->CLOSE; close $fh;
    my @sigs = map { join("\x1f", $_->algorithm // '', $_->selector // '',
                          $_->result // '', $_->result_detail // '') } $v->signatures;
    print join("\x1e", $file, $v->result // '', @sigs), "\n";
}
"""


def _perl_has(module: str) -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", f"-M{module}", "-e1"], capture_output=True,
                          check=False).returncode == 0


MAIL_DKIM = _perl_has("Mail::DKIM::Verifier")
# Mail::DKIM learnt ed25519-sha256 (RFC 8463) in 1.20230630; Debian 12 ships 1.20230212.
MAIL_DKIM_ED25519 = MAIL_DKIM and _perl_has("Mail::DKIM::Algorithm::ed25519_sha256")


@dataclass
class PerlSig:
    algorithm: str
    selector: str
    result: str
    detail: str


@dataclass
class PerlVerdict:
    result: str
    sigs: list[PerlSig]

    def by_selector(self) -> dict[str, PerlSig]:
        return {s.selector: s for s in self.sigs}


async def perl_results(messages: list[bytes], port: int, tmp_path: Path) -> list[PerlVerdict]:
    """Mail::DKIM's verdict on each message (one perl process for all of them)."""
    if not MAIL_DKIM:
        reason = "Perl Mail::DKIM is not installed (apt-get install libmail-dkim-perl)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path / f"perl-{len(list(tmp_path.glob('perl-*')))}"
    folder.mkdir()
    files = []
    for index, message in enumerate(messages):
        path = folder / f"{index:03}.eml"
        path.write_bytes(message)
        files.append(str(path))
    proc = await asyncio.create_subprocess_exec(
        "perl", "-e", PERL_VERIFY, str(port), *files,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    verdicts = []
    for line in out.decode().split("\n")[:-1]:
        _file, result, *sigs = line.split("\x1e")
        verdicts.append(PerlVerdict(result, [PerlSig(*s.split("\x1f", 3)) for s in sigs]))
    assert len(verdicts) == len(messages)
    return verdicts


def assert_perl_pass(verdict: PerlVerdict, expected_sigs: int) -> None:
    """Every signature passes; an ed25519 one only where this Mail::DKIM knows ed25519
    (elsewhere mailauth verifies it: assert_independent_pass)."""
    assert len(verdict.sigs) == expected_sigs, verdict
    checked = 0
    for sig in verdict.sigs:
        if sig.algorithm == "ed25519-sha256" and not MAIL_DKIM_ED25519:
            # RFC 8463 6: a verifier that lacks the algorithm ignores the signature.
            assert sig.detail == "invalid (unsupported algorithm ed25519-sha256)", verdict
            continue
        assert sig.result == "pass", verdict
        checked += 1
    # Only ed25519 signatures, none of which it can check: "invalid" overall.
    assert verdict.result == ("pass" if checked else "invalid"), verdict


JS_DIR = Path(__file__).resolve().parent.parent / "js"
MAILAUTH_VERIFY = JS_DIR / "verify.mjs"


def _mailauth_missing() -> str | None:
    """Why mailauth cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs npm)"
    if not (JS_DIR / "node_modules" / "mailauth" / "package.json").is_file():
        return "mailauth is not installed (cd tests/js && npm ci; make test does it)"
    return None


@dataclass
class MailauthSig:
    algorithm: str
    domain: str
    selector: str
    result: str
    comment: str


@dataclass
class MailauthVerdict:
    sigs: list[MailauthSig]

    def by_selector(self) -> dict[str, MailauthSig]:
        return {s.selector: s for s in self.sigs}

    def results(self) -> list[str]:
        return [s.result for s in self.sigs]


async def mailauth_results(messages: list[bytes], port: int,
                           tmp_path: Path) -> list[MailauthVerdict]:
    """mailauth's verdict (strict mode) on each message, topmost signature first (one node
    process for all of them)."""
    reason = _mailauth_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path / f"mailauth-{len(list(tmp_path.glob('mailauth-*')))}"
    folder.mkdir()
    files = []
    for index, message in enumerate(messages):
        path = folder / f"{index:03}.eml"
        path.write_bytes(message)
        files.append(str(path))
    proc = await asyncio.create_subprocess_exec(
        "node", str(MAILAUTH_VERIFY), str(port), *files, cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    verdicts = []
    for line in out.decode().splitlines():
        record = json.loads(line)
        assert record["file"] == files[len(verdicts)], record
        verdicts.append(MailauthVerdict([MailauthSig(**s) for s in record["signatures"]]))
    assert len(verdicts) == len(messages)
    return verdicts


def assert_mailauth_pass(verdict: MailauthVerdict, expected_sigs: int) -> None:
    """Every signature passes, ed25519-sha256 included."""
    assert len(verdict.sigs) == expected_sigs, verdict
    assert verdict.results() == ["pass"] * expected_sigs, verdict


async def assert_independent_pass(messages: list[bytes], port: int, tmp_path: Path,
                                  sigs: int, names: list[str] | None = None) -> None:
    """Mail::DKIM and mailauth each pass every one of the `sigs` signatures of every message:
    mailauth all of them, Mail::DKIM all but ed25519 ones where it lacks ed25519-sha256.
    Both see the same signatures, so no Ed25519 signature goes without a second verifier.
    `names` label the messages in failures (default: their index)."""
    perl = await perl_results(messages, port, tmp_path)
    node = await mailauth_results(messages, port, tmp_path)
    labels = names or [f"message {i}" for i in range(len(messages))]
    for name, p, m in zip(labels, perl, node, strict=True):
        try:
            assert_perl_pass(p, sigs)
            assert_mailauth_pass(m, sigs)
            assert [(s.algorithm, s.selector) for s in p.sigs] == [
                (s.algorithm, s.selector) for s in m.sigs], (p, m)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


async def assert_verifies(message: bytes, port: int, tmp_path: Path, sigs: int) -> None:
    """All three verifiers pass every one of the `sigs` signatures (Mail::DKIM: see
    assert_independent_pass)."""
    assert await dkimpy_results(message, port) == [True] * sigs
    await assert_independent_pass([message], port, tmp_path, sigs)
