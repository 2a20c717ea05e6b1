"""PII redaction: replace emails, phone numbers, IP addresses, card numbers and IBANs
with placeholders.

A model memorises what it sees often enough, including the contact details on a web
page. FineWeb anonymises emails and public IP addresses as its last step; lmforge does
the same and adds phone numbers, payment-card numbers and IBANs. Each kind is a pattern
that finds candidates plus, where the format has one, a check that rejects
look-alikes:

- **email**: ``local@domain.tld``.
- **ip**: IPv4 and IPv6, validated by Python's ``ipaddress``; only *globally routable*
  addresses are redacted by default: ``127.0.0.1``, ``192.168.0.1`` or the
  documentation ranges identify nobody and are common in technical text. Dotted quads
  that number sections or versions (``Section 1.3.2.1``, a heading ``6.1.2.1. Security``)
  are left alone.
- **credit_card**: 13-19 digits, optionally grouped by spaces or dashes, starting like a
  real card (Visa 4, Mastercard 51-55/2221-2720, Amex 34/37, Discover 6011/65, JCB 35,
  Diners 30/36/38) and passing the Luhn checksum, which rejects 90% of random numbers.
- **iban**: country code, two check digits, up to 30 letters/digits, passing ISO 13616's
  mod-97 check.
- **phone**: an international number (``+`` and 8-15 digits, groups allowed) or a
  North-American one (``(555) 123-4567``, ``555-123-4567``). Bare digit runs are left
  alone: they are far more often years, prices or ids than phone numbers.

Order matters: cards and IBANs are replaced before phones, so their digits are not
taken for a phone number.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.data.document import Document

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@"
                   r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)")

_NUMBERING_WORD = re.compile(r"(?:section|chapter|sect\.|§|figure|table|version|release|v)\s*$",
                             re.IGNORECASE)
CARD_PREFIXES = ("4", "51", "52", "53", "54", "55", "34", "37", "6011", "65", "35", "30", "36", "38") + tuple(
    str(p) for p in range(2221, 2721))


@dataclass
class PiiConfig:
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip: bool = True
    credit_card: bool = True
    iban: bool = True
    only_global_ips: bool = True  # leave loopback, private and documentation addresses
    placeholders: dict[str, str] = field(default_factory=lambda: {
        "email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>",
        "iban": "<IBAN>"})


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment cards: double every second digit from the right."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_valid(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return digits.startswith(CARD_PREFIXES) and luhn_valid(digits)


def iban_valid(candidate: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, mod 97 == 1."""
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def looks_like_section_number(match: re.Match[str]) -> bool:
    """A dotted quad that numbers a section or a version, not a host: ``Section 1.3.2.1``,
    ``version 2.4.1.3``, or a heading ``6.1.2.1. Security Updates`` (small numbers, then a
    full stop and a capital)."""
    text, start, end = match.string, match.start(), match.end()
    if _NUMBERING_WORD.search(text, max(0, start - 16), start):
        return True
    after = text[end:end + 3]
    small = all(int(part) < 50 for part in match.group(0).split("."))
    return small and len(after) >= 3 and after[0] == "." and after[1].isspace() and after[2].isupper()


def _ip_redactable(candidate: str, only_global: bool) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return address.is_global or not only_global


class PiiRedactor:
    """Stage: replace PII in place; never drops. ``counters`` holds redactions per kind."""

    name = "pii"

    def __init__(self, config: PiiConfig | None = None) -> None:
        self.config = config or PiiConfig()
        self.counters: Counter[str] = Counter()
        defaults = PiiConfig().placeholders
        self._placeholder = {kind: self.config.placeholders.get(kind, defaults[kind]) for kind in defaults}

    def redact(self, text: str) -> str:
        cfg = self.config
        if cfg.email and "@" in text:
            text = self._sub(EMAIL, "email", text)
        if cfg.credit_card:
            text = self._sub(CARD, "credit_card", text, lambda m: _card_valid(m.group(0)))
        if cfg.iban:
            text = self._sub(IBAN, "iban", text, lambda m: iban_valid(m.group(0)))
        if cfg.ip:
            if "." in text:
                text = self._sub(IPV4, "ip", text, lambda m: _ip_redactable(m.group(0), cfg.only_global_ips)
                                 and not looks_like_section_number(m))
            if "::" in text or text.count(":") >= 7:
                text = self._sub(IPV6, "ip", text, lambda m: _ip_redactable(m.group(0), cfg.only_global_ips))
        if cfg.phone:
            text = self._sub(PHONE, "phone", text, lambda m: 7 <= sum(c.isdigit() for c in m.group(0)) <= 15)
        return text

    def _sub(self, pattern: re.Pattern[str], kind: str, text: str,
             check: Callable[[re.Match[str]], bool] | None = None) -> str:
        placeholder = self._placeholder[kind]

        def replace(match: re.Match[str]) -> str:
            found = match.group(0)
            if check is not None and not check(match):
                return found
            self.counters[kind] += 1
            return placeholder

        return pattern.sub(replace, text)

    def __call__(self, doc: Document) -> str | None:
        doc.text = self.redact(doc.text)
        return None
