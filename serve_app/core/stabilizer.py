"""LocalAgreement-2: which words of a growing turn's transcript are stable enough to send.

A turn is re-transcribed as it grows; each hypothesis may rewrite its last words. A word is
committed once two consecutive hypotheses agree on it and on every word before it (the
agreement policy of Macháček et al., "Turning Whisper into Real-Time Transcription System",
as WhisperLiveKit uses it). Committed words are never taken back, so the deltas of a turn,
concatenated, equal its final transcript: `finish` appends only what the last hypothesis adds
after the committed words.

Words are compared without case and punctuation ("Hello," agrees with "hello"); the text
sent is the newer hypothesis's spelling.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

_NON_WORD = re.compile(r"[^\w']+")


def normalise(word: str) -> str:
    return _NON_WORD.sub("", word.lower())


def split_words(text: str) -> list[str]:
    return text.split()


@dataclass
class Stabilizer:
    """The committed prefix of one turn. Feed each hypothesis to `update`; `finish` at turn end."""

    committed: list[str] = field(default_factory=list)
    previous: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.committed)

    def update(self, hypothesis: str) -> str:
        """Take a new hypothesis of the whole turn; return the newly stable text ("" if none)."""
        words = split_words(hypothesis)
        agreed = 0
        limit = min(len(words), len(self.previous))
        while agreed < limit and normalise(words[agreed]) == normalise(self.previous[agreed]):
            agreed += 1
        self.previous = words
        # Never shrink what was sent: a later hypothesis that disagrees inside the committed
        # prefix commits nothing new until it agrees past it again.
        if agreed <= len(self.committed) or not self._extends_committed(words):
            return ""
        new = words[len(self.committed) : agreed]
        return self._commit(new)

    def finish(self, final: str) -> str:
        """The last hypothesis of the turn: commit whatever it has past the committed words."""
        words = split_words(final)
        start = self._overlap(words)
        new = words[start:]
        self.previous = []
        return self._commit(new)

    def pending(self) -> str:
        """The latest hypothesis's words past the committed prefix: shown, not yet sent."""
        if not self._extends_committed(self.previous):
            return ""
        return " ".join(self.previous[len(self.committed) :])

    def _extends_committed(self, words: list[str]) -> bool:
        n = len(self.committed)
        if len(words) < n:
            return False
        return all(normalise(a) == normalise(b) for a, b in zip(words[:n], self.committed, strict=True))

    def _overlap(self, words: list[str]) -> int:
        """Where `words` continue past the committed prefix: its length if they start with it,
        else just after the last committed word the final hypothesis also has, aligned in order.

        Partials of a turn still being spoken can agree twice on a wrong word ("Please end the"
        for "Please send the quarterly report ..."), and a committed word is never taken back.
        The final is then aligned with the committed words by a longest-matching-blocks diff,
        so it neither repeats them nor drops what follows. Two heuristics failed under CI load:
        the longest committed suffix the final starts with matched a lone "the" and repeated the
        whole sentence; the last occurrence of the last committed word skipped five words.
        """
        if self._extends_committed(words):
            return len(self.committed)
        norm = [normalise(w) for w in words]
        committed = [normalise(w) for w in self.committed]
        matcher = difflib.SequenceMatcher(a=committed, b=norm, autojunk=False)
        blocks = [b for b in matcher.get_matching_blocks() if b.size]
        if blocks:
            return blocks[-1].b + blocks[-1].size
        return min(len(committed), len(words))

    def _commit(self, new: list[str]) -> str:
        if not new:
            return ""
        delta = " ".join(new)
        if self.committed:
            delta = " " + delta
        self.committed.extend(new)
        return delta
