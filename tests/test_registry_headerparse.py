"""Response headers parsed without the email package give what http.client's parser gives:
the same names and values in order, the same defects, the same body left unread."""

from __future__ import annotations

import email.parser
import http.client
import io
import random

import pytest

from pipeline.registry import headerparse


def _stdlib(data: bytes) -> tuple[http.client.HTTPMessage, bytes]:
    """http.client.parse_headers as Python ships it (its own two steps), and what is left."""
    fp = io.BytesIO(data)
    lines = http.client._read_headers(fp)  # type: ignore[attr-defined]
    msg = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(
        b"".join(lines).decode("iso-8859-1"))
    return msg, fp.read()


def _ours(data: bytes) -> tuple[http.client.HTTPMessage, bytes]:
    fp = io.BytesIO(data)
    return headerparse.parse_headers(fp), fp.read()


def _seen(msg: http.client.HTTPMessage) -> tuple[object, ...]:
    """What urllib3 and the client read of a header block (a message/* type's body: the
    parts the parser made of it)."""
    payload = msg.get_payload()
    if isinstance(payload, list):
        payload = [_seen(part) for part in payload]
    return (msg.items(), [type(d).__name__ for d in msg.defects], payload,
            msg.is_multipart(), msg.get_content_type(), msg.get_all("Content-Type"))


BLOCKS = [
    # what registries send
    b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
    b"Docker-Content-Digest: sha256:" + b"ab" * 32 + b"\r\n"
    b"Docker-Distribution-API-Version: registry/2.0\r\nContent-Length: 1041\r\n"
    b"Date: Sat, 05 Dec 2026 09:00:00 GMT\r\nEtag: \"sha256:ab\"\r\n\r\n{\"body\": 1}",
    b"Content-Length: 0\r\n\r\n",
    b"\r\n",
    b"",  # the server closed before the blank line
    b"Content-Length: 3\n\nabc",  # bare LF line ends
    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Empty:\r\nX-Spaces: \t padded \t \r\n\r\n",
    b"Www-Authenticate: Bearer realm=\"https://auth.example/token\",service=\"r\"\r\n\r\n",
    b"X-Latin: caf\xe9 \xff\r\nX-Colon: a:b:c\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n",
    # what the email parser treats otherwise: folded lines, no name, a bare CR, a body
    b"X-Folded: one\r\n two\r\n\tthree\r\nContent-Length: 0\r\n\r\n",
    b" leading: space\r\nContent-Length: 0\r\n\r\n",
    b"Content-Length: 0\r\nno colon here\r\nX-After: 1\r\n\r\n",
    b"Bad Name: 1\r\nContent-Length: 0\r\n\r\n",
    b": empty name\r\nContent-Length: 0\r\n\r\n",
    b"X-CR: a\rb\r\nContent-Length: 0\r\n\r\n",
    b"From nobody Sat Dec  5 09:00:00 2026\r\nX-A: 1\r\n\r\n",
    b"X-Ctl: \x01\x7f\r\n\r\n",
]


@pytest.mark.parametrize("block", BLOCKS, ids=range(len(BLOCKS)))
def test_a_header_block_parses_as_the_stdlib_parses_it(block: bytes) -> None:
    mine, rest = _ours(block)
    theirs, their_rest = _stdlib(block)
    assert (_seen(mine), rest) == (_seen(theirs), their_rest)
    assert type(mine) is http.client.HTTPMessage


def test_random_header_blocks_parse_as_the_stdlib_parses_them() -> None:
    rng = random.Random(16)
    pieces = [b"Content-Length", b"X-A", b":", b": ", b" ", b"\t", b"\r", b"\n", b"\r\n",
              b"v", b"1", b"\xe9", b"From ", b"a b", b"\x00", b";=,\"", b"Content-Type",
              b"multipart/mixed", b"Message/rfc822", b"text/plain", b"boundary=x"]
    for _ in range(3000):
        lines = [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) + b"\r\n"
                 for _ in range(rng.randint(0, 5))]
        block = b"".join(lines) + b"\r\nBODY"
        mine, rest = _ours(block)
        theirs, their_rest = _stdlib(block)
        assert (_seen(mine), rest) == (_seen(theirs), their_rest), block


def test_the_limits_of_http_client_still_hold() -> None:
    with pytest.raises(http.client.LineTooLong):
        headerparse.parse_headers(io.BytesIO(b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n"))
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
        headerparse.parse_headers(io.BytesIO(many))


def test_the_registry_client_reads_answers_with_it() -> None:
    import pipeline.registry.client  # noqa: F401  (installs it)

    assert http.client.parse_headers is headerparse.parse_headers
