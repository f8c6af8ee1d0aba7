import json

import pytest

from titlegen.data.cleaning import clean_text, same_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12-Pack AA Batteries", "12-Pack AA Batteries"),
        ('Oak Shelf 3/4" Bracket', 'Oak Shelf 3/4" Bracket'),
        ("AT&amp;T Phone", "AT&T Phone"),
        ("AT&T Phone", "AT&T Phone"),
        ("Espresso Cups™ ½ price", "Espresso Cups™ ½ price"),  # NFKC would give "TM" and "1⁄2"
        ("Cafe\u0301 Table", "Café Table"),  # decomposed accent composed, not stripped
        ("Café, Crème Brûlée, Señor", "Café, Crème Brûlée, Señor"),
        ("the author&#8217;s &quot;best&quot;", "the author’s \"best\""),
        ("double &amp;#8217; escaped", "double ’ escaped"),
        ("line one\n\n   line\ttwo  ", "line one line two"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("non\u00a0breaking", "non breaking"),
        ("Great read.--This text refers to thePaperbackedition.", "Great read."),
        ("Great read.--This text refers to the Paperback edition.", "Great read."),
        ("Inc.--This text refers to an out of print or unavailable edition of this title.", "Inc."),
        ("X.--This text refers to an alternate Mass Market Paperback edition. More.", "X. More."),
        ("Y--This text refers to the Kindle Edition edition.", "Y"),
        ("The title refers to a site near Norfolk.", "The title refers to a site near Norfolk."),
        ("", ""),
        (None, ""),
    ],
)
def test_clean_text_keeps_information_and_drops_noise(raw, expected):
    assert clean_text(raw) == expected


def test_same_text_ignores_case_only():
    assert same_text("Blue Pen", "blue pen")
    assert not same_text("Blue Pen", "Blue Pens")


def test_cleaning_on_real_rows(shared_data):
    """No entity, edition note or whitespace run survives in any real row; every row keeps its letters."""
    rows = [json.loads(line) for f in sorted(shared_data.glob("*.jsonl")) for line in f.open(encoding="utf-8")]
    assert len(rows) > 1000
    for row in rows:
        content = clean_text(row.get("content"))
        assert "This text refers to" not in content
        assert "&#" not in content and "&quot;" not in content and "&amp;" not in content
        assert "  " not in content and "\n" not in content
        if row.get("content", "").strip():
            raw_letters = sum(ch.isalpha() for ch in row["content"])
            assert sum(ch.isalpha() for ch in content) >= 0.8 * raw_letters - 120


def _reference_clean(text: str) -> str:
    """clean_text as plainly written, without the shortcuts (the note pattern over the whole text, a regex for
    whitespace)."""
    import re
    import unicodedata

    from titlegen.data import cleaning

    if not text:
        return ""
    text = unicodedata.normalize("NFC", cleaning.unescape_html(text))
    text = cleaning._CONTROL.sub(" ", cleaning._INVISIBLE.sub("", text))
    text = cleaning._EDITION_NOTE.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def test_the_fast_paths_clean_exactly_like_the_plain_patterns():
    import random

    rnd = random.Random(0)
    pieces = list("ab -.\n\t\u2028\u3000\u00a0\x1c—&;") + [
        "This text refers to the Paperback edition.", "--This TEXT refers to an out of print or unavailable "
        "edition of this title.", " this text refers to ", "edition", ".", "-- ", "&amp;"]
    texts = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 12))) for _ in range(20000)]
    assert [clean_text(t) for t in texts] == [_reference_clean(t) for t in texts]
