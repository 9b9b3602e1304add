"""HTTP response headers parsed without the email package when they are plain.

http.client hands every response's header block to `email.parser` (a FeedParser and a
policy object per response): ~20 µs of pure Python each, uncontended. A fleet plan reads
12,000 small responses on one interpreter (bench S2), where that was a sixth of the
process's CPU under its 16 threads. `parse_headers` builds the same `HTTPMessage` directly
when every line is a plain `Name: value` line, as registries, S3 servers and proxies send
them; any other block (a folded line, a line with no name, a bare CR, a multipart
content type) goes to the email parser, as before, so urllib3 sees and reports the same
defects.

`install()` puts it in http.client's place for the whole process (urllib3's connections,
so the registry client's and boto3's, call http.client's module-level `parse_headers`);
it is installed only where http.client reads headers the way this module expects.
"""

from __future__ import annotations

import email.parser
import http.client
import re
from typing import BinaryIO

# One header line as email.feedparser reads it without a defect: its header-name
# characters (printable ASCII but the colon, at least one), a colon, a value with no CR
# or LF inside it (feedparser splits lines at a bare CR too), then the line's end.
_PLAIN = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r?\n")

_read_headers = getattr(http.client, "_read_headers", None)


def parse_headers(fp: BinaryIO, _class: type = http.client.HTTPMessage
                  ) -> http.client.HTTPMessage:
    """What `http.client.parse_headers(fp, _class)` returns, sooner for a plain block."""
    assert _read_headers is not None  # install() checked
    lines = _read_headers(fp)  # the same line and count limits; the last is the blank line
    fields = []
    for line in lines[:-1]:
        if not _PLAIN.fullmatch(line):
            return _email_parse(lines, _class)
        name, _, value = line.decode("iso-8859-1").partition(":")
        # compat32's header_source_parse: the value less leading blanks and the line end
        value = value.lstrip(" \t").rstrip("\r\n")
        if name.lower() == "content-type" and value.lower().startswith(
                ("multipart/", "message/")):
            return _email_parse(lines, _class)  # the parser looks for a body's parts
        fields.append((name, value))
    msg = _class()
    for name, value in fields:
        msg.set_raw(name, value)
    msg.set_payload("")  # the parser's empty body: nothing after the headers
    return msg


def _email_parse(lines: list[bytes], _class: type) -> http.client.HTTPMessage:
    """http.client's own way."""
    return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))


def install() -> None:
    """Use `parse_headers` for every response of this process (idempotent)."""
    if _read_headers is not None:
        http.client.parse_headers = parse_headers  # type: ignore[assignment]
