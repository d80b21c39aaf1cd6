"""Prompt syntax as AUTOMATIC1111's web UI reads it: emphasis, BREAK, and prompts longer than one text window.

    (word)  x1.1    ((word))  x1.21    (word:1.3)  x1.3    [word]  /1.1    \\( \\) \\[ \\] \\\\  literal characters
    BREAK   ends the current chunk (the next text starts a new one)

Unclosed brackets weigh everything after them (as if closed at the end); a stray closing bracket, or
`:1.3)` with no `(` open, is literal text. BREAK inside brackets is still a break (in the web UI it turns into
the word "BREAK" with a negative weight, which no one means). A weight that is not a number is an InputError
(the web UI raises a Python ValueError).

Long prompts (CLIP): the tokens are cut into chunks of 75, each encoded on its own as BOS + 75 tokens (padded
with EOS) + EOS = 77, and the chunks' embeddings are concatenated along the sequence (context length 77 * k).
When a chunk fills and a comma lies within its last 20 tokens, the text after that comma moves to the next
chunk (the web UI's default `comma_padding_backtrack` of 20). Models whose text encoder has one fixed window
(LDM-BERT) take one chunk: a prompt that does not fit is an InputError, never cut silently.

Emphasis as the web UI's default ("Original"): each token's embedding times its weight, then the whole
(1, 77, D) chunk rescaled so that its mean equals the unweighted mean. (The web UI takes that mean over the
batch of prompts it encodes together; here it is per prompt and chunk, which is the same for one prompt.)

Plain Python: the tokenizer is any object with `encode_plain(texts) -> [[ids]]`, `bos_id`, `eos_id`, `pad_id`,
`max_length` and `token_id(token)` (ldmrt/tokenizer.py); `emphasized` works on the tensor it is given.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from .errors import InputError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = 75  # between BOS and EOS
COMMA_BACKTRACK = 20  # tokens: how far back from a full chunk's end a comma may be to split after it
CLIP_COMMA = ",</w>"

# One match per syntactic element: escapes, lone backslash, openings, weighted and plain closings, text, colon.
_ELEMENT = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Piece(NamedTuple):
    text: str
    weight: float
    is_break: bool = False


class Chunk(NamedTuple):
    ids: list[int]  # the text encoder's window: BOS, tokens padded with EOS/PAD, EOS
    weights: list[float]  # one per id; 1.0 for BOS, EOS and padding
    fixes: tuple[tuple[int, str], ...] = ()  # (offset in ids, trigger word): rows from a textual-inversion file


def parse(prompt: str) -> list[Piece]:
    """The prompt as runs of text of one weight, with BREAK markers; adjacent runs of equal weight merged."""
    pieces: list[list] = []  # [text, weight, is_break], weights multiplied in place as brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def weigh_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    for m in _ELEMENT.finditer(prompt):
        element, weight = m.group(0), m.group(1)
        if element.startswith("\\"):  # an escaped character; a lone backslash is dropped, as in the web UI
            pieces.append([element[1:], 1.0, False])
        elif element == "(":
            open_round.append(len(pieces))
        elif element == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            weigh_from(open_round.pop(), _weight(weight, prompt))
        elif element == ")" and open_round:
            weigh_from(open_round.pop(), ROUND_MULTIPLIER)
        elif element == "]" and open_square:
            weigh_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, a stray closing bracket, a colon
            for i, part in enumerate(_BREAK.split(element)):
                if i:
                    pieces.append(["BREAK", 1.0, True])
                pieces.append([part, 1.0, False])
    for start in open_round:  # unclosed brackets weigh to the end
        weigh_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        weigh_from(start, SQUARE_MULTIPLIER)
    merged: list[Piece] = []
    for text, weight, is_break in pieces or [["", 1.0, False]]:
        if merged and not is_break and not merged[-1].is_break and merged[-1].weight == weight:
            merged[-1] = Piece(merged[-1].text + text, weight)
        else:
            merged.append(Piece(text, weight, is_break))
    return merged


def _weight(text: str, prompt: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"the emphasis weight {text!r} in prompt {prompt!r} is not a number: write e.g. (word:1.2), "
                         f"or \\( and \\) for literal brackets") from None


def chunks(prompt: str, tokenizer, *, long: bool = True, embeddings: dict[str, int] | None = None) -> list[Chunk]:
    """The prompt's text-encoder windows. long=False: exactly one window, or an InputError naming the overflow.

    embeddings: {trigger word: vector count} of textual-inversion embeddings (long windows only). Where a trigger's
    token ids stand in the prompt, that many placeholder ids take their place, recorded in the chunk's `fixes`;
    an embedding does not straddle two chunks (as in the web UI; unlike it, comma backtracking moves fixes along).
    """
    pieces = parse(prompt)
    texts = [p.text for p in pieces if not p.is_break]
    encoded = iter(tokenizer.encode_plain(texts) if texts else [])
    if not long:
        return [_single_window(prompt, pieces, encoded, tokenizer)]
    windows = _Windows(tokenizer)
    triggers = _trigger_ids(embeddings or {}, tokenizer)
    for piece in pieces:
        if piece.is_break:
            windows.close()
            continue
        tokens, position = next(encoded), 0
        while position < len(tokens):
            windows.make_room(tokens[position])
            match = next((t for t in triggers if tokens[position:position + len(t[1])] == t[1]), None)
            if match is None:
                windows.add([tokens[position]], piece.weight)
                position += 1
            else:
                name, trigger, vectors = match
                windows.add_embedding(name, vectors, piece.weight)
                position += len(trigger)
    return windows.finish()


class _Windows:
    """The windows of a long prompt as they fill, by the web UI's rules (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.comma = tokenizer, tokenizer.token_id(CLIP_COMMA)
        self.done: list[Chunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, str]] = []  # (index in ids, trigger word)
        self.last_comma = -1  # index in ids of the last comma of the window being filled

    def close(self) -> None:
        t, pad = self.tokenizer, CHUNK_TOKENS - len(self.ids)
        self.done.append(Chunk([t.bos_id, *self.ids, *[t.eos_id] * pad, t.eos_id],
                               [1.0, *self.weights, *[1.0] * pad, 1.0],
                               tuple((at + 1, name) for at, name in self.fixes)))  # +1: offsets count from BOS
        self.ids, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def make_room(self, token: int) -> None:
        """Before `token` goes in: a full window closes, after its last comma when one is within reach."""
        if token == self.comma:
            self.last_comma = len(self.ids)
        elif len(self.ids) == CHUNK_TOKENS and self.last_comma != -1 and \
                len(self.ids) - self.last_comma <= COMMA_BACKTRACK:
            keep = self.last_comma + 1  # the comma stays; what follows it opens the next window
            moved = self.ids[keep:], self.weights[keep:], [(at - keep, n) for at, n in self.fixes if at >= keep]
            del self.ids[keep:], self.weights[keep:]
            self.fixes = [(at, n) for at, n in self.fixes if at < keep]
            self.close()
            self.ids, self.weights, self.fixes = list(moved[0]), list(moved[1]), moved[2]
        if len(self.ids) == CHUNK_TOKENS:
            self.close()

    def add(self, ids: list[int], weight: float) -> None:
        self.ids += ids
        self.weights += [weight] * len(ids)

    def add_embedding(self, name: str, vectors: int, weight: float) -> None:
        """Placeholders for a textual-inversion embedding's rows (the host puts them in); it never straddles."""
        if len(self.ids) + vectors > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.ids), name))
        self.add([self.tokenizer.eos_id] * vectors, weight)

    def finish(self) -> list[Chunk]:
        if self.ids or not self.done:
            self.close()
        return self.done


