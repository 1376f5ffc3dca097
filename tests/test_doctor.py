"""`relay doctor` against a real DNS server on 127.0.0.1 holding right, missing and wrong
records. The keys are made by `relay dkim keygen`, and the records it prints are the ones
published."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main
from relay.config import Config
from relay.doctor import run_doctor
from relay.policy.access import hash_password
from tests.conftest import relay_config
from tests.support.dns import LoopbackDNS, Records

IP = "192.0.2.10"
IP6 = "2001:db8::10"


def keygen(out: Path, domain: str, selector: str, algorithm: str,
           capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """Run `relay dkim keygen`; (the key file, the TXT value it printed)."""
    capsys.readouterr()
    assert main(["dkim", "keygen", "--domain", domain, "--selector", selector,
                 "--algorithm", algorithm, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    chunks = printed.split('"')[1::2]
    return out / f"{domain}.{selector}.pem", "".join(chunks)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys for example.com (s1 RSA, s2 Ed25519) and a stranger's RSA key, made once."""
    out = tmp_path_factory.mktemp("dkim")
    capture = _Capture()
    s1, s1_txt = capture.keygen(out, "example.com", "s1", "rsa")
    s2, s2_txt = capture.keygen(out, "example.com", "s2", "ed25519")
    _, other_txt = capture.keygen(out, "example.org", "x1", "rsa")
    return {"s1": s1, "s1_txt": s1_txt, "s2": s2, "s2_txt": s2_txt, "other_txt": other_txt}


class _Capture:
    """keygen() for a module-scoped fixture, where capsys is not available."""

    def keygen(self, out: Path, domain: str, selector: str, algorithm: str) -> tuple[Path, str]:
        import contextlib

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert main(["dkim", "keygen", "--domain", domain, "--selector", selector,
                         "--algorithm", algorithm, "--out", str(out)]) == 0
        return out / f"{domain}.{selector}.pem", "".join(buf.getvalue().split('"')[1::2])


def good_zone(material: dict[str, Any]) -> Records:
    return {
        ("s1._domainkey.example.com.", "TXT"): [material["s1_txt"]],
        ("s2._domainkey.example.com.", "TXT"): [material["s2_txt"]],
        ("example.com.", "TXT"): ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all",
                                  "google-site-verification=abc"],
        ("_dmarc.example.com.", "TXT"): ["v=DMARC1; p=reject; adkim=s; rua=mailto:d@example.com"],
        ("example.com.", "MX"): [(10, "mx1.example.com."), (20, "mx2.example.com.")],
        ("mx1.example.com.", "A"): ["192.0.2.25"],
        ("mx2.example.com.", "A"): ["192.0.2.26"],
    }


GOOD_LINES = [
    "PASS dkim example.com s1: TXT matches key (rsa 2048 bits)",
    "PASS dkim example.com s2: TXT matches key (ed25519)",
    f"PASS spf example.com: {IP} permitted (pass)",
    "PASS dmarc example.com: p=reject adkim=s aspf=r",
    "PASS mx example.com: 10 mx1.example.com., 20 mx2.example.com.",
]


def config(tmp_path: Path, port: int, material: dict[str, Any],
           **sections: Any) -> Config:
    data: dict[str, Any] = {
        "dns": {"nameservers": [f"127.0.0.1:{port}"]},
        "dkim": [{"domain": "example.com", "selector": "s1", "key": str(material["s1"])},
                 {"domain": "example.com", "selector": "s2", "key": str(material["s2"])}],
    }
    data.update(sections)
    return relay_config(tmp_path, 2526, **data)


async def doctor(cfg: Config, ips: list[str] | None = None) -> tuple[int, list[str]]:
    """run_doctor in a thread (it resolves synchronously; the DNS server is in this loop)."""
    out = io.StringIO()
    code = await asyncio.to_thread(run_doctor, cfg, outbound_ips=ips, out=out)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("doctor: ")
    return code, lines[:-1]


async def test_everything_right(tmp_path: Path, material: dict[str, Any]) -> None:
    async with LoopbackDNS(good_zone(material)) as dns:
        code, lines = await doctor(config(tmp_path, dns.port, material), [IP])
        assert (code, lines) == (0, GOOD_LINES)
        # The configured nameserver was asked, nothing else.
        asked = {name for name, _, _ in dns.queries}
        assert {"s1._domainkey.example.com.", "example.com.", "_dmarc.example.com."} <= asked
        code, lines = await doctor(config(tmp_path, dns.port, material), [IP, IP6])
        assert code == 0
        assert f"PASS spf example.com: {IP6} permitted (pass)" in lines


