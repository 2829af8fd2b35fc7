"""Webhook signing secrets: generated, encrypted at rest, and used to sign (Standard Webhooks).

A secret is ``whsec_`` + base64 of 32 random bytes, the format the Standard Webhooks libraries read.
It is shown to the tenant once (on create or rotate) and stored only as AES-256-GCM ciphertext under
a key derived (HKDF-SHA256) from ``settings.webhook_encryption_key``. The row id is the associated
data, so a ciphertext copied onto another endpoint's row does not decrypt there.

Signing uses the ``standardwebhooks`` package itself, so what we send is by construction what its
verifier accepts. During a rotation overlap the ``webhook-signature`` header carries one ``v1,``
signature per valid secret, separated by spaces; a receiver holding either secret verifies.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from standardwebhooks import Webhook

from comfyfleet.config import Settings

SECRET_PREFIX = "whsec_"  # pragma: allowlist secret (the format prefix, not a secret)
SECRET_BYTES = 32
_NONCE_BYTES = 12
_FORMAT = "v1"  # ciphertext format marker, so the scheme can change without guessing
_HKDF_INFO = b"comfyfleet/webhook-signing-secrets/v1"


class SecretUnreadable(Exception):
    """A stored secret does not decrypt: the encryption key changed, or the row was tampered with."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _cipher(settings: Settings) -> AESGCM:
    # HKDF rather than the raw setting: the setting is an arbitrary-length string, AES needs 32 bytes,
    # and a dedicated derivation keeps this key independent of any other use of the same setting.
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        settings.secret_bytes("webhook_encryption_key")
    )
    return AESGCM(key)


def encrypt_secret(settings: Settings, secret: str, *, row_id: str) -> str:
    nonce = os.urandom(_NONCE_BYTES)
    sealed = _cipher(settings).encrypt(nonce, secret.encode("utf-8"), row_id.encode("utf-8"))
    return f"{_FORMAT}.{base64.urlsafe_b64encode(nonce + sealed).decode('ascii')}"


def decrypt_secret(settings: Settings, stored: str, *, row_id: str) -> str:
    marker, _, encoded = stored.partition(".")
    if marker != _FORMAT:
        raise SecretUnreadable(f"unknown secret format {marker!r}")
    try:
        raw = base64.urlsafe_b64decode(encoded)
        plain = _cipher(settings).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], row_id.encode("utf-8"))
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise SecretUnreadable("the signing secret does not decrypt with the current encryption key") from exc
    return plain.decode("utf-8")


def signature_header(secrets_in_use: list[str], *, msg_id: str, timestamp: datetime, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<sig>`` for each secret, space-separated."""
    data = body.decode("utf-8")
    return " ".join(Webhook(s).sign(msg_id, timestamp, data) for s in secrets_in_use)
