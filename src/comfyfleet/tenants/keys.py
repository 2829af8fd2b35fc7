"""API keys: ``cf_<env>_<lookup><secret>``, shown once, stored as an HMAC-SHA256 digest.

The first 12 base62 characters after the ``cf_<env>_`` prefix are a lookup id (unique, indexed), the
rest is the secret part. Keys are random and high-entropy, so a keyed SHA-256 (pepper from settings) is
enough; a slow password hash would only cost latency. The recognisable prefix lets secret scanners
(detect-secrets in CI, GitHub's) spot a leaked key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

SCOPES = ("jobs:read", "jobs:write", "assets:read", "assets:write", "admin")
DEFAULT_SCOPES = ("jobs:read", "jobs:write", "assets:read", "assets:write")

_BASE62 = string.digits + string.ascii_letters
LOOKUP_LENGTH = 12
SECRET_LENGTH = 32
KEY_PATTERN = re.compile(rf"^cf_(dev|test|prod)_([0-9A-Za-z]{{{LOOKUP_LENGTH + SECRET_LENGTH},}})$")


@dataclass(frozen=True)
class NewKey:
    plaintext: str
    lookup: str
    digest: str


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def generate_key(env: str, pepper: bytes) -> NewKey:
    lookup = _random_base62(LOOKUP_LENGTH)
    plaintext = f"cf_{env}_{lookup}{_random_base62(SECRET_LENGTH)}"
    return NewKey(plaintext=plaintext, lookup=lookup, digest=digest_key(plaintext, pepper))


def digest_key(plaintext: str, pepper: bytes) -> str:
    return hmac.new(pepper, plaintext.encode(), hashlib.sha256).hexdigest()


def parse_lookup(plaintext: str) -> str | None:
    """The lookup id of a well-formed key, or None: malformed keys never reach the database."""
    match = KEY_PATTERN.match(plaintext)
    return match.group(2)[:LOOKUP_LENGTH] if match else None


def digests_match(plaintext: str, stored_digest: str, pepper: bytes) -> bool:
    return hmac.compare_digest(digest_key(plaintext, pepper), stored_digest)


def validate_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    return sorted(set(scopes))
