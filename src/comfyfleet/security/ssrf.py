"""SSRF decisions: which URLs, host names and addresses comfyfleet may reach on a user's behalf.

Everything a tenant hands us as a URL (``media.url`` / assets from-url, ``webhook_url``) is judged
here. The module is pure decision logic; its only I/O is the injectable ``Resolver``. The transport
in ``guarded_http`` calls ``check_request_url`` for every request (every redirect hop is a request)
and ``vet_host`` at connect time, then connects to one of the addresses ``vet_host`` returned, so
the address that was checked is the address that is used.

Error tree (both map to 422 through the API's single error handler)::

    ValidationFailed (422)
     ├── UrlNotAllowed   url_not_allowed   policy refuses the URL, an address it resolves to,
     │                                     or a redirect target
     └── UrlFetchFailed  url_fetch_failed  DNS / connect / TLS failure, timeout, too large,
                                           bad content type, HTTP status the caller cannot use
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Protocol

import httpx

from comfyfleet.errors import ValidationFailed

__all__ = [
    "IPAddress",
    "Resolver",
    "SystemResolver",
    "UrlFetchFailed",
    "UrlNotAllowed",
    "UrlPolicy",
    "address_refusal",
    "check_request_url",
    "check_url",
    "parse_ip_literal",
    "vet_host",
]

IPAddress = IPv4Address | IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlNotAllowed(ValidationFailed):
    """The URL, an address it resolves to, or a redirect target is refused by policy."""

    code = "url_not_allowed"

    def __init__(self, reason: str) -> None:
        # The URL itself is not echoed: tenants put tokens in query strings.
        super().__init__(f"URL not allowed: {reason}", details={"reason": reason})
        self.reason = reason


class UrlFetchFailed(ValidationFailed):
    """The URL was allowed but fetching it did not produce a usable answer."""

    code = "url_fetch_failed"

    def __init__(self, reason: str) -> None:
        super().__init__(f"URL fetch failed: {reason}", details={"reason": reason})
        self.reason = reason


class Resolver(Protocol):
    """Turns a host name into IP address strings. Injectable so tests never touch real DNS."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The operating system's resolver through ``loop.getaddrinfo`` (runs in the default executor)."""

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses: list[str] = []
        for family, _type, _proto, _canonname, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                address = str(sockaddr[0])
                if address not in addresses:
                    addresses.append(address)
        return addresses


def _url_host(url: httpx.URL) -> str:
    """The host exactly as it goes on the wire: IDNA-encoded, lower-case, IPv6 without brackets."""
    return url.raw_host.decode("ascii")


def _ascii_host(name: str) -> str:
    """Lower-case, IDNA-encoded, without trailing dots: the form request hosts are compared in.

    Uses httpx's own URL parser so an allowlist entry is encoded exactly like a request's host.
    """
    try:
        host = _url_host(httpx.URL(f"http://{name.strip().strip('.')}/"))
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a valid domain name: {name!r}") from exc
    host = host.rstrip(".")
    if not host:
        raise ValueError(f"not a valid domain name: {name!r}")
    return host


def _normalise_domains(domains: Iterable[str]) -> frozenset[str]:
    # "*.example.com" and ".example.com" read naturally in settings; both mean the suffix match.
    return frozenset(_ascii_host(d.strip().removeprefix("*.").lstrip(".")) for d in domains)


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """What user-supplied URLs may point at. Build one from settings; narrow it per tenant.

    ``allowed_domains`` (deployment) and ``tenant_allowed_domains`` are suffix matches on whole
    labels; an empty set means "any public host". When both are set a host must match both, so a
    tenant can narrow the deployment's list but never widen it.

    ``allow_loopback`` lets tests talk to a server on 127.0.0.1 / ::1. Settings refuse it outside
    the dev and test environments; nothing here second-guesses that.
    """

    allowed_ports: frozenset[int] = frozenset({80, 443})
    allowed_domains: frozenset[str] = field(default_factory=frozenset)
    tenant_allowed_domains: frozenset[str] = field(default_factory=frozenset)
    allow_loopback: bool = False

    def __post_init__(self) -> None:
        for port in self.allowed_ports:
            if not 0 < port < 65536:
                raise ValueError(f"not a TCP port: {port}")
        # Frozen dataclass: normalising in place is the documented way via object.__setattr__.
        object.__setattr__(self, "allowed_ports", frozenset(self.allowed_ports))
        object.__setattr__(self, "allowed_domains", _normalise_domains(self.allowed_domains))
        object.__setattr__(self, "tenant_allowed_domains", _normalise_domains(self.tenant_allowed_domains))

    def with_tenant_allowlist(self, domains: Iterable[str]) -> UrlPolicy:
        return replace(self, tenant_allowed_domains=frozenset(domains))


