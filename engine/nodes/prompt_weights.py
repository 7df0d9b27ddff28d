"""ComfyUI's prompt weighting syntax: ``(word)``, ``(word:1.3)`` and ``\\(`` escapes.

A prompt is split into segments, each with the weight that applies to it:

- ``(text)`` multiplies the surrounding weight by 1.1 (nesting compounds);
- ``(text:w)`` sets the weight to ``w`` (the last ``:`` inside the brackets,
  when what follows it is a number);
- ``\\(`` and ``\\)`` are literal brackets.

The rules (including how unbalanced brackets fall through as plain text)
follow ComfyUI's ``token_weights`` so that the same prompt yields the same
segments.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Weight factor of a bracket group without an explicit ``:weight``.
BRACKET_EMPHASIS = 1.1

# Escaped brackets are hidden behind control characters while parsing.
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


@dataclass(frozen=True)
class WeightedSegment:
    """A piece of prompt text and the weight its tokens get."""

    text: str
    weight: float


def parse_prompt_weights(prompt: str) -> tuple[WeightedSegment, ...]:
    """Split ``prompt`` into weighted segments, brackets removed and escapes resolved.

    ``"a (red:1.5) cat"`` → ``("a ", 1.0), ("red", 1.5), (" cat", 1.0)``.
    """
    hidden = _hide_escapes(prompt)
    return tuple(WeightedSegment(_reveal_escapes(text), weight) for text, weight in _weigh(hidden, 1.0))


def _hide_escapes(text: str) -> str:
    for escaped, placeholder in _ESCAPES:
        text = text.replace(escaped, placeholder)
    return text


def _reveal_escapes(text: str) -> str:
    for escaped, placeholder in _ESCAPES:
        text = text.replace(placeholder, escaped[-1])
    return text


def _split_top_level(text: str) -> list[str]:
    """Cut ``text`` into plain runs and top-level ``( ... )`` groups (brackets kept)."""
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _weigh(text: str, weight: float) -> list[tuple[str, float]]:
    segments: list[tuple[str, float]] = []
    for part in _split_top_level(text):
        if len(part) < 2 or part[0] != "(" or part[-1] != ")":
            segments.append((part, weight))
            continue
        inner = part[1:-1]
        inner_weight = weight * BRACKET_EMPHASIS
        colon = inner.rfind(":")
        if colon > 0:
            explicit = _parse_number(inner[colon + 1 :])
            if explicit is not None:
                inner_weight = explicit
                inner = inner[:colon]
        segments.extend(_weigh(inner, inner_weight))
    return segments


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
