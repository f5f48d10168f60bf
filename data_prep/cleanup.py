"""The clean-up stage after filtering (Swallow's phase 4): Japanese punctuation and footer lines.

normalize_punctuation: a text that writes its commas and full stops Western style (，．) more often than
Japanese style (、。) after Japanese letters gets them rewritten as 、。 -- except after full-width digits
and Latin letters (３．１４, Ｈｉ，) and at the very start. Counted as Swallow counts: runs of the mark that
follow a kana, kanji or closing bracket.

trim_footer: among the last `num_last_lines` lines, the first one whose characters are more than
`min_keyword_share` footer keywords (copyright notices, share buttons, site menus) starts the footer,
which is cut with everything after it. Keywords are taken longest first, each removed from the line
before the next is counted, so overlapping keywords count once.
"""

from __future__ import annotations

import re

_JAPANESE = r"[）」』］〕】〉》\u3041-\u3096\u30A1-\u30FA々〇〻\u3400-\u9FFF\uF900-\uFAFF]"
_FULL_WIDTH_ALNUM = "０-９Ａ-Ｚａ-ｚ"
_COUNT = {mark: re.compile(f"{_JAPANESE}{mark}+") for mark in "、，。．"}
_REWRITE = {mark: re.compile(f"(?<=[^{_FULL_WIDTH_ALNUM}]){mark}+") for mark in "，．"}


def normalize_punctuation(text: str) -> tuple[str, bool, bool]:
    """(text, commas rewritten, full stops rewritten)."""
    changed = []
    for western, japanese in (("，", "、"), ("．", "。")):
        if western not in text:
            changed.append(False)
            continue
        count = _COUNT[western]
        if len(count.findall(text)) <= len(_COUNT[japanese].findall(text)):
            changed.append(False)
            continue
        text = _REWRITE[western].sub(lambda m, mark=japanese: mark * len(m.group()), text)
        changed.append(True)
    return text, changed[0], changed[1]


def keyword_share(line: str, keywords: list[str]) -> float:
    """Share of the line's characters that are footer keywords (`keywords` longest first)."""
    if not line:
        return 0.0
    rest = line
    for keyword in keywords:
        if keyword in rest:
            rest = rest.replace(keyword, "")
    return (len(line) - len(rest)) / len(line)


def trim_footer(
    text: str, keywords: list[str], num_last_lines: int, min_keyword_share: float
) -> tuple[str, int]:
    """(text without its footer, number of lines cut)."""
    lines = text.split("\n")
    ordered = sorted(keywords, key=len, reverse=True)
    for i in range(max(0, len(lines) - num_last_lines), len(lines)):
        if keyword_share(lines[i], ordered) > min_keyword_share:
            return "\n".join(lines[:i]), len(lines) - i
    return text, 0