# --- addresses ----------------------------------------------------------------------------------

# Cloud instance-metadata endpoints, named explicitly so the refusal says what they are. Most sit
# in ranges refused anyway; Azure's wireserver (168.63.129.16) is a public address and would not.
_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS VPC DNS
        "168.63.129.16",  # Azure wireserver
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS VPC DNS over IPv6
    )
)


def _v4(cidr: str, reason: str) -> tuple[IPv4Network, str]:
    network = ip_network(cidr)
    assert isinstance(network, IPv4Network)
    return network, reason


def _v6(cidr: str, reason: str) -> tuple[IPv6Network, str]:
    network = ip_network(cidr)
    assert isinstance(network, IPv6Network)
    return network, reason


# Explicit tables rather than ipaddress.is_global / is_private: their answers changed between
# Python patch releases, and they call multicast, NAT64 and CGNAT-adjacent ranges "global".
_IPV4_REFUSED = (
    _v4("0.0.0.0/8", "unspecified ('this network')"),
    _v4("10.0.0.0/8", "private"),
    _v4("100.64.0.0/10", "shared address space (CGNAT)"),
    _v4("127.0.0.0/8", "loopback"),
    _v4("169.254.0.0/16", "link-local"),
    _v4("172.16.0.0/12", "private"),
    _v4("192.0.0.0/24", "IETF protocol assignments"),
    _v4("192.0.2.0/24", "documentation"),
    _v4("192.88.99.0/24", "6to4 relay anycast"),
    _v4("192.168.0.0/16", "private"),
    _v4("198.18.0.0/15", "benchmarking"),
    _v4("198.51.100.0/24", "documentation"),
    _v4("203.0.113.0/24", "documentation"),
    _v4("224.0.0.0/4", "multicast"),
    _v4("240.0.0.0/4", "reserved"),  # includes the 255.255.255.255 broadcast address
)

# Order matters: the first match names the reason, so specific ranges precede the ranges that
# contain them (::1 before ::/96, 2001::/32 before 2001::/23).
_IPV6_REFUSED = (
    _v6("::/128", "unspecified"),
    _v6("::1/128", "loopback"),
    _v6("::ffff:0:0/96", "IPv4-mapped IPv6"),
    _v6("::ffff:0:0:0/96", "IPv4-translated IPv6"),
    _v6("::/96", "IPv4-compatible IPv6"),
    _v6("100::/64", "discard-only"),
    _v6("2001::/32", "Teredo tunnel"),
    _v6("2001:2::/48", "benchmarking"),
    _v6("2001:db8::/32", "documentation"),
    _v6("2001::/23", "IETF protocol assignments"),
    _v6("2002::/16", "6to4 tunnel"),
    _v6("3fff::/20", "documentation"),
    _v6("fc00::/7", "unique local (ULA)"),
    _v6("fe80::/10", "link-local"),
    _v6("fec0::/10", "site-local"),
    _v6("ff00::/8", "multicast"),
)

_NAT64_WELL_KNOWN = ip_network("64:ff9b::/96")
_NAT64_LOCAL_USE = ip_network("64:ff9b:1::/48")
_GLOBAL_UNICAST = ip_network("2000::/3")
_LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))


def _bits(value: int, start: int, length: int) -> int:
    """``length`` bits of a 128-bit integer starting ``start`` bits from the most significant end."""
    return (value >> (128 - start - length)) & ((1 << length) - 1)