def _trigger_ids(embeddings: dict[str, int], tokenizer) -> list[tuple[str, list[int], int]]:
    """(trigger word, its token ids, vector count), longest ids first, so that the longest trigger matches."""
    found = []
    for name, vectors in embeddings.items():
        if not 0 < vectors <= CHUNK_TOKENS:
            raise InputError(f"the embedding {name!r} has {vectors} vectors; a prompt chunk holds {CHUNK_TOKENS}")
        (ids,) = tokenizer.encode_plain([name])
        if ids:
            found.append((name, ids, vectors))
    return sorted(found, key=lambda t: -len(t[1]))


def _single_window(prompt: str, pieces: list[Piece], encoded, tokenizer) -> Chunk:
    if any(p.is_break for p in pieces):
        raise InputError("BREAK starts a new chunk of a long prompt, which this model's text encoder (one fixed "
                         "window) does not take: remove it")
    ids, weights = [], []
    for piece in pieces:
        tokens = next(encoded)
        ids += tokens
        weights += [piece.weight] * len(tokens)
    room = tokenizer.max_length - 2
    if len(ids) > room:
        raise InputError(f"the prompt is {len(ids)} tokens long; this model's text encoder takes at most {room} "
                         f"(it has no long-prompt chunking): shorten it by {len(ids) - room} tokens")
    pad = room - len(ids)
    return Chunk([tokenizer.bos_id, *ids, tokenizer.eos_id, *[tokenizer.pad_id] * pad],
                 [1.0, *weights, 1.0, *[1.0] * pad])


def emphasized(z, weights: list[float]):
    """z (1, L, D) with each token's embedding times its weight, rescaled to the unweighted mean (the web UI's
    "Original" emphasis). Unweighted chunks are returned as they are (the rescale would be x1.0 anyway)."""
    if all(w == 1.0 for w in weights):
        return z
    original_mean = z.mean()
    z = z * z.new_tensor(weights)[None, :, None]
    return z * (original_mean / z.mean())