def _set(key: tuple[str, str], value: list[Any]) -> Callable[[Records, dict[str, Any]], None]:
    def change(zone: Records, material: dict[str, Any]) -> None:
        zone[key] = value
    return change


def _drop(key: tuple[str, str]) -> Callable[[Records, dict[str, Any]], None]:
    def change(zone: Records, material: dict[str, Any]) -> None:
        del zone[key]
    return change


def _other_key(zone: Records, material: dict[str, Any]) -> None:
    zone[("s1._domainkey.example.com.", "TXT")] = [material["other_txt"]]


def _s1_as_ed25519(zone: Records, material: dict[str, Any]) -> None:
    zone[("s1._domainkey.example.com.", "TXT")] = [material["s2_txt"]]


S1 = ("s1._domainkey.example.com.", "TXT")
SPF = ("example.com.", "TXT")
DMARC = ("_dmarc.example.com.", "TXT")
MX = ("example.com.", "MX")

# change to the good zone -> (the line that replaces its good counterpart, exit code)
CASES: list[tuple[str, Callable[[Records, dict[str, Any]], None], str, int]] = [
    ("dkim wrong key", _other_key,
     "FAIL dkim example.com s1: TXT does not match key (p= is another key)", 1),
    ("dkim wrong type", _s1_as_ed25519,
     "FAIL dkim example.com s1: TXT is k=ed25519 but the key is rsa", 1),
    ("dkim revoked", _set(S1, ["v=DKIM1; k=rsa; p="]),
     "FAIL dkim example.com s1: TXT has an empty p= (the key is revoked, RFC 6376 3.6.1)", 1),
    ("dkim garbage", _set(S1, ["v=DKIM1; k=rsa; p=bm90IGEga2V5"]),
     "FAIL dkim example.com s1: TXT p= is not an RSA public key", 1),
    ("spf -all excludes", _set(SPF, ["v=spf1 ip4:198.51.100.0/24 -all"]),
     f"FAIL spf example.com: {IP} not permitted (fail)", 1),
    ("spf ~all", _set(SPF, ["v=spf1 ip4:198.51.100.0/24 ~all"]),
     f"WARN spf example.com: {IP} not permitted (softfail)", 0),
    ("spf ?all", _set(SPF, ["v=spf1 ?all"]),
     f"WARN spf example.com: {IP} not permitted (neutral)", 0),
    ("spf missing", _set(SPF, ["unrelated=1"]),
     f"FAIL spf example.com: no SPF record; {IP} not authorised (none)", 1),
    ("spf two records", _set(SPF, ["v=spf1 -all", "v=spf1 +all"]),
     (f"FAIL spf example.com: SPF record unusable for {IP} (permerror: "
      "Two or more type TXT spf records found.)"), 1),
    ("dmarc missing", _drop(DMARC),
     "WARN dmarc example.com: no DMARC record at _dmarc.example.com", 0),
    ("dmarc two records", _set(DMARC, ["v=DMARC1; p=none", "v=DMARC1; p=reject"]),
     ("FAIL dmarc example.com: 2 DMARC records at _dmarc.example.com: receivers ignore them "
      "all (RFC 7489 6.6.3)"), 1),
    ("dmarc no policy", _set(DMARC, ["v=DMARC1; rua=mailto:d@example.com"]),
     "FAIL dmarc example.com: record has no valid p= tag (RFC 7489 6.3)", 1),
    ("dmarc quarantine pct", _set(DMARC, ["v=DMARC1; p=quarantine; aspf=s; pct=50"]),
     "PASS dmarc example.com: p=quarantine adkim=r aspf=s pct=50", 0),
    ("mx missing", _drop(MX),
     "WARN mx example.com: no MX record: bounces and replies to this domain cannot come back",
     0),
    ("mx null", _set(MX, [(0, ".")]),
     ("WARN mx example.com: null MX (RFC 7505): bounces and replies to this domain cannot "
      "come back"), 0),
]


