"""Helpers to compare what the downstream got with what the client sent."""

from __future__ import annotations


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(the relay's Received header, the rest) of what the downstream got."""
    assert data.startswith(b"Received: "), data[:80]
    lines = data.split(b"\r\n")
    end = next(i for i, line in enumerate(lines[1:], start=1)
               if not line.startswith((b" ", b"\t")))
    return b"\r\n".join(lines[:end]) + b"\r\n", b"\r\n".join(lines[end:])


def split_message(data: bytes) -> tuple[bytes, bytes | None]:
    """(header section with its last CRLF, body or None when there is no blank line)."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    head, sep, body = data.partition(b"\r\n\r\n")
    return (head + b"\r\n", body) if sep else (data, None)


def header_names(section: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode().lower() for line in section.split(b"\r\n")
            if line and not line.startswith((b" ", b"\t"))]


def assert_relayed(got: bytes, sent: bytes,
                   may_add: tuple[str, ...] = ("date", "message-id")) -> bytes:
    """The downstream got exactly what was sent, plus our Received header at the top and
    only headers named in `may_add` appended at the end of the header section; the body is
    byte-identical. Returns the appended header bytes."""
    _, rest = split_received(got)
    got_head, got_body = split_message(rest)
    sent_head, sent_body = split_message(sent)
    assert got_body == sent_body, "body changed"
    assert got_head.startswith(sent_head), "existing header lines changed or reordered"
    added = got_head[len(sent_head):]
    assert set(header_names(added)) <= set(may_add), f"unexpected added headers: {added!r}"
    return added
