"""The bounce classifier as a table (STYLE rule 9): real replies -> category and action.

Each row is a reply as the next hop puts it on the wire (every line with its code, "550-"
on all but the last), anonymised (example.com / example.net / 192.0.2.x, tracking IDs
blanked), parsed the way the smarthost client does (aiosmtplib joins the lines without
their "NNN-" prefixes) and classified with the shipped rules. Every shipped rule is matched
by at least one row. Cases 21 and 22 of ../shared/cases hold exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay import replies
from relay.outbound.classify import (
    DEFAULT_RULE,
    SHIPPED_LABEL,
    Action,
    Category,
    Rules,
    RulesError,
    SmtpReply,
    Verdict,
    classify,
    from_catalogue,
    parse_reply,
    verdict_for,
)

HARD, SOFT, RATE = Category.HARD, Category.SOFT, Category.RATE_LIMITED
BLOCK, CONTENT, RELAY = Category.BLOCK, Category.CONTENT, Category.RELAY_SIDE
UNKNOWN, DELIVERED = Category.UNKNOWN, Category.DELIVERED
BOUNCE, DEFER, SENT = Action.BOUNCE, Action.DEFER, Action.DELIVERED

REPO = Path(__file__).resolve().parents[2]
SHIPPED_FILE = REPO / "relay" / "outbound" / "bounce_rules.toml"
ADMIN_EXAMPLE = REPO / "conf" / "bounce_rules.toml"


def wire(raw: str) -> SmtpReply:
    """Parse a reply as sent on the wire: "550-a\\r\\n550 b" -> parse_reply(550, "a\\nb")."""
    lines = raw.replace("\r\n", "\n").rstrip("\n").split("\n")
    return parse_reply(int(lines[0][:3]), "\n".join(line[4:] for line in lines))


# (id, reply on the wire, category, action, suppress)
TABLE: list[tuple[str, str, Category, Action, bool]] = [
    # --- case 22 (../shared/cases/22-5xx-policy-not-recipient), exactly as the .expect says
    ("case22-r1", ("550-5.7.1 [192.0.2.10] Message refused: content scored as\r\n"
                   "550-5.7.1 probable bulk spam. Details:\r\n"
                   "550 5.7.1 https://support.example.net/unsolicited"), CONTENT, BOUNCE, False),
    ("case22-r2", ("554 5.7.0 The sender has exceeded its allowed number of outgoing messages. "
                   "Try again later."), RATE, DEFER, False),
    ("case22-r3", "550 Rejected: exceeded hourly sending limit", RATE, DEFER, False),
    ("case22-r4", "550 5.2.0 Mail refused, sending server blocked (ref 506)", BLOCK, BOUNCE,
     False),
    ("case22-r5", "550 5.1.90 Daily limit for message recipients reached", RATE, DEFER, False),
    ("case22-r6", ("550-5.1.1 No mailbox by that name here;\r\n"
                   "550 5.1.1 please verify the recipient address."), HARD, BOUNCE, True),
    ("case22-r7", "552 5.2.2 Mailbox full", SOFT, DEFER, False),
    ("case22-r8", "556 5.1.10 Recipient domain has a null MX", HARD, BOUNCE, True),
    ("case22-r9", "550 5.7.1 Recipient address rejected: access denied", BLOCK, BOUNCE, False),
    # --- case 21 (../shared/cases/21-deferral-4xx-not-suppressed)
    ("case21-tss04", ("421 4.7.0 [TSS04] Mail from 192.0.2.10 is deferred for now because of "
                      "complaints; see https://postmaster.example.org/tss04"), RATE, DEFER, False),
    ("case21-busy", "451 4.7.500 Server busy, try again later", RATE, DEFER, False),

    # --- Gmail
    ("gmail-no-such-user",
     ("550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
      "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
      "550-5.1.1 unnecessary spaces. For more information, go to\r\n"
      "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser xxxx - gsmtp"),
     HARD, BOUNCE, True),
    ("gmail-over-quota-perm",
     ("552-5.2.2 The recipient's inbox is out of storage space. Please direct the\r\n"
      "552-5.2.2 recipient to\r\n"
      "552 5.2.2  https://support.google.com/mail/?p=OverQuotaPerm xxxx - gsmtp"),
     SOFT, DEFER, False),
    ("gmail-over-quota-temp",
     ("452-4.2.2 The recipient's inbox is out of storage space and inbound mail\r\n"
      "452-4.2.2 cannot be delivered. Please try again later. For more information, go to\r\n"
      "452 4.2.2  https://support.google.com/mail/?p=OverQuotaTemp xxxx - gsmtp"),
     SOFT, DEFER, False),
    ("gmail-disabled-user",
     ("550-5.2.1 The email account that you tried to reach is disabled. Learn more at\r\n"
      "550 5.2.1  https://support.google.com/mail/?p=DisabledUser xxxx - gsmtp"),
     SOFT, DEFER, False),
    ("gmail-unsolicited",
     ("550-5.7.1 [192.0.2.10      12] Our system has detected that this message is\r\n"
      "550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n"
      "550-5.7.1 this message has been blocked. Please visit\r\n"
      "550-5.7.1  https://support.google.com/mail/?p=UnsolicitedMessageError\r\n"
      "550 5.7.1  for more information. xxxx - gsmtp"), CONTENT, BOUNCE, False),
    ("gmail-unsolicited-rate-limited",
     ("421-4.7.0 [192.0.2.10      15] Our system has detected an unusual rate of\r\n"
      "421-4.7.0 unsolicited mail originating from your IP address. To protect our\r\n"
      "421-4.7.0 users from spam, mail sent from your IP address has been temporarily\r\n"
      "421-4.7.0 rate limited. Please visit\r\n"
      "421-4.7.0  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\r\n"
      "421 4.7.0 review our Bulk Email Senders Guidelines. xxxx - gsmtp"), RATE, DEFER, False),
    ("gmail-dkim-domain-rate-limited",
     ("421-4.7.28 [192.0.2.10      15] Our system has detected an unusual rate of\r\n"
      "421-4.7.28 unsolicited mail originating from your DKIM domain [example.com  15].\r\n"
      "421-4.7.28 To protect our users from spam, mail sent from your DKIM domain has\r\n"
      "421-4.7.28 been temporarily rate limited. Please visit\r\n"
      "421 4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError xxxx - gsmtp"),
     RATE, DEFER, False),
    ("gmail-unsolicited-ip-blocked",
     ("550-5.7.28 [192.0.2.10] Our system has detected an unusual rate of\r\n"
      "550-5.7.28 unsolicited mail originating from your IP address. To protect our\r\n"
      "550-5.7.28 users from spam, mail sent from your IP address has been blocked.\r\n"
      "550 5.7.28  https://support.google.com/mail/?p=UnsolicitedIPError xxxx - gsmtp"),
     BLOCK, BOUNCE, False),
    ("gmail-unauthenticated",
     ("550-5.7.26 This mail is unauthenticated, which poses a security risk to the\r\n"
      "550-5.7.26 sender and Gmail users, and has been blocked. The sender must\r\n"
      "550-5.7.26 authenticate with at least one of SPF or DKIM. For this message,\r\n"
      "550-5.7.26 DKIM checks did not pass and SPF check for [example.com] did not\r\n"
      "550-5.7.26 pass with ip: [192.0.2.10]. The sender should visit\r\n"
      "550-5.7.26  https://support.google.com/mail/answer/81126#authentication for\r\n"
      "550 5.7.26 instructions on setting up authentication. xxxx - gsmtp"), BLOCK, BOUNCE, False),
    ("gmail-no-ptr",
     ("550-5.7.25 [192.0.2.10] The IP address sending this message does not have a\r\n"
      "550-5.7.25 PTR record setup, or the corresponding forward DNS entry does not\r\n"
      "550-5.7.25 point to the sending IP. As a policy, Gmail does not accept messages\r\n"
      "550-5.7.25 from IPs with missing PTR records. Please visit\r\n"
      "550 5.7.25  https://support.google.com/mail/answer/81126#ip-rdns xxxx - gsmtp"),
     BLOCK, BOUNCE, False),
    ("gmail-low-domain-reputation",
     ("550-5.7.1 [192.0.2.10] Gmail has detected that this message is likely\r\n"
      "550-5.7.1 suspicious due to the very low reputation of the sending domain. To\r\n"
      "550-5.7.1 best protect our users from spam, the message has been blocked.\r\n"
      "550 5.7.1  https://support.google.com/mail/answer/188131 xxxx - gsmtp"),
     BLOCK, BOUNCE, False),
    ("gmail-receiving-rate",
     ("450-4.2.1 The user you are trying to contact is receiving mail at a rate that\r\n"
      "450-4.2.1 prevents additional messages from being delivered. Please resend your\r\n"
      "450-4.2.1 message at a later point. If the user is able to receive mail at that\r\n"
      "450-4.2.1 time, your message will be delivered. For more information, please visit\r\n"
      "450 4.2.1  https://support.google.com/mail/?p=ReceivingRate xxxx - gsmtp"),
     RATE, DEFER, False),
    ("gmail-blocked-message",
     ("552-5.7.0 This message was blocked because its content presents a potential\r\n"
      "552-5.7.0 security issue. Please visit\r\n"
      "552-5.7.0  https://support.google.com/mail/?p=BlockedMessage to review our\r\n"
      "552 5.7.0 message content and attachment content guidelines. xxxx - gsmtp"),
     CONTENT, BOUNCE, False),
    ("gmail-size",
     ("552-5.2.3 Your message exceeded Google's message size limits. Please visit\r\n"
      "552-5.2.3  https://support.google.com/mail/?p=MaxSizeError to view our size\r\n"
      "552 5.2.3 guidelines. xxxx - gsmtp"), RELAY, BOUNCE, False),
    ("gmail-smarthost-bad-credentials",
     ("535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
      "535 5.7.8  https://support.google.com/mail/?p=BadCredentials xxxx - gsmtp"),
     RELAY, BOUNCE, False),
    ("gmail-smarthost-starttls-first",
     "530 5.7.0 Must issue a STARTTLS command first. xxxx - gsmtp", RELAY, BOUNCE, False),
    ("gmail-smarthost-daily-sending-limit",
     ("550-5.4.5 Daily user sending limit exceeded. For more information on Gmail\r\n"
      "550-5.4.5 sending limits go to\r\n"
      "550 5.4.5  https://support.google.com/a/answer/166852 xxxx - gsmtp"), RATE, DEFER, False),
    ("gmail-try-again-later",
     "421 4.7.0 Try again later, closing connection. (EHLO) xxxx - gsmtp", RATE, DEFER, False),
    ("gmail-temporary-system-problem",
     "421 4.3.0 Temporary System Problem.  Try again later (10). xxxx - gsmtp",
     RATE, DEFER, False),
    ("gmail-temporarily-rejected",
     "451 4.3.0 Mail server temporarily rejected message. xxxx - gsmtp", UNKNOWN, DEFER, False),

    # --- Outlook.com, Hotmail, Office 365 (Exchange Online Protection)
    ("outlook-mailbox-unavailable",
     ("550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). "
      "[AM0PR00MB0000.eurprd00.prod.outlook.com]"), HARD, BOUNCE, True),
    ("hotmail-mailbox-unavailable-no-enhanced",
     "550 Requested action not taken: mailbox unavailable (1234567890:2184:-2147467259)",
     HARD, BOUNCE, True),
    ("o365-recipient-not-found",
     ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient reader@example.net not found by "
      "SMTP address lookup"), HARD, BOUNCE, True),
    ("o365-recip-not-found",
     "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found", HARD, BOUNCE, True),
    ("o365-dbeb-access-denied",
     ("550 5.4.1 Recipient address rejected: Access denied. For more information see "
      "https://aka.ms/EXOSmtpErrors [DB5PEPF00000000.eurprd00.prod.outlook.com]"),
     BLOCK, BOUNCE, False),
    ("outlook-s3150-block-list",
     ("550 5.7.1 Unfortunately, messages from [192.0.2.10] weren't sent. Please contact your "
      "Internet service provider since part of their network is on our block list (S3150). "
      "You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx"
      "#errors. [DB5EUR00FT000.eop-EUR00.prod.protection.outlook.com]"), BLOCK, BOUNCE, False),
    ("hotmail-sc001-block-list",
     ("550 SC-001 (BAY0-MC0F00) Unfortunately, messages from 192.0.2.10 weren't sent. Please "
      "contact your Internet service provider since part of their network is on our block "
      "list. You can also refer your provider to "
      "http://mail.live.com/mail/troubleshooting.aspx#errors."), BLOCK, BOUNCE, False),
    ("o365-spamhaus",
     ("550 5.7.1 Service unavailable, Client host [192.0.2.10] blocked using Spamhaus. To "
      "request removal from this list see https://www.spamhaus.org/query/ip/192.0.2.10 "
      "AS(1450) [BN1NAM00FT000.eop-nam00.prod.protection.outlook.com]"), BLOCK, BOUNCE, False),
    ("outlook-s775-rate-limited",
     ("451 4.7.650 The mail server [192.0.2.10] has been temporarily rate limited due to IP "
      "reputation. For e-mail delivery information, see https://postmaster.live.com (S775) "
      "[Name=Protocol Filter Agent][AGT=PFA][MxId=00000000000000] "
      "[DB5EUR00FT000.eop-EUR00.prod.protection.outlook.com]"), RATE, DEFER, False),
    ("outlook-server-busy",
     ("451 4.7.500 Server busy. Please try again later from [192.0.2.10]. (S77714) "
      "[VI1EUR00FT000.eop-eur00.prod.protection.outlook.com]"), RATE, DEFER, False),
    ("o365-banned-sending-ip",
     ("550 5.7.606 Access denied, banned sending IP [192.0.2.10]. To request removal from this "
      "list please visit https://sender.office.com/ and follow the directions. AS(1430)"),
     BLOCK, BOUNCE, False),
    ("o365-traffic-not-accepted",
     ("550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP. For "
      "more information please go to http://go.microsoft.com/fwlink/?LinkId=526653 AS(7)"),
     BLOCK, BOUNCE, False),
    ("o365-quota-exceeded",
     ("554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException."
      "MapiExceptionShutoffQuotaExceeded; Failed to process message due to a permanent "
      "exception with message"), SOFT, DEFER, False),
    ("o365-daily-recipient-limit",
     ("550 5.1.90 Your message can't be sent because you've reached your daily limit for "
      "message recipients. For more information, visit https://aka.ms/limits"),
     RATE, DEFER, False),
    ("o365-submission-quota",
     ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
      "process message due to a permanent exception with message Cannot submit message."),
     RATE, DEFER, False),
    ("o365-too-many-recipients",
     "452 4.5.3 Too many recipients (AS780090) [AM4PEPF00000000.eurprd00.prod.outlook.com]",
     RATE, DEFER, False),
    ("o365-smtp-auth-disabled",
     ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
      "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."),
     RELAY, BOUNCE, False),
    ("o365-relay-access-denied",
     ("550 5.7.64 TenantAttribution; Relay Access Denied "
      "[SN1NAM00FT000.eop-nam00.prod.protection.outlook.com]"), RELAY, BOUNCE, False),
    ("o365-dmarc-reject",
     ("550 5.7.509 Access denied, sending domain example.com does not pass DMARC verification "
      "and has a DMARC policy of reject."), BLOCK, BOUNCE, False),
    ("o365-detected-as-spam",
     ("550 5.7.350 Remote server returned message detected as spam -> 554 5.7.1 Message "
      "rejected as spam by Content Filtering"), CONTENT, BOUNCE, False),
    ("exchange-send-as-permission",
     "550 5.7.1 Client does not have permissions to send as this sender", BLOCK, BOUNCE,
     False),
    ("exchange-client-not-authenticated",
     "530 5.7.1 Client was not authenticated", RELAY, BOUNCE, False),

    # --- Yahoo, AOL
    ("yahoo-tss04",
     ("421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected "
      "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"),
     RATE, DEFER, False),
    ("yahoo-gl01",
     ("421 4.7.0 [GL01] Message from (192.0.2.10) temporarily deferred - 4.16.50. Please refer "
      "to https://postmaster.yahooinc.com/error-codes"), RATE, DEFER, False),
    ("yahoo-451-temporarily-deferred", "451 Message temporarily deferred - [160]",
     RATE, DEFER, False),
    ("yahoo-tss09-permanently-deferred",
     ("553 5.7.2 [TSS09] All messages from 192.0.2.10 will be permanently deferred; Retrying "
      "will NOT succeed. See https://postmaster.yahooinc.com/error-codes"), BLOCK, BOUNCE, False),
    ("yahoo-ts03-permanently-deferred-4xx",
     ("421 4.7.1 [TS03] All messages from 192.0.2.10 will be permanently deferred; Retrying "
      "will NOT succeed. See https://postmaster.yahooinc.com/error-codes"), BLOCK, DEFER, False),
    ("yahoo-policy-reasons",
     ("554 5.7.9 Message not accepted for policy reasons.  See "
      "https://postmaster.yahooinc.com/error-codes"), BLOCK, BOUNCE, False),
    ("yahoo-no-account",
     ("554 delivery error: dd This user doesn't have a example.net account (reader@example.net)"
      " [0] - mta0000.mail.example.net"), HARD, BOUNCE, True),
    ("yahoo-mailbox-disabled",
     ("554 delivery error: dd Sorry your message to reader@example.net cannot be delivered. "
      "This mailbox is disabled (554.30). - mta0000.mail.example.net"), SOFT, DEFER, False),
    ("yahoo-mailbox-not-found", "552 1 Requested mail action aborted, mailbox not found",
     HARD, BOUNCE, True),
    ("yahoo-message-size",
     "554 30 Sorry, your message size exceeds 41943040 bytes.", RELAY, BOUNCE, False),
    ("aol-cs01-local-policy",
     ("554 5.7.1 [CS01] Message rejected due to local policy. Please visit "
      "https://postmaster.yahooinc.com/error-codes"), BLOCK, BOUNCE, False),

    # --- Apple iCloud
    ("icloud-user-does-not-exist", "550 5.1.1 <reader@example.net>: user does not exist",
     HARD, BOUNCE, True),
    ("icloud-over-quota", "552 5.2.2 <reader@example.net>: user is over quota",
     SOFT, DEFER, False),
    ("icloud-cs01",
     ("554 5.7.1 [CS01] Message rejected due to local policy. Please visit "
      "https://support.apple.com/en-us/HT204137"), BLOCK, BOUNCE, False),
    ("icloud-dmarc",
     ("550 5.7.1 Your message was rejected due to example.com's DMARC policy. See "
      "https://support.apple.com/en-us/HT204137 for more information"), BLOCK, BOUNCE, False),
    ("icloud-too-many-connections",
     "421 4.7.0 Too many connections from 192.0.2.10, please try again later",
     RATE, DEFER, False),

    # --- GMX, Web.de (1&1 "Nemesis")
    ("gmx-mailbox-unavailable", "550 Requested action not taken: mailbox unavailable",
     HARD, BOUNCE, True),
    ("gmx-block-listed",
     ("554-gmx.net (mxgmx000) Nemesis ESMTP Service not available\r\n"
      "554-No SMTP service\r\n"
      "554-IP address is block listed.\r\n"
      "554 For explanation visit https://postmaster.gmx.net/en/error-messages?ip=192.0.2.10&c=bl"),
     BLOCK, BOUNCE, False),
    ("gmx-policy-restrictions-4xx",
     ("421-gmx.net (mxgmx000) Nemesis ESMTP Service not available\r\n"
      "421-Service unavailable\r\n"
      "421-Reject due to policy restrictions.\r\n"
      "421 For explanation visit https://postmaster.gmx.net/en/error-messages?ip=192.0.2.10&c=sp"),
     BLOCK, DEFER, False),
    ("gmx-too-many-connections",
     ("421-gmx.net (mxgmx000) Nemesis ESMTP Service not available\r\n"
      "421-Service unavailable\r\n"
      "421-Too many connections.\r\n"
      "421 For explanation visit https://postmaster.gmx.net/en/error-messages?ip=192.0.2.10"
      "&c=ipcon"),
     RATE, DEFER, False),
    ("webde-storage-allocation",
     "552 Requested mail action aborted: exceeded storage allocation", SOFT, DEFER, False),
    ("webde-transaction-failed-policy",
     ("554-Transaction failed\r\n"
      "554-Reject due to policy restrictions.\r\n"
      "554 For explanation visit https://postmaster.web.de/en/error-messages?ip=192.0.2.10&c=hi"),
     BLOCK, BOUNCE, False),

    # --- Orange
    ("orange-ofr-506", "550 5.2.0 Mail rejete. Mail rejected. ofr_506 [506]",
     BLOCK, BOUNCE, False),
    ("orange-too-many-connections",
     ("421 mwinf0000 ME Trop de connexions, veuillez verifier votre configuration. Too many "
      "connections, slow down. OFR005_104 [104]"), RATE, DEFER, False),
    ("orange-overquota",
     "552 5.2.2 Boite du destinataire pleine. Recipient overquota. OFR_999 [999]",
     SOFT, DEFER, False),
    ("orange-invalid-recipient",
     "550 5.1.1 Adresse d au moins un destinataire invalide. Invalid recipient. OFR_416 [416]",
     HARD, BOUNCE, True),

    # --- Comcast
    ("comcast-dnsbl",
     ("554 resimta-po-00v.sys.example.net resimta-po-00v.sys.example.net 192.0.2.10 found on "
      "one or more DNSBLs, see http://postmaster.comcast.net/smtp-error-codes.php#BL000001"),
     BLOCK, BOUNCE, False),
    ("comcast-not-our-customer", "550 5.1.1 <reader@example.net> Not our Customer",
     HARD, BOUNCE, True),
    ("comcast-rate-limited",
     ("421 resimta-po-00v.sys.example.net 192.0.2.10 rate limited; see "
      "http://postmaster.comcast.net/smtp-error-codes.php#RL000001"), RATE, DEFER, False),
    ("comcast-mailbox-full", "552 5.2.2 <reader@example.net> Mailbox full", SOFT, DEFER, False),

    # --- Proton, Zoho, Yandex, Mail.ru
    ("proton-address-does-not-exist",
     "550 5.1.1 <reader@example.net>: Recipient address rejected: Address does not exist",
     HARD, BOUNCE, True),
    ("proton-spam",
     ("554 5.7.1 <reader@example.net>: Recipient address rejected: Message rejected due to "
      "spam"), CONTENT, BOUNCE, False),
    ("zoho-user-does-not-exist", "550 5.1.1 User does not exist - <reader@example.net>",
     HARD, BOUNCE, True),
    ("yandex-spam",
     ("554 5.7.1 [2] Message rejected under suspicion of SPAM; https://ya.cc/1IrBc "
      "1700000000-AbCdEfGhIj-1"), CONTENT, BOUNCE, False),
    ("mailru-account-disabled",
     ("550 Message was not accepted -- invalid mailbox.  Local mailbox reader@example.net is "
      "unavailable: account is disabled"), SOFT, DEFER, False),

    # --- Mimecast
    ("mimecast-invalid-recipient",
     ("550 Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550 "
      "[AbCdEfGhIjKlMnOp.uk000]"), HARD, BOUNCE, True),
    ("mimecast-anti-spoofing",
     ("550 Rejected by header based Anti-Spoofing policy: reader@example.net - "
      "https://community.mimecast.com/docs/DOC-1369#550 [AbCdEfGhIjKlMnOp.uk000]"),
     BLOCK, BOUNCE, False),
    ("mimecast-security-policies",
     ("554 Email rejected due to security policies - "
      "https://community.mimecast.com/docs/DOC-1369#554 [AbCdEfGhIjKlMnOp.uk000]"),
     BLOCK, BOUNCE, False),
    ("mimecast-envelope-blocked",
     ("550 Envelope blocked - User Entry - https://community.mimecast.com/docs/DOC-1369#550 "
      "[AbCdEfGhIjKlMnOp.uk000]"), BLOCK, BOUNCE, False),
    ("mimecast-resource-unavailable",
     ("451 Internal resource temporarily unavailable - "
      "https://community.mimecast.com/docs/DOC-1369#451"), SOFT, DEFER, False),

    # --- Proofpoint, Barracuda
    ("proofpoint-blocked",
     "554 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.10", BLOCK, BOUNCE, False),
    ("proofpoint-icloud-blocked",
     "550 5.7.0 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.10",
     BLOCK, BOUNCE, False),
    ("proofpoint-spam-content",
     "554 5.7.1 Message blocked due to spam content in the message.", CONTENT, BOUNCE, False),
    ("proofpoint-throttled", "451 4.7.1 Throttled - try again later", RATE, DEFER, False),
    ("barracuda-reputation",
     ("554 Service unavailable; Client host [192.0.2.10] blocked using Barracuda Reputation; "
      "http://www.barracudanetworks.com/reputation/?r=1&ip=192.0.2.10"), BLOCK, BOUNCE, False),
    ("barracuda-recipient-blocked",
     "550 permanent failure for one or more recipients (reader@example.net:blocked)",
     BLOCK, BOUNCE, False),
    ("barracuda-virus",
     "550 5.7.0 Message rejected: virus found in attachment (Eicar-Test-Signature)",
     CONTENT, BOUNCE, False),

    # --- Postfix, Amazon SES and other MTAs and smarthosts
    ("postfix-user-unknown",
     ("550 5.1.1 <reader@example.net>: Recipient address rejected: User unknown in virtual "
      "mailbox table"), HARD, BOUNCE, True),
    ("postfix-greylisted",
     ("450 4.2.0 <reader@example.net>: Recipient address rejected: Greylisted, see "
      "http://postgrey.schweikert.ch/help/example.net.html"), BLOCK, DEFER, False),
    ("postfix-relay-access-denied", "554 5.7.1 <reader@example.net>: Relay access denied",
     RELAY, BOUNCE, False),
    ("postfix-relay-access-denied-4xx", "454 4.7.1 <reader@example.net>: Relay access denied",
     RELAY, DEFER, False),
    ("postfix-sender-domain-not-found",
     "450 4.1.8 <news@example.com>: Sender address rejected: Domain not found",
     RELAY, DEFER, False),
    ("postfix-spamhaus-zen",
     ("554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.spamhaus.org; "
      "https://www.spamhaus.org/query/ip/192.0.2.10"), BLOCK, BOUNCE, False),
    ("postfix-insufficient-storage", "452 4.3.1 Insufficient system storage",
     UNKNOWN, DEFER, False),
    ("postfix-tls-not-available", "454 4.7.0 TLS not available due to local problem",
     RELAY, DEFER, False),
    ("postfix-too-big",
     "552 5.3.4 Message size exceeds fixed maximum message size", RELAY, BOUNCE, False),
    ("postfix-domain-not-found",
     "550 5.1.2 <reader@example.net>: Recipient address rejected: Domain not found",
     UNKNOWN, BOUNCE, False),
    ("postfix-mailbox-busy",
     "450 4.2.1 <reader@example.net>: Recipient address rejected: mailbox busy",
     SOFT, DEFER, False),
    ("cyrus-temporary-auth-failure", "454 4.7.0 Temporary authentication failure",
     RELAY, DEFER, False),
    ("smarthost-unauthenticated-senders", "550 Unauthenticated senders not allowed",
     RELAY, BOUNCE, False),
    ("ses-maximum-sending-rate", "454 Throttling failure: Maximum sending rate exceeded.",
     RATE, DEFER, False),
    ("ses-daily-quota", "454 Throttling failure: Daily message quota exceeded.",
     RATE, DEFER, False),
    ("generic-554-try-again-later",
     "554 Transaction failed: service overloaded, try again later", RATE, DEFER, False),
    ("sendmail-command-unrecognized", '500 5.5.1 Command unrecognized: "XCLIENT NAME=x"',
     RELAY, BOUNCE, False),
    ("exim-smtputf8-option", "555 5.5.4 Unsupported option: SMTPUTF8", RELAY, BOUNCE, False),
    ("amavis-invalid-header", "554 5.6.0 Message contains invalid header", CONTENT, BOUNCE,
     False),
    ("unknown-5xx", "554 5.0.0 Transaction failed", UNKNOWN, BOUNCE, False),
    # RFC 5321 4.2.3's example text for 550 also names policy: not proof the user is gone
    ("rfc5321-550-example-text",
     ("550 Requested action not taken: mailbox unavailable (e.g., mailbox not found, no "
      "access, or command rejected for policy reasons)"), BLOCK, BOUNCE, False),

    # --- delivered
    ("gmail-250", "250 2.0.0 OK  1700000000 xxxx - gsmtp", DELIVERED, SENT, False),
    ("o365-250", ("250 2.6.0 <m1@example.com> [InternalId=000000000000] Queued mail for "
                  "delivery"), DELIVERED, SENT, False),
    ("yahoo-250", "250 ok dirdel", DELIVERED, SENT, False),
]


# The relay's own outcomes, made from its reply catalogue (relay/replies.py).
CATALOGUE: list[tuple[str, SmtpReply, Category, Action]] = [
    ("needs-smtputf8", from_catalogue(replies.R550_NEEDS_SMTPUTF8), RELAY, BOUNCE),
    ("needs-8bitmime", from_catalogue(replies.R554_NEEDS_8BITMIME), RELAY, BOUNCE),
    ("next-hop-size", from_catalogue(replies.R552_NEXT_HOP_SIZE, limit="10240"), RELAY, BOUNCE),
    ("auth-failed", from_catalogue(replies.R451_AUTH_FAILED, detail=(
        "SMTPAuthenticationError: (535, '5.7.8 Error: authentication failed')")), RELAY, DEFER),
    ("tls-failed", from_catalogue(replies.R451_TLS_FAILED, detail="SSLError: bad cert"),
     RELAY, DEFER),
    ("delivery-error", from_catalogue(replies.R451_DELIVERY_ERROR, detail="KeyError"),
     RELAY, DEFER),
    ("connect-refused", from_catalogue(replies.R451_CONNECT_FAILED, detail=(
        "ConnectionRefusedError: [Errno 111] Connect call failed ('192.0.2.7', 25)")),
     UNKNOWN, DEFER),
    ("connection-lost", from_catalogue(replies.R451_CONNECTION_LOST,
                                       detail="SMTPServerDisconnected: policy"), UNKNOWN, DEFER),
    ("timeout", from_catalogue(replies.R451_TIMEOUT, detail="SMTPTimeoutError: denied"),
     UNKNOWN, DEFER),
]


@pytest.mark.parametrize(("raw", "category", "action", "suppress"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_real_world_replies(raw: str, category: Category, action: Action,
                            suppress: bool) -> None:
    verdict = classify(wire(raw))
    assert (verdict.category, verdict.action, verdict.suppress) == (category, action, suppress)
    # Only hard suppresses (invariant 5); only rate-limited slows the destination down.
    assert verdict.throttle is (category is RATE)


@pytest.mark.parametrize(("reply", "category", "action"),
                         [row[1:] for row in CATALOGUE], ids=[row[0] for row in CATALOGUE])
def test_the_relays_own_outcomes(reply: SmtpReply, category: Category, action: Action) -> None:
    verdict = classify(reply)
    assert (verdict.category, verdict.action, verdict.suppress) == (category, action, False)


def test_the_table_is_large_and_from_many_providers() -> None:
    providers = {row[0].split("-")[0] for row in TABLE if not row[0].startswith("case")}
    assert len(TABLE) >= 60 + 11
    assert {"gmail", "outlook", "o365", "yahoo", "aol", "icloud", "gmx", "webde", "orange",
            "comcast", "proton", "mimecast", "proofpoint", "barracuda"} <= providers


def test_every_shipped_rule_is_exercised_by_a_row() -> None:
    used = {classify(wire(row[1])).rule for row in TABLE}
    used |= {classify(row[1]).rule for row in CATALOGUE}
    shipped = {rule.origin for rule in Rules.default()}
    assert shipped - used == set()
    assert DEFAULT_RULE in used      # and the fallback, for a reply no rule matches


def test_the_rule_numbers_in_the_shipped_file_are_right() -> None:
    """The "# N" beside each [[rule]] is what Verdict.rule says ("shipped#N")."""
    numbers = re.findall(r"^\[\[rule\]\]\s*#\s*(\d+)", SHIPPED_FILE.read_text(), re.MULTILINE)
    assert [int(n) for n in numbers] == list(range(1, len(Rules.default()) + 1))
    assert [r.origin for r in Rules.default()] == [
        f"{SHIPPED_LABEL}#{n}" for n in range(1, len(numbers) + 1)]


def test_the_shipped_rules_are_read_once() -> None:
    assert Rules.default() is Rules.default()
    assert Rules.load() is Rules.default()


def test_a_multi_line_reply_is_one_reply_with_the_last_lines_enhanced_code() -> None:
    reply = wire(TABLE[0][1])
    assert reply == SmtpReply(550, "5.7.1", "[192.0.2.10] Message refused: content scored as "
                              "probable bulk spam. Details: https://support.example.net/"
                              "unsolicited")


def test_a_longer_enhanced_code_on_a_line_is_not_cut() -> None:
    assert parse_reply(550, "5.1.10 a\n5.1.1 b") == SmtpReply(550, "5.1.1", "5.1.10 a b")


@pytest.mark.parametrize(("category", "code", "expected"), [
    (HARD, 550, Verdict(HARD, BOUNCE, suppress=True)),
    (SOFT, 552, Verdict(SOFT, DEFER)),
    (SOFT, 452, Verdict(SOFT, DEFER)),
    (RATE, 554, Verdict(RATE, DEFER, throttle=True)),
    (RATE, 421, Verdict(RATE, DEFER, throttle=True)),
    (BLOCK, 550, Verdict(BLOCK, BOUNCE)),
    (BLOCK, 450, Verdict(BLOCK, DEFER)),
    (CONTENT, 554, Verdict(CONTENT, BOUNCE)),
    (CONTENT, 451, Verdict(CONTENT, DEFER)),
    (RELAY, 535, Verdict(RELAY, BOUNCE)),
    (RELAY, 454, Verdict(RELAY, DEFER)),
    (UNKNOWN, 554, Verdict(UNKNOWN, BOUNCE)),
    (UNKNOWN, 451, Verdict(UNKNOWN, DEFER)),
])
def test_what_each_category_does(category: Category, code: int, expected: Verdict) -> None:
    assert verdict_for(category, code) == expected


# --- admin rules ------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_admin_rules_are_tried_before_the_shipped_ones(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[rule]]
category = "rate-limited"
code = 550
enhanced = "5.1.1"
text = 'smtp\\.example\\.net.*quota'

[[rule]]
category = "hard"
code = ["55x"]
text = 'gone fishing'
""")
    rules = Rules.load(path)
    assert len(rules) == 2 + len(Rules.default())
    quota = SmtpReply(550, "5.1.1", "smtp.example.net: monthly quota used up")
    assert classify(quota) == Verdict(HARD, BOUNCE, suppress=True, rule="shipped#9")
    assert classify(quota, rules) == Verdict(RATE, DEFER, throttle=True, rule=f"{path}#1")
    gone = SmtpReply(553, None, "Gone fishing")
    assert classify(gone).category is UNKNOWN
    assert classify(gone, rules) == Verdict(HARD, BOUNCE, suppress=True, rule=f"{path}#2")
    # what the admin's rules do not match falls through to the shipped ones
    assert classify(wire("552 5.2.2 Mailbox full"), rules).rule == "shipped#13"