@pytest.mark.parametrize(("change", "expected", "code"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_wrong_or_missing_record(tmp_path: Path, material: dict[str, Any],
                                       change: Callable[[Records, dict[str, Any]], None],
                                       expected: str, code: int) -> None:
    zone = good_zone(material)
    change(zone, material)
    async with LoopbackDNS(zone) as dns:
        got_code, lines = await doctor(config(tmp_path, dns.port, material), [IP])
    kind_subject = expected.split(":")[0].split(" ", 1)[1]
    # Exactly the one check changed, to the expected line; the others still pass.
    want = [expected if line.split(":")[0].split(" ", 1)[1] == kind_subject else line
            for line in GOOD_LINES]
    assert (got_code, lines) == (code, want)


async def test_missing_dkim_record_says_what_to_publish(tmp_path: Path,
                                                        material: dict[str, Any]) -> None:
    zone = good_zone(material)
    del zone[S1]
    async with LoopbackDNS(zone) as dns:
        code, lines = await doctor(config(tmp_path, dns.port, material), [IP])
    assert code == 1
    assert lines[0] == ("FAIL dkim example.com s1: no TXT record at s1._domainkey.example.com.;"
                        f" publish \"{material['s1_txt']}\"")
    assert lines[1:] == GOOD_LINES[1:]


async def test_app_domains_and_inherited_dmarc(tmp_path: Path,
                                               material: dict[str, Any]) -> None:
    """An [[app]] domain without a [[dkim]] key is checked too; a subdomain inherits the
    organisational domain's DMARC policy (its sp= when given)."""
    zone = good_zone(material)
    zone[DMARC] = ["v=DMARC1; p=reject; sp=quarantine"]
    zone[("news.example.com.", "TXT")] = ["v=spf1 include:_spf.example.com -all"]
    zone[("_spf.example.com.", "TXT")] = ["v=spf1 ip4:192.0.2.10 -all"]
    app = {"name": "shop", "password_hash": hash_password("x", iterations=1000),
           "from_domains": ["example.com", "news.example.com"]}
    async with LoopbackDNS(zone) as dns:
        code, lines = await doctor(config(tmp_path, dns.port, material, app=[app]), [IP])
    assert code == 0
    assert lines[:2] == GOOD_LINES[:2]
    assert lines[5:] == [
        ("WARN dkim news.example.com: no [[dkim]] key for this domain: its mail is signed by "
         "a fallback domain or not at all"),
        f"PASS spf news.example.com: {IP} permitted (pass)",
        ("PASS dmarc news.example.com: p=quarantine adkim=r aspf=r "
         "(inherited from _dmarc.example.com)"),
        ("WARN mx news.example.com: no MX record: bounces and replies to this domain cannot "
         "come back"),
    ]


async def test_outbound_address_detected_when_not_given(tmp_path: Path,
                                                        material: dict[str, Any]) -> None:
    """With no --ip and no [outbound].source_addresses, the address that reaches the
    smarthost is used; a loopback one cannot be judged by SPF and says so."""
    async with LoopbackDNS(good_zone(material)) as dns:
        code, lines = await doctor(config(tmp_path, dns.port, material))
    assert code == 0
    assert lines[2] == ("WARN spf example.com: outbound address 127.0.0.1 is not public "
                        "(a smarthost's own address is what receivers check); give it with "
                        "--ip ADDRESS")


async def test_cli_doctor(tmp_path: Path, material: dict[str, Any],
                          capsys: pytest.CaptureFixture[str]) -> None:
    zone = good_zone(material)
    zone[SPF] = ["v=spf1 -all"]
    async with LoopbackDNS(zone) as dns:
        conf = tmp_path / "relay.toml"
        conf.write_text(
            f'[outbound]\nsmarthost = "127.0.0.1:2526"\n'
            f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
            f'[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey = "{material["s1"]}"\n')
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["doctor", "--config", str(conf), "--ip", IP])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[:-1] == [GOOD_LINES[0], f"FAIL spf example.com: {IP} not permitted (fail)",
                        GOOD_LINES[3], GOOD_LINES[4]]
    assert out[-1] == "doctor: 4 checks, 1 failed, 0 warnings"


async def test_cli_doctor_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text('[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey = "nope.pem"\n')
    assert main(["doctor", "--config", str(conf)]) == 1
    assert "dkim[0].key" in capsys.readouterr().err


def test_keygen_helper_matches_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The module fixture's capture gives what the CLI prints to a terminal."""
    path, txt = keygen(tmp_path, "example.net", "k1", "ed25519", capsys)
    assert path.is_file() and txt.startswith("v=DKIM1; k=ed25519; p=")