def _local_use_nat64_candidates(address: IPv6Address) -> list[IPv4Address]:
    # Where the IPv4 address sits in 64:ff9b:1::/48 depends on the operator's prefix length
    # (RFC 6052 section 2.2: /48, /56, /64 or /96, skipping bits 64-71). We cannot know which one
    # the translator uses, so every possible reading has to be acceptable.
    value = int(address)
    return [
        IPv4Address((_bits(value, 48, 16) << 16) | _bits(value, 72, 16)),
        IPv4Address((_bits(value, 56, 8) << 24) | _bits(value, 72, 24)),
        IPv4Address(_bits(value, 72, 32)),
        IPv4Address(_bits(value, 96, 32)),
    ]


def address_refusal(address: IPAddress, policy: UrlPolicy) -> str | None:
    """Why ``address`` must not be connected to, or ``None`` when it is a public address."""
    if policy.allow_loopback and any(address in net for net in _LOOPBACK):
        return None
    if address in _METADATA_ADDRESSES:
        return f"{address} is a cloud metadata endpoint"
    if isinstance(address, IPv4Address):
        for network4, reason in _IPV4_REFUSED:
            if address in network4:
                return f"{address} is {reason}"
        return None
    if address.scope_id:
        return f"{address} is a scoped (interface-bound) address"
    if address in _NAT64_WELL_KNOWN:
        embedded = IPv4Address(int(address) & 0xFFFFFFFF)
        inner = address_refusal(embedded, replace(policy, allow_loopback=False))
        return None if inner is None else f"{address} is NAT64 for a refused address ({inner})"
    if address in _NAT64_LOCAL_USE:
        for candidate in _local_use_nat64_candidates(address):
            inner = address_refusal(candidate, replace(policy, allow_loopback=False))
            if inner is not None:
                return f"{address} is local-use NAT64 that may embed a refused address ({inner})"
        return None
    for network6, reason in _IPV6_REFUSED:
        if address in network6:
            return f"{address} is {reason}"
    if address not in _GLOBAL_UNICAST:
        return f"{address} is outside global unicast space"
    return None


_IPV4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


def _parse_ipv4_number(part: str) -> int | None:
    if not _IPV4_PART.match(part):
        return None
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part[0] == "0":
        return int(part, 8)
    return int(part)


def _parse_loose_ipv4(host: str) -> IPv4Address | None:
    """inet_aton's reading of ``host``: decimal, octal (0...), hex (0x...), 1 to 4 parts.

    The system resolver accepts these spellings (``2130706433``, ``0x7f000001``, ``127.1``) and
    returns the address without any DNS query, so they must be judged as the address they are.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    *leading, last = values
    if any(v > 255 for v in leading) or last >= 1 << (8 * (5 - len(values))):
        return None
    value = last
    for index, byte in enumerate(leading):
        value |= byte << (24 - 8 * index)
    return IPv4Address(value)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host denotes by itself (no DNS), or ``None`` for a name."""
    host = host.strip("[]").rstrip(".")
    if ":" in host:
        try:
            address = ip_address(host)
        except ValueError:
            return None
        assert isinstance(address, IPv6Address)
        return address
    return _parse_loose_ipv4(host)


# --- names --------------------------------------------------------------------------------------

# Names of metadata services, refused before any DNS query is sent for them.
_METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
    }
)
# Special-use suffixes that never name a public host (RFC 6761, RFC 8375, ICANN's .internal).
_PRIVATE_SUFFIXES = frozenset({"localhost", "local", "internal", "home.arpa", "localdomain"})


