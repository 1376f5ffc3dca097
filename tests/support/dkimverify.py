"""Two independent DKIM verifiers for tests: dkimpy and Perl's Mail::DKIM, each fetching
public keys from the loopback DNS server (tests/support/dns.py), never from a dict."""

from __future__ import annotations

import asyncio
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


# --- the two verifiers ------------------------------------------------------------------------

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
    """Every signature passes; an ed25519 one only where this Mail::DKIM knows ed25519."""
    assert len(verdict.sigs) == expected_sigs, verdict
    for sig in verdict.sigs:
        if sig.algorithm == "ed25519-sha256" and not MAIL_DKIM_ED25519:
            # RFC 8463 6: a verifier that lacks the algorithm ignores the signature.
            assert sig.detail == "invalid (unsupported algorithm ed25519-sha256)", verdict
            continue
        assert sig.result == "pass", verdict
    assert verdict.result == "pass", verdict


async def assert_verifies(message: bytes, port: int, tmp_path: Path, sigs: int) -> None:
    """Both verifiers pass every one of the `sigs` signatures."""
    assert await dkimpy_results(message, port) == [True] * sigs
    [verdict] = await perl_results([message], port, tmp_path)
    assert_perl_pass(verdict, sigs)
