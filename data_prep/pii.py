"""PII redaction into typed placeholders: e-mail, phone, My Number, credit card, postal code, IP.

Numbers with a checksum (My Number: mod-11 check digit; cards: Luhn) are only redacted when the
checksum holds, which keeps order numbers and other long digit runs intact. Full-width digits count
as digits, since NFKC is off by default.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

from kumihimo.data_prep.config import PiiConfig

_D = "[0-9\uff10-\uff19]"  # ASCII and full-width digits
_NOT_D_BEFORE = "(?<![0-9\uff10-\uff19])"
_NOT_D_AFTER = "(?![0-9\uff10-\uff19])"
# digit groups: not a piece of a longer run such as "4111 1111 1111 1111" (Python has no variable lookbehind)
_NOT_GROUP_BEFORE = "(?<![0-9\uff10-\uff19])(?<![0-9\uff10-\uff19][ -])"
_NOT_GROUP_AFTER = "(?![ -]?[0-9\uff10-\uff19])"
_HYPHEN = "[-\u2010\u2011\u2012\u2013\u2014\u2212\uff0d\u30fc]"  # ASCII, Unicode and full-width dashes, ー
_TO_ASCII = str.maketrans("０１２３４５６７８９", "0123456789")

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}"
)
CREDIT_CARD = re.compile(f"{_NOT_GROUP_BEFORE}(?:{_D}[ -]?){{12,18}}{_D}{_NOT_GROUP_AFTER}")
MY_NUMBER = re.compile(f"{_NOT_GROUP_BEFORE}{_D}{{4}}[ -]?{_D}{{4}}[ -]?{_D}{{4}}{_NOT_GROUP_AFTER}")
PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)")
PHONE_JP = re.compile(
    f"{_NOT_D_BEFORE}(?:[0\uff10]{_D}{{1,4}}{_HYPHEN}{_D}{{1,4}}{_HYPHEN}{_D}{{3,4}}"  # 03-1234-5678
    f"|[(（][0\uff10]{_D}{{1,4}}[)）]\\s?{_D}{{1,4}}{_HYPHEN}{_D}{{4}}"  # (03) 1234-5678
    f"|0[5789]0{_D}{{8}}){_NOT_D_AFTER}"  # 09012345678 (mobile, no separators)
)
POSTAL = re.compile(
    f"〒\\s?{_D}{{3}}{_HYPHEN}?{_D}{{4}}(?!{_D})"
    f"|(?<![0-9\uff10-\uff19-]){_D}{{3}}{_HYPHEN}{_D}{{4}}(?![0-9\uff10-\uff19-])"
)
IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?!\.?\d)"
)
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def digits_of(text: str) -> str:
    return "".join(ch for ch in text.translate(_TO_ASCII) if ch.isdigit())


def luhn_valid(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def my_number_check_digit(first11: str) -> int:
    """The 12th digit of a My Number (individual number) for its first 11 digits (mod-11 rule)."""
    total = 0
    for n, ch in enumerate(reversed(first11), start=1):  # P1 is the digit next to the check digit
        weight = n + 1 if n <= 6 else n - 5
        total += int(ch) * weight
    remainder = total % 11
    return 0 if remainder <= 1 else 11 - remainder


def _card(match: str) -> bool:
    digits = digits_of(match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1


def _my_number(match: str) -> bool:
    digits = digits_of(match)
    return (
        len(digits) == 12 and my_number_check_digit(digits[:11]) == int(digits[11]) and len(set(digits)) > 1
    )


def _phone_jp(match: str) -> bool:
    return len(digits_of(match)) in (10, 11)


def _phone_intl(match: str) -> bool:
    return 8 <= len(digits_of(match)) <= 15


def _ipv6(match: str) -> bool:
    if sum(ch.isalnum() for ch in match) < 3:
        return False
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return True


def _always(_: str) -> bool:
    return True


# Order matters: e-mails hold digits, cards are longer than My Numbers, phones before postal codes.
_RULES: list[tuple[str, re.Pattern[str], Callable[[str], bool]]] = [
    ("email", EMAIL, _always),
    ("credit_card", CREDIT_CARD, _card),
    ("my_number", MY_NUMBER, _my_number),
    ("phone", PHONE_INTL, _phone_intl),
    ("phone", PHONE_JP, _phone_jp),
    ("postal_code", POSTAL, _always),
    ("ip_address", IPV4, _always),
    ("ip_address", IPV6, _ipv6),
]

# What a text must contain for a rule to redact anything: (digits at least, a character that must occur).
# Checked once per text before any regex runs (most texts have few digits and no '@'); the counts hold for
# every rule's pattern plus its validator (a card has >= 13 digits, a JP phone 10-11, an IPv6 two ':').
_NEEDS: dict[re.Pattern[str], tuple[int, str | None]] = {
    EMAIL: (0, "@"),
    CREDIT_CARD: (13, None),
    MY_NUMBER: (12, None),
    PHONE_INTL: (8, "+"),
    PHONE_JP: (10, None),
    POSTAL: (7, None),
    IPV4: (4, "."),
    IPV6: (0, ":"),
}
_DIGIT = re.compile(_D)
_PRECHECK_CHARS = set("0123456789\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19@+.:")


class PiiRedactor:
    def __init__(self, config: PiiConfig):
        self.enabled = config.enabled
        self.rules = [
            (kind, pattern, valid, config.placeholder.format(type=kind.upper()))
            for kind, pattern, valid in _RULES
            if kind in config.types
        ]
        # a placeholder holding digits or anchor characters could enable a later rule: no prechecks then
        self._precheck = not any(set(placeholder) & _PRECHECK_CHARS for *_, placeholder in self.rules)

    def _applicable(self, text: str) -> list:
        if not self._precheck:
            return self.rules
        num_digits = len(_DIGIT.findall(text))
        return [
            rule
            for rule in self.rules
            if num_digits >= _NEEDS[rule[1]][0] and (_NEEDS[rule[1]][1] is None or _NEEDS[rule[1]][1] in text)
        ]

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """(redacted text, count per PII type)."""
        counts: Counter[str] = Counter()
        if not self.enabled:
            return text, counts
        for kind, pattern, valid, placeholder in self._applicable(text):

            def replace(match: re.Match[str], kind=kind, valid=valid, placeholder=placeholder) -> str:
                if valid(match.group(0)):
                    counts[kind] += 1
                    return placeholder
                return match.group(0)

            text = pattern.sub(replace, text)
        return text, counts
