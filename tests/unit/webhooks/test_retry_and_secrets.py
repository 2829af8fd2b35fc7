"""The retry schedule, Retry-After parsing, and secret handling, without a database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from standardwebhooks import Webhook

from comfyfleet.config import Settings
from comfyfleet.webhooks import retry
from comfyfleet.webhooks.secrets import (
    SecretUnreadable,
    decrypt_secret,
    encrypt_secret,
    generate_secret,
    signature_header,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def test_the_schedule_is_jittered_within_bounds_and_ends() -> None:
    rng = random.Random(7)
    for attempts, base in enumerate(retry.SCHEDULE, start=1):
        delays = [retry.next_delay(attempts, rng) for _ in range(50)]
        assert all(d is not None and base * 0.9 <= d <= base * 1.1 for d in delays)
        assert len(set(delays)) > 1  # jittered, not fixed
    assert retry.next_delay(len(retry.SCHEDULE) + 1) is None
    assert retry.MAX_ATTEMPTS == 8


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", timedelta(seconds=120)),
        (" 0 ", timedelta(0)),
        ("99999999", retry.MAX_RETRY_AFTER),
        (format_datetime(NOW + timedelta(minutes=90), usegmt=True), timedelta(minutes=90)),
        (format_datetime(NOW - timedelta(minutes=5), usegmt=True), timedelta(0)),
        (format_datetime(NOW + timedelta(days=9), usegmt=True), retry.MAX_RETRY_AFTER),
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_as_seconds_or_date_bounded(header: str | None, expected: timedelta | None) -> None:
    assert retry.parse_retry_after(header, NOW) == expected


def test_retry_after_only_postpones() -> None:
    rng = random.Random(1)
    soon = retry.next_attempt_at(NOW, 1, timedelta(seconds=1), rng)
    assert soon is not None and soon - NOW >= retry.SCHEDULE[0] * 0.9
    later = retry.next_attempt_at(NOW, 1, timedelta(hours=1), rng)
    assert later == NOW + timedelta(hours=1)
    assert retry.next_attempt_at(NOW, retry.MAX_ATTEMPTS, timedelta(hours=1), rng) is None


def settings(key: str) -> Settings:
    return Settings(env="test", webhook_encryption_key=key)  # type: ignore[arg-type]


def test_secrets_round_trip_and_are_bound_to_their_row_and_key() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_") and len(Webhook(secret)._whsecret) == 32
    a = settings("test-webhook-key-one-0123456789abcdef")
    stored = encrypt_secret(a, secret, row_id="row-1")
    assert secret not in stored and stored != encrypt_secret(a, secret, row_id="row-1")  # fresh nonce
    assert decrypt_secret(a, stored, row_id="row-1") == secret
    with pytest.raises(SecretUnreadable):
        decrypt_secret(a, stored, row_id="row-2")
    with pytest.raises(SecretUnreadable):
        decrypt_secret(settings("test-webhook-key-two-0123456789abcdef"), stored, row_id="row-1")
    with pytest.raises(SecretUnreadable):
        decrypt_secret(a, "v0.garbage", row_id="row-1")


def test_the_signature_header_verifies_with_each_secret() -> None:
    old, new = generate_secret(), generate_secret()
    body = b'{"type":"job.succeeded"}'
    sent_at = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature_header([new, old], msg_id="msg_1", timestamp=sent_at, body=body),
    }
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
