"""detect-secrets plugins for the secrets this project issues, so a leaked one fails CI."""

from __future__ import annotations

import re

from detect_secrets.plugins.base import RegexBasedDetector


class ComfyfleetApiKeyDetector(RegexBasedDetector):
    """comfyfleet API keys: cf_<env>_<44+ base62 characters>."""

    secret_type = "comfyfleet API key"  # pragma: allowlist secret
    denylist = (re.compile(r"\bcf_(?:dev|test|prod)_[0-9A-Za-z]{44,}\b"),)


class StandardWebhookSecretDetector(RegexBasedDetector):
    """Standard Webhooks signing secrets: whsec_<base64>."""

    secret_type = "Standard Webhooks secret"  # pragma: allowlist secret
    denylist = (re.compile(r"\bwhsec_[A-Za-z0-9+/=]{20,}"),)
