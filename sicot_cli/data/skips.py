"""Counted skips: rows that cannot be used are counted by reason and summarised, or, with
``--strict``, stop the job with an error naming the first one."""

from __future__ import annotations

from collections import Counter

from sicot_cli.errors import SicotError


class Skips:
    """Counts skipped rows by reason and keeps the first few examples of each."""

    def __init__(self, strict: bool = False, examples: int = 3) -> None:
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._keep = examples

    def add(self, reason: str, where: str) -> None:
        """Record that the row at ``where`` (file:row or id) was skipped for ``reason``.

        Raises:
            SicotError: in strict mode, at the first skip.
        """
        if self.strict:
            raise SicotError(f"{where}: {reason} (remove --strict / data.strict to skip such rows)")
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self._keep:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def described(self) -> str:
        """``N skipped: reason (count, e.g. where); ...`` with what to do about the commonest
        reasons: the line an error ends with when no row survives."""
        parts = []
        for reason, n in self.counts.most_common():
            hint = HINTS.get(reason)
            example = self.examples.get(reason, [""])[0]
            parts.append(f"{reason} ({n}{', e.g. ' + example if example else ''}){': ' + hint if hint else ''}")
        return f"{self.total} skipped: {'; '.join(parts)}"


# What to do about a skip reason that can take every row (the error names it with an example).
HINTS = {
    "line is not UTF-8": 'save the manifest as UTF-8 (a spreadsheet\'s "CSV UTF-8")',
    "not a JSON object": "a .jsonl manifest holds one JSON object a line; a JSON array ([...]) or an object "
    "spread over lines is not JSONL",
    "image file not found": "image paths are relative to the manifest's folder, with / between folders",
    "label has no training image": "every class needs a training image that decodes",
}
