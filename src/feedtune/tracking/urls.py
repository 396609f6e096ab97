"""URLs safe to print: a storage or tracking URL without its password."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters that carry credentials in database and server URLs.
_SECRET_QUERY_KEYS = {"password", "passwd", "pwd", "secret", "token", "access_token", "sslpassword"}


def redact(url: str) -> str:
    """``url`` without its password (in the user-info part or a query parameter), safe to
    print, log and show in the UI."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*/:"
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # urlunsplit would drop the empty host of sqlite:///...
    return urlunsplit(parts._replace(netloc=netloc, query=query))