def test_only_an_admins_rules(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\ncategory = "content"\ntext = "spam"\n')
    rules = Rules.read(path)
    assert [r.origin for r in rules] == [f"{path}#1"]
    assert classify(SmtpReply(550, "5.1.1", "unknown"), rules) == Verdict(
        UNKNOWN, BOUNCE, rule=DEFAULT_RULE)
    assert classify(SmtpReply(250, "2.0.0", "ok"), rules) == Verdict(DELIVERED, SENT)


def test_a_hard_rule_never_matches_a_transient_reply(tmp_path: Path) -> None:
    rules = Rules.read(write(tmp_path, '[[rule]]\ncategory = "hard"\ntext = "unknown"\n'))
    assert classify(SmtpReply(450, "4.1.1", "user unknown"), rules).suppress is False
    assert classify(SmtpReply(450, "4.1.1", "user unknown"), rules).rule == DEFAULT_RULE
    assert classify(SmtpReply(550, "5.1.1", "user unknown"), rules).suppress is True


@pytest.mark.parametrize(("code", "matches"), [
    ("550", {550}), ("55x", {550, 552, 554}), ("5xx", {500, 550, 552, 554}),
    ("4xx", {421, 450}), ("45x", {450}),
])
def test_code_patterns(tmp_path: Path, code: str, matches: set[int]) -> None:
    rules = Rules.read(write(tmp_path, f'[[rule]]\ncategory = "block"\ncode = "{code}"\n'))
    got = {c for c in (421, 450, 500, 550, 552, 554)
           if classify(SmtpReply(c, None, "x"), rules).rule != DEFAULT_RULE}
    assert got == matches


def test_enhanced_matches_the_whole_code_and_empty_means_none(tmp_path: Path) -> None:
    rules = Rules.read(write(tmp_path, """
[[rule]]
category = "block"
enhanced = "5.1.1"
[[rule]]
category = "content"
enhanced = ''
"""))
    assert classify(SmtpReply(550, "5.1.1", "x"), rules).category is BLOCK
    assert classify(SmtpReply(550, "5.1.10", "x"), rules).category is UNKNOWN
    assert classify(SmtpReply(550, None, "x"), rules).category is CONTENT


def test_the_admin_example_in_conf_loads_and_overrides() -> None:
    rules = Rules.load(ADMIN_EXAMPLE)
    example = SmtpReply(550, "5.1.1", "smtp.example.net: your plan's quota is used up")
    assert classify(example, rules).category is RATE
    assert classify(example).category is HARD
    assert classify(SmtpReply(550, None, "mx.example.org: mailbox unavailable"),
                    rules).category is SOFT


@pytest.mark.parametrize(("text", "where"), [
    ("[[rule]\ncategory = 'hard'\n", "not valid TOML"),
    ("[rules]\nx = 1\n", "unknown key 'rules'"),
    ("rule = [1]\n", "rule 1: must be a table"),
    ("rule = 'x'\n", "'rule' must be an array of tables"),
    ("[[rule]]\ncategory = 'hard'\ntext = 'x'\n[[rule]]\ncategory = 'hard'\nstatus = 550\n",
     "rule 2: unknown key 'status'"),
    ("[[rule]]\ntext = 'x'\n", "rule 1: key 'category' is missing"),
    ("[[rule]]\ncategory = 'hrad'\ntext = 'x'\n", "rule 1: key 'category': 'hrad'"),
    ("[[rule]]\ncategory = 'delivered'\ntext = 'x'\n", "rule 1: key 'category'"),
    ("[[rule]]\ncategory = 'block'\n", "rule 1: needs at least one of"),
    ("[[rule]]\ncategory = 'block'\ncode = 600\n", "rule 1: key 'code': 600"),
    ("[[rule]]\ncategory = 'block'\ncode = '2xx'\n", "rule 1: key 'code': '2xx'"),
    ("[[rule]]\ncategory = 'block'\ncode = '5x'\n", "rule 1: key 'code': '5x'"),
    ("[[rule]]\ncategory = 'block'\ncode = true\n", "rule 1: key 'code': True"),
    ("[[rule]]\ncategory = 'block'\ncode = []\n", "rule 1: key 'code': the list is empty"),
    ("[[rule]]\ncategory = 'block'\ntext = 'a(b'\n", "rule 1: key 'text': bad regular"),
    ("[[rule]]\ncategory = 'block'\ntext = ''\n", "rule 1: key 'text': must be a non-empty"),
    ("[[rule]]\ncategory = 'block'\ntext = 5\n", "rule 1: key 'text': must be a non-empty"),
    ("[[rule]]\ncategory = 'block'\nenhanced = '5.[1'\n", "rule 1: key 'enhanced': bad"),
    ("[[rule]]\ncategory = 'block'\ntext = 'x'\nnote = 1\n", "rule 1: key 'note'"),
])
def test_a_bad_rules_file_names_the_file_rule_and_key(tmp_path: Path, text: str,
                                                      where: str) -> None:
    path = write(tmp_path, text, "bad_rules.toml")
    with pytest.raises(RulesError) as info:
        Rules.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert where in message


def test_a_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules"):
        Rules.load(tmp_path / "absent.toml")
