"""Human-readable dates and their ISO forms: a seeded generator, the character vocabulary and the split.

Every calendar day from 1950-01-01 to 2049-12-31 is a possible target. A source string is one of
:data:`FORMATS` applied to it, lower-case ("3 may 1979", "thursday, may 3 1979", "03/05/79",
"may the third, 1979"); the target is ``YYYY-MM-DD``. Numeric forms are day first; a two-digit year
``yy`` means 19yy from 50 up and 20yy below (the range above makes that unambiguous). The held-out
test days are drawn once from the seed and never appear in training in any format, so the test set is
disjoint from training by date (hence also by source string).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

FIRST_DAY = dt.date(1950, 1, 1)
LAST_DAY = dt.date(2049, 12, 31)
TARGET_LENGTH = 10  # "YYYY-MM-DD"

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_UNITS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"]
_TEENS = ["tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
          "eighteenth", "nineteenth"]


def ordinal_word(day: int) -> str:
    """1 -> "first", 22 -> "twenty-second", 30 -> "thirtieth"."""
    if day < 10:
        return _UNITS[day]
    if day < 20:
        return _TEENS[day - 10]
    tens = {2: "twenty", 3: "thirty"}[day // 10]
    return tens[:-1] + "ieth" if day % 10 == 0 else f"{tens}-{_UNITS[day % 10]}"


def ordinal_suffix(day: int) -> str:
    """1 -> "1st", 12 -> "12th", 23 -> "23rd"."""
    if 10 <= day % 100 <= 20:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def _abbr(d: dt.date) -> str:
    return MONTHS[d.month - 1][:3]


def _month(d: dt.date) -> str:
    return MONTHS[d.month - 1]


def _weekday(d: dt.date) -> str:
    return WEEKDAYS[d.weekday()]


def _yy(d: dt.date) -> str:
    return f"{d.year % 100:02d}"


# Each format maps a date to its source string; names say what the format looks like for 1979-05-03.
FORMATS: dict[str, Callable[[dt.date], str]] = {
    "3 may 1979": lambda d: f"{d.day} {_month(d)} {d.year}",
    "03 may 1979": lambda d: f"{d.day:02d} {_month(d)} {d.year}",
    "3 may, 1979": lambda d: f"{d.day} {_month(d)}, {d.year}",
    "3 may 79": lambda d: f"{d.day} {_abbr(d)} {_yy(d)}",
    "3rd may 1979": lambda d: f"{ordinal_suffix(d.day)} {_month(d)} {d.year}",
    "may 3 1979": lambda d: f"{_month(d)} {d.day} {d.year}",
    "may 3, 1979": lambda d: f"{_month(d)} {d.day}, {d.year}",
    "may 3rd, 1979": lambda d: f"{_abbr(d)} {ordinal_suffix(d.day)}, {d.year}",
    "thursday, may 3 1979": lambda d: f"{_weekday(d)}, {_month(d)} {d.day} {d.year}",
    "thu 3 may 1979": lambda d: f"{_weekday(d)[:3]} {d.day} {_abbr(d)} {d.year}",
    "thursday 3rd of may 1979": lambda d: f"{_weekday(d)} {ordinal_suffix(d.day)} of {_month(d)} {d.year}",
    "may the third, 1979": lambda d: f"{_month(d)} the {ordinal_word(d.day)}, {d.year}",
    "the third of may 1979": lambda d: f"the {ordinal_word(d.day)} of {_month(d)} {d.year}",
    "03/05/79": lambda d: f"{d.day:02d}/{d.month:02d}/{_yy(d)}",
    "3/5/1979": lambda d: f"{d.day}/{d.month}/{d.year}",
    "03.05.1979": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    "3.5.79": lambda d: f"{d.day}.{d.month}.{_yy(d)}",
    "03-05-1979": lambda d: f"{d.day:02d}-{d.month:02d}-{d.year}",
    "1979-05-03": lambda d: d.isoformat(),
}


def iso(d: dt.date) -> str:
    return d.isoformat()


def all_days() -> list[dt.date]:
    return [FIRST_DAY + dt.timedelta(days=i) for i in range((LAST_DAY - FIRST_DAY).days + 1)]


class Vocabulary:
    """Characters <-> ids, one vocabulary for sources and targets (so embeddings can be shared).

    Ids: 0 padding, 1 start of sequence, 2 end of sequence, then every character any format can write.
    """

    PAD, BOS, EOS = 0, 1, 2
    SPECIALS = ["<pad>", "<s>", "</s>"]

    def __init__(self) -> None:
        chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 ,./-"))
        self.itos: list[str] = self.SPECIALS + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Characters up to the first end of sequence; specials are dropped."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.EOS:
                break
            if i >= len(self.SPECIALS):
                out.append(self.itos[i])
        return "".join(out)


@dataclass
class Batch:
    """One batch of sources and targets (int64 ids).

    ``src`` (N, S) padded with PAD; ``src_padding`` (N, S) bool, True at padding (torch's key-padding
    convention); ``tgt_in`` (N, T) = BOS + target; ``tgt_out`` (N, T) = target + EOS; T = 11.
    """

    src: torch.Tensor
    src_padding: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    sources: list[str]
    targets: list[str]


class DateData:
    """The seeded split and a batch maker: ``test_days`` days are held out for the final test and
    ``val_days`` for the curves while training; neither is ever trained on."""

    def __init__(self, seed: int = 0, test_days: int = 2000, val_days: int = 500) -> None:
        self.vocab = Vocabulary()
        days = all_days()
        random.Random(seed).shuffle(days)
        self.test = sorted(days[:test_days])
        self.val = sorted(days[test_days:test_days + val_days])
        self.train = days[test_days + val_days:]
        self.formats = list(FORMATS.values())

    def sample(self, rng: random.Random, days: list[dt.date], n: int) -> list[tuple[str, str]]:
        """``n`` (source, target) pairs: a random day of ``days`` in a random format each."""
        pairs = []
        for _ in range(n):
            d = rng.choice(days)
            pairs.append((rng.choice(self.formats)(d), iso(d)))
        return pairs

    def held_out(self, days: list[dt.date], seed: int, n: int | None = None) -> list[tuple[str, str]]:
        """Each of ``days`` once (the first ``n`` when given), in a format drawn from ``seed``."""
        rng = random.Random(seed + 1)
        return [(rng.choice(self.formats)(d), iso(d)) for d in (days if n is None else days[:n])]

    def batch(self, pairs: list[tuple[str, str]], device: torch.device | str = "cpu") -> Batch:
        v = self.vocab
        S = max(len(s) for s, _ in pairs)
        src = torch.full((len(pairs), S), v.PAD, dtype=torch.long)
        for i, (s, _) in enumerate(pairs):
            src[i, : len(s)] = torch.tensor(v.encode(s))
        tgt = torch.tensor([v.encode(t) for _, t in pairs], dtype=torch.long)
        bos = torch.full((len(pairs), 1), v.BOS, dtype=torch.long)
        eos = torch.full((len(pairs), 1), v.EOS, dtype=torch.long)
        return Batch(src.to(device), (src == v.PAD).to(device), torch.cat([bos, tgt], 1).to(device),
                     torch.cat([tgt, eos], 1).to(device), [s for s, _ in pairs], [t for _, t in pairs])
