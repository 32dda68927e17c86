"""Text statistics for judging samples: repetition within a sample, doubled words, distinct n-grams across samples."""

from __future__ import annotations


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repetition(text: str, n: int = 4) -> float:
    """Share of the word n-grams of a text that already occurred earlier in it (0: no loops)."""
    grams = ngrams(text.split(), n)
    seen: set = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def distinct(texts: list[str], n: int) -> float:
    """Unique word n-grams over all n-grams of all texts (diversity; 1: nothing repeats)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def doubled(text: str) -> float:
    """Share of words equal to the word before them, ignoring case and punctuation ("play play", "the the")."""
    words = ["".join(c for c in w.lower() if c.isalnum()) for w in text.split()]
    words = [w for w in words if w]
    return sum(a == b for a, b in zip(words, words[1:])) / (len(words) - 1) if len(words) > 1 else 0.0
