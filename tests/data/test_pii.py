"""PII redaction: placeholders for injected contact details, look-alikes left alone."""

from __future__ import annotations

import re

import pytest

from lmforge.data.document import Document
from lmforge.data.extract import Extractor
from lmforge.data.pii import PiiConfig, PiiRedactor, iban_valid, luhn_valid
from lmforge.data.pipeline import prepare
from lmforge.data.writers import read_documents

from .conftest import copy_into, only

INJECTED = {
    "email": ["jane.doe@example.org", "raphael+debian@falcot.example.com"],
    "phone": ["+33 1 42 68 53 00", "(415) 555-2671", "+1-202-555-0143"],
    "ip": ["8.8.4.4", "2001:4860:4860::8844"],
    "credit_card": ["4111 1111 1111 1111", "5500-0055-5555-5559", "378282246310005"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"],
}
LOOK_ALIKES = ["192.168.0.1", "127.0.0.1", "4111 1111 1111 1112", "version 3.11.2", "version 2.4.1.3",
               "Section 1.3.2.1", "6.1.2.1. Security Updates", "release 10.2.1.4",
               "on 2023-01-15 at 12:30:45", "ISBN 978-3-16-148410-0", "DE89 3704 0044 0532 0130 01"]


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE89 3704 0044 0532 0130 01")


def test_each_kind_and_its_look_alikes():
    redactor = PiiRedactor()
    for kind, values in INJECTED.items():
        for value in values:
            out = redactor.redact(f"Write to {value} today.")
            assert out == f"Write to {PiiConfig().placeholders[kind]} today.", (kind, value, out)
    for text in LOOK_ALIKES:
        assert redactor.redact(f"See {text} for details.") == f"See {text} for details.", text


def test_kinds_can_be_switched_off_and_placeholders_changed():
    redactor = PiiRedactor(PiiConfig(email=False, placeholders={"ip": "0.0.0.0"}))
    assert redactor.redact("a@b.example at 8.8.8.8") == "a@b.example at 0.0.0.0"
    everything = PiiRedactor(PiiConfig(only_global_ips=False))
    assert everything.redact("router 192.168.0.1") == "router <IP_ADDRESS>"


def _kept_paragraph(html: str) -> int:
    """Offset just inside the first paragraph whose text the extractor keeps."""
    extracted = Document("x", html, metadata={"content_type": "html"})
    Extractor()(extracted)
    opening = '<div class="para">'
    start = html.find(opening)
    while start != -1:
        inner = start + len(opening)
        words = re.sub(r"<[^>]+>", " ", html[inner:inner + 400]).split()[:6]
        if len(words) == 6 and " ".join(words) in extracted.text:
            return inner
        start = html.find(opening, inner)
    raise AssertionError("no kept paragraph")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_pii_injected_into_real_pages_is_redacted(handbook, handbook_pages, tmp_path, fmt):
    """Contact details woven into the prose of real handbook chapters come out as placeholders."""
    values = [v for vs in INJECTED.values() for v in vs]
    sentence = " ".join(f"Contact number {i} is {v} for the Falcot team." for i, v in enumerate(values))
    files = []
    for page in handbook_pages[:3]:
        html = (handbook / "en-US" / page).read_text(encoding="utf-8")
        at = _kept_paragraph(html)
        path = tmp_path / "src" / page
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html[:at] + sentence + " " + html[at:], encoding="utf-8")
        files.append((path, page))
    corpus = copy_into(tmp_path / "in", files)
    report = prepare([corpus], tmp_path / "out", only("extract", "language", "pii", output_format=fmt))
    docs = [d for p in sorted((tmp_path / "out").glob(f"part-*.{fmt}")) for d in read_documents(p)]
    assert len(docs) == 3
    for d in docs:
        assert not any(v in d.text for v in values), d.id
        assert "Contact number 0 is <EMAIL> for the Falcot team." in d.text
        assert "Contact number 9 is <CREDIT_CARD>" in d.text
    pii = next(s for s in report.stages if s.name == "pii")
    for kind, vs in INJECTED.items():
        assert pii.counters[kind] >= 3 * len(vs), (kind, pii.counters)
