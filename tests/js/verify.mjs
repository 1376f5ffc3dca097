// An independent DKIM verifier for relay's tests: mailauth (Node.js), the one that knows
// ed25519-sha256 (RFC 8463) where Debian's Mail::DKIM does not.
//
//   node verify.mjs PORT FILE...
//
// Verifies each message file with mailauth's dkimVerify in its strict (RFC-exact) mode,
// fetching public keys from the loopback DNS server on 127.0.0.1:PORT
// (tests/support/dns.py) through node's own stub resolver (c-ares, which retries over TCP
// when an answer is truncated), never from a table. Prints one JSON line per file:
//   {"file": ..., "signatures": [{"algorithm", "domain", "selector", "result", "comment"}]}
// topmost signature first. Used by tests/support/dkimverify.py (mailauth_results).

import { readFile } from 'node:fs/promises';
import { Resolver } from 'node:dns/promises';
// The DKIM verifier alone (a documented entry point, lib/dkim/verify.d.ts): the package's
// main module also loads its BIMI code and with it undici 8, which needs node >= 22.19,
// while the DKIM code runs on the node 20 that Debian-based CI images carry.
import { dkimVerify } from 'mailauth/lib/dkim/verify.js';

const [port, ...files] = process.argv.slice(2);
if (!/^\d+$/.test(port ?? '')) {
    console.error('usage: node verify.mjs PORT FILE...');
    process.exit(2);
}

// Only the loopback server: no /etc/resolv.conf.
const dns = new Resolver({ timeout: 5000, tries: 2 });
dns.setServers([`127.0.0.1:${port}`]);
const resolver = (name, rrtype) => dns.resolve(name, rrtype);

for (const file of files) {
    const message = await readFile(file);
    const { results } = await dkimVerify(message, {
        resolver,
        strict: true,          // a broken body hash is "fail", not the lenient "neutral"
        minBitLength: 2048     // as dkimpy's minkey=2048 in dkimverify.py
    });
    // An unsigned message gets one pseudo-result "none": no signature to report.
    const signatures = results.filter(r => r.status?.result !== 'none').map(r => ({
        algorithm: r.algo ?? '',
        domain: r.signingDomain ?? '',
        selector: r.selector ?? '',
        result: r.status?.result ?? '',
        comment: r.status?.comment ?? ''
    }));
    process.stdout.write(JSON.stringify({ file, signatures }) + '\n');
}
