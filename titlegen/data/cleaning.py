"""Text cleaning that removes the real noise of AmazonTitles and keeps every bit of information.

Kept: case, punctuation, accents and symbols (``12-Pack``, ``3/4"``, ``AT&T``, ``™``, ``café``).
Removed: HTML entities (unescaped), invisible characters, runs of whitespace and newlines, and Amazon's
"--This text refers to ... edition" note (also in its glued form "thePaperbackedition").
"""

from __future__ import annotations

import html
import re
import unicodedata

# "--This text refers to an out of print or unavailable edition of this title." and
# "--This text refers to theHardcoveredition." / "... an alternate Mass Market Paperback edition." etc.
_EDITION_NOTE = re.compile(
    r"\s*-*\s*This text refers to (?:an? |the)?\s*(?:out of print or unavailable edition of this title"
    r"|[^.]{0,60}?edition)(?=\s*\.|\s*$)\s*\.?",
    re.IGNORECASE,
)
# The note's pattern starts with optional runs, so searching for it tries every position of the text; this
# literal finds the texts that hold a note, and where, at a fraction of the cost (same result: the note holds it).
_EDITION_HINT = re.compile("this text refers to", re.IGNORECASE)
# Zero-width and byte-order marks carry nothing and break de-duplication.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
# Control characters other than whitespace (which the collapse below handles).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def unescape_html(text: str) -> str:
    """Unescape entities, twice at most: some rows were escaped twice (``&amp;#8217;``)."""
    for _ in range(2):
        if "&" not in text:
            break
        text = html.unescape(text)
    return text


def clean_text(text: str | None) -> str:
    """Return ``text`` without markup noise, with Unicode composed (NFC) and whitespace collapsed.

    NFC (not NFKC) composes accents without rewriting symbols: NFKC would turn ``™`` into ``TM`` and
    ``½`` into ``1⁄2``.
    """
    if not text:
        return ""
    text = unescape_html(text)
    text = unicodedata.normalize("NFC", text)
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub(" ", text)
    hint = _EDITION_HINT.search(text)
    if hint:  # a note can only start after the last character before it that is not a space or dash
        start = hint.start()
        while start and (text[start - 1].isspace() or text[start - 1] == "-"):
            start -= 1
        text = text[:start] + _EDITION_NOTE.sub(" ", text[start:])
    # str.split() splits on exactly the characters the regex \s matches (both use Unicode's isspace), faster.
    return " ".join(text.split())


def same_text(a: str, b: str) -> bool:
    """True when two cleaned texts differ only in case (a description that merely repeats the title)."""
    return a.casefold() == b.casefold()