def _matches(host: str, domains: frozenset[str]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def _name_refusal(name: str, policy: UrlPolicy) -> str | None:
    if policy.allow_loopback and (name == "localhost" or name.endswith(".localhost")):
        return None
    if name in _METADATA_NAMES:
        return f"{name} is a cloud metadata host"
    if _matches(name, _PRIVATE_SUFFIXES):
        return f"{name} is a special-use (non-public) name"
    if "." not in name:
        # Single labels resolve through search domains to whatever is internal to this network.
        return f"{name} is a single-label (internal) host name"
    return None


def _allowlist_refusal(host: str, literal: IPAddress | None, policy: UrlPolicy) -> str | None:
    for domains, scope in ((policy.allowed_domains, "deployment"), (policy.tenant_allowed_domains, "tenant")):
        if not domains:
            continue
        if literal is not None:
            return f"the {scope} allowlist admits host names only, not {literal}"
        if not _matches(host, domains):
            return f"{host} is not on the {scope} allowlist"
    return None


def _host_refusal(host: str, policy: UrlPolicy) -> str | None:
    """Judges the host as written, before any DNS: literal addresses, names, the allowlist."""
    if not host:
        return "the URL has no host"
    literal = parse_ip_literal(host)
    name = host.strip("[]").rstrip(".").lower()
    refusal = address_refusal(literal, policy) if literal is not None else _name_refusal(name, policy)
    return refusal or _allowlist_refusal(name, literal, policy)


def check_request_url(url: httpx.URL, policy: UrlPolicy) -> None:
    """Everything decidable from the URL alone. Raises ``UrlNotAllowed``."""
    if url.scheme not in DEFAULT_PORTS:
        raise UrlNotAllowed(f"scheme {url.scheme or '(none)'!r} is not http or https")
    if url.userinfo:
        raise UrlNotAllowed("credentials in the URL (user:password@) are not allowed")
    port = url.port or DEFAULT_PORTS[url.scheme]
    if port not in policy.allowed_ports:
        raise UrlNotAllowed(f"port {port} is not allowed")
    refusal = _host_refusal(_url_host(url), policy)
    if refusal is not None:
        raise UrlNotAllowed(refusal)


# --- resolution ---------------------------------------------------------------------------------


async def _resolve(host: str, port: int, resolver: Resolver, timeout: float | None) -> list[str]:
    try:
        async with asyncio.timeout(timeout):
            answers = await resolver.resolve(host, port)
    except TimeoutError as exc:
        raise UrlFetchFailed(f"resolving {host} timed out") from exc
    except OSError as exc:  # socket.gaierror and friends
        raise UrlFetchFailed(f"{host} does not resolve") from exc
    if not answers:
        raise UrlFetchFailed(f"{host} has no addresses")
    return answers


async def vet_host(
    host: str, port: int, policy: UrlPolicy, resolver: Resolver, *, timeout: float | None = None
) -> list[str]:
    """Resolve ``host`` once and return its addresses if every one of them is allowed.

    One refused address refuses the host: an attacker controls the order of DNS answers, and
    connection fallback would otherwise reach the private one.
    """
    if port not in policy.allowed_ports:
        raise UrlNotAllowed(f"port {port} is not allowed")
    refusal = _host_refusal(host, policy)
    if refusal is not None:
        raise UrlNotAllowed(refusal)
    literal = parse_ip_literal(host)
    if literal is not None:
        return [str(literal)]
    vetted: list[str] = []
    for answer in await _resolve(host.rstrip("."), port, resolver, timeout):
        try:
            address = ip_address(answer)
        except ValueError as exc:
            raise UrlNotAllowed(f"{host} resolved to something that is not an address") from exc
        refusal = address_refusal(address, policy)
        if refusal is not None:
            raise UrlNotAllowed(f"{host} resolves to a refused address: {refusal}")
        vetted.append(str(address))
    return vetted


async def check_url(
    url: str, policy: UrlPolicy, resolver: Resolver | None = None, *, timeout: float = 5.0
) -> list[str]:
    """Submit-time check of a user-supplied URL; returns the vetted addresses.

    Raises ``UrlNotAllowed`` when policy refuses it and ``UrlFetchFailed`` when the host does not
    resolve. Passing here proves nothing about later fetches (DNS may change): the guarded client
    checks again at connect time and connects only to what it checked.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UrlNotAllowed("not a valid URL") from exc
    check_request_url(parsed, policy)
    port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    return await vet_host(_url_host(parsed), port, policy, resolver or SystemResolver(), timeout=timeout)
