"""Chat rows rendered by the base model's own chat template, with the token ranges
of the assistant's answers.

The answer of assistant turn i is what the template adds between the conversation up
to turn i with a generation prompt and the conversation through turn i: exactly the
tokens a model served with this template generates for that turn, its end-of-turn
marker included (the stop it must learn), the whitespace the template puts between
turns left out (never generated). Characters are mapped to tokens through the fast
tokenizer's offsets, so a token that straddles the boundary (a SentencePiece word
piece carrying the space before the answer) counts with the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from mergekit_fw.calibration.rows import ASSISTANT, CalibrationError, CalibrationExample, Message

Span = tuple[int, int]
AssistantTurns = Literal["last", "all"]


@dataclass(frozen=True)
class EncodedRow:
    """Token ids of one row and what the objective reads of it."""

    ids: list[int]
    # where the answer starts: the first completion token, or len(ids) for an
    # unlabelled prompt (the entropy objective reads the positions before it)
    answer_start: int
    # token ranges [start, end) whose tokens the cross-entropy counts, in order; the
    # last one is the row's answer
    counted: tuple[Span, ...] = ()


def template_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def require_chat_template(tokenizer, example: CalibrationExample) -> None:
    """A chat row needs the base's template: which one to guess would change the tokens
    every answer is scored on, so there is no fallback."""
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(
            f"{example.where}: this row is a chat conversation ('messages'), but the base model's tokenizer "
            f"({template_name(tokenizer)}) has no chat template; use a base whose tokenizer has one "
            "(chat_template in tokenizer_config.json or chat_template.jinja), or write the row as "
            "'prompt' and 'completion'"
        )


def _render(tokenizer, messages: Sequence[Message], generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as error:  # jinja's raise_exception, undefined variables, a template bug
        raise CalibrationError(
            f"{where}: the chat template of {template_name(tokenizer)} refused the conversation: "
            f"{type(error).__name__}: {error}"
        ) from None
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: the chat template of {template_name(tokenizer)} did not render text")
    return text


def _answer_chars(tokenizer, messages: Sequence[Message], turn: int, full: str, where: str) -> Span:
    before = _render(tokenizer, messages[:turn], True, where) if turn else ""
    through = _render(tokenizer, messages[: turn + 1], False, where)
    if not (through.startswith(before) and full.startswith(through)):
        raise CalibrationError(
            f"{where}: the chat template of {template_name(tokenizer)} does not render the conversation up to "
            f"assistant turn {turn} as a prefix of the whole (the template rewrites earlier turns), so the "
            "answer's tokens cannot be told apart; write the row as 'prompt' and 'completion'"
        )
    end = len(through.rstrip())
    return len(before), max(end, len(before))


def _tokens_over(offsets: Sequence[tuple[int, int]], chars: Span) -> Span | None:
    """The token range that overlaps ``chars``; ``None`` when no token does."""
    start, end = chars
    inside = [j for j, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
    return (inside[0], inside[-1] + 1) if inside else None


def tokens_of(
    tokenizer, text: str, where: str, *, offsets: bool | None = None
) -> tuple[list[int], Callable[[Span], Span | None]]:
    """The ids of ``text`` and a map from a character range to its tokens: by the
    offsets of a fast tokenizer, else (``offsets`` false; by default where the
    tokenizer is not fast) by encoding the text up to each boundary, which must give
    a prefix of the whole's ids."""
    if offsets if offsets is not None else getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mapping = encoded["offset_mapping"]
        return list(encoded["input_ids"]), lambda chars: _tokens_over(mapping, chars)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def boundary(chars: int) -> int:
        head = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if ids[: len(head)] != head:
            raise CalibrationError(
                f"{where}: the tokenizer of {template_name(tokenizer)} splits the rendered conversation "
                "differently at the start of an answer, and it is not a fast tokenizer (no offsets); "
                "load a fast tokenizer for the base"
            )
        return len(head)

    def span(chars: Span) -> Span | None:
        start, end = boundary(chars[0]), boundary(chars[1])
        return (start, end) if end > start else None

    return ids, span


def encode_chat(
    tokenizer, example: CalibrationExample, *, labelled: bool, assistant_turns: AssistantTurns
) -> EncodedRow:
    """Token ids of the rendered conversation and the ranges the objective counts.

    Unlabelled (entropy): the conversation without its closing assistant turns (they
    are ignored, as completions are) and with a generation prompt, so the position
    after the last token is the one that predicts the answer."""
    assert example.messages is not None
    require_chat_template(tokenizer, example)
    messages, where = example.messages, example.where
    if not labelled:
        while messages and messages[-1].role == ASSISTANT:
            messages = messages[:-1]
        ids = tokenizer(_render(tokenizer, messages, True, where), add_special_tokens=False)["input_ids"]
        if not ids:
            raise CalibrationError(f"{where}: the rendered conversation has no tokens")
        return EncodedRow(list(ids), len(ids))
    full = _render(tokenizer, messages, False, where)
    turns = [i for i, m in enumerate(messages) if m.role == ASSISTANT]
    if assistant_turns == "last":
        turns = turns[-1:]
    ids, span_of = tokens_of(tokenizer, full, where)
    counted = []
    for turn in turns:
        span = span_of(_answer_chars(tokenizer, messages, turn, full, where))
        if span is None:
            raise CalibrationError(f"{where}: messages[{turn}]: the assistant turn has no tokens")
        if span[0] == 0:
            raise CalibrationError(
                f"{where}: messages[{turn}]: the assistant turn starts the rendered conversation, so no "
                "position predicts its first token; put a turn before it"
            )
        counted.append(span)
    return EncodedRow(ids, counted[-1][0], tuple(counted))
