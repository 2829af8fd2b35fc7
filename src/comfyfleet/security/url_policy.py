"""The SSRF policy for a tenant's URLs, built from settings in one place: the deployment's
allowlist and ports, narrowed by the tenant's own allowlist."""

from __future__ import annotations

from comfyfleet.config import Settings
from comfyfleet.security.ssrf import UrlPolicy


def url_policy(settings: Settings, tenant_domains: list[str] | None) -> UrlPolicy:
    policy = UrlPolicy(
        allowed_ports=frozenset(settings.url_allowed_ports),
        allowed_domains=frozenset(settings.url_allowed_domains or ()),
        allow_loopback=settings.allow_loopback_urls,
    )
    return policy.with_tenant_allowlist(tenant_domains or ())
