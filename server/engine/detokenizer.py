"""Incremental detokenization with stop strings, for streaming.

Text is decoded from a sliding window of recent tokens (the ``prefix_offset`` /
``read_offset`` technique of TGI and vLLM): ``decode(ids[prefix:])`` minus
``decode(ids[prefix:read])`` is the new text, so decoders that depend on
context (SentencePiece's leading-space rule) stay right without re-decoding
the whole output. New text whose decode ends with U+FFFD (a character whose
bytes span tokens) is held back until the character completes, or until
``finish()``.

Stop strings are searched in the decoded text, across token boundaries. Text
that could still be the start of a stop string (the longest suffix that is a
proper prefix of one) is held back, so a stop string is never streamed in
part. On a match the text is cut before it (or after it with
``include_stop_str_in_output``) and nothing more is emitted.

``text`` is always the concatenation of every delta returned. Without stop
strings and without a prompt context, the final text equals
``tokenizer.decode(all_ids, skip_special_tokens)``; with ``prompt_token_ids``
the first output token is decoded in the prompt's context (vLLM's
behaviour), which only differs for decoders with a leading-space rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bitserve.sampling_params import SamplingParams
from bitserve.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 6  # prompt tokens decoded as context for the first output token


@dataclass
class DetokenizerUpdate:
    text_delta: str  # new text, safe to stream now
    stop: str | None = None  # the stop string that matched: finish with reason "stop", stop_reason = this
    num_tokens: int = 0  # of the tokens given, how many count (all, or up to the one that completed the stop)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_token_ids: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.include_stop = params.include_stop_str_in_output
        self.stops = list(params.stop)
        self.min_tokens = params.min_tokens  # stop strings count only in text of later tokens (vLLM v1)
        # byte-fallback tokens: their text depends on the tokens around them (see _add_at_once)
        self._byte_ids: frozenset[int] = getattr(tokenizer, "byte_token_ids", frozenset())
        self.num_tokens = 0  # output tokens added so far
        self.stop_reason: str | None = None  # the matched stop string, once matched
        self.finished = False
        self._pieces: list[str] = []  # the deltas returned (joined when ``text`` is read)
        self._text_len = 0
        # The complete text decoded so far (text + held-back part) is only kept from char
        # _tail_start on: what is not streamed yet, and the last chars a stop string could start in,
        # so that a step's work does not grow with the length of the output.
        self._tail = ""
        self._tail_start = 0
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._ids: list[int] = self._prompt_context(list(prompt_token_ids or []))
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids) if self._ids else ""

    @property
    def text(self) -> str:
        """The concatenation of all deltas returned."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    # -- helpers -----------------------------------------------------------------------
    @property
    def _decoded_len(self) -> int:
        return self._tail_start + len(self._tail)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _prompt_context(self, prompt: list[int]) -> list[int]:
        """The last few prompt tokens, or none when the prompt ends inside a character."""
        tail = prompt[-_PROMPT_CONTEXT:]
        if tail and self._decode(tail).endswith(_REPLACEMENT):
            return []  # the output would be decoded as completing the prompt's character
        return tail

    def _holdback(self) -> int:
        """Length of the longest suffix of the decoded text that is a proper prefix of a stop string."""
        text, best = self._tail, 0  # (the tail holds at least the longest stop's length - 1 chars)
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _find_stop(self, old_len: int, tail: str | None = None) -> tuple[int, str] | None:
        """Earliest stop string ending after ``old_len`` chars of the decoded text (ties: list
        order), as (char index, stop). ``tail``: the decoded text from ``_tail_start`` on (default:
        ``_tail``)."""
        tail = self._tail if tail is None else tail
        best = None
        for stop in self.stops:
            idx = tail.find(stop, max(0, old_len - len(stop) + 1 - self._tail_start))
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        return None if best is None else (best[0] + self._tail_start, best[1])

    def _emit(self, old_len: int, final: bool) -> DetokenizerUpdate:
        """Emit what is safe after the decoded text grew from ``old_len`` chars. Stop strings are
        looked for once more than ``min_tokens`` tokens were generated, in the text that is new
        since (vLLM v1: a stop string completed earlier does not end the request later)."""
        searching = self.stops and self.num_tokens > self.min_tokens
        decoded_len = self._decoded_len
        hit = self._find_stop(old_len) if searching and decoded_len > old_len else None
        if hit is not None:
            idx, stop = hit
            end = idx + len(stop) if self.include_stop else idx
            self.stop_reason = stop
            self.finished = True
        elif final:
            end = decoded_len
        else:
            end = decoded_len - self._holdback()
        delta = ""
        if end > self._text_len:
            delta = self._tail[self._text_len - self._tail_start:end - self._tail_start]
            self._pieces.append(delta)
            self._text_len += len(delta)
        # drop what is streamed and lies before the last chars a stop string could start in
        start = min(self._text_len, decoded_len - self._keep)
        if start > self._tail_start:
            self._tail = self._tail[start - self._tail_start:]
            self._tail_start = start
        return DetokenizerUpdate(delta, self.stop_reason if hit is not None else None)

    # -- API ----------------------------------------------------------------------------
    def add_tokens(self, token_ids: Sequence[int], stop_terminated: bool = False) -> DetokenizerUpdate:
        """Add newly sampled tokens; returns the text that may be streamed now, and how many of
        the tokens count (several tokens can come at once, and a stop string can end in any).

        ``stop_terminated``: the last token ended the request (eos or a stop token
        id); its text is left out unless ``include_stop_str_in_output`` (vLLM v1).
        The caller still calls :meth:`finish` afterwards.
        """
        if self.finished:
            return DetokenizerUpdate("")
        token_ids = [int(t) for t in token_ids]
        given = len(token_ids)
        if stop_terminated and token_ids and not self.include_stop:
            token_ids = token_ids[:-1]
        if len(token_ids) > 1:
            update = self._add_at_once(token_ids, given)
            if update is not None:
                return update
        delta, stop = [], None
        for i, tok in enumerate(token_ids):
            self._ids.append(tok)
            self.num_tokens += 1
            new_text = self._decode(self._ids[self._prefix:])
            if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
                continue  # nothing new yet, or a character still incomplete
            old_len = self._decoded_len
            self._tail += new_text[len(self._prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix:self._read])
            update = self._emit(old_len, final=False)
            delta.append(update.text_delta)
            if update.stop is not None:
                stop, given = update.stop, i + 1  # tokens after the stop string's end do not count
                break
        return DetokenizerUpdate("".join(delta), stop, given)

    def _add_at_once(self, token_ids: list[int], given: int) -> DetokenizerUpdate | None:
        """Several tokens (a delta that queued up while its consumer was busy) with two decodes
        instead of two per token, when that gives what adding them one at a time gives: no byte-
        fallback token among them (a run of those decodes as one, so where a decode window starts
        changes their text), no U+FFFD in the text (an invalid or unfinished character), and no
        stop string that may end the request. Else None, with nothing changed (the caller adds
        them one at a time)."""
        if self._byte_ids and not self._byte_ids.isdisjoint(token_ids):
            return None
        ids, before = self._ids, len(self._ids)
        ids.extend(token_ids)
        new_text = self._decode(ids[self._prefix:])
        decoded = None
        if len(new_text) > len(self._prefix_text) and _REPLACEMENT not in new_text:
            decoded = self._tail + new_text[len(self._prefix_text):]
            if (self.stops and self.num_tokens + len(token_ids) > self.min_tokens
                    and self._find_stop(self._decoded_len, decoded) is not None):
                # a stop string in the new text: one token at a time finds which token completes it
                # (and whether min_tokens lets it count). Without one anywhere in the new text, no
                # token's part of it has one either.
                decoded = None
        if decoded is None:
            del ids[before:]
            return None
        old_len = self._decoded_len
        self._tail = decoded
        self.num_tokens += len(token_ids)
        self._prefix, self._read = self._read, len(ids)
        self._prefix_text = self._decode(ids[self._prefix:self._read])
        update = self._emit(old_len, final=False)  # holds back a possible start of a stop string
        return DetokenizerUpdate(update.text_delta, None, given)

    def finish(self) -> str:
        """Flush the held-back text when the request ends (for a reason other than a stop string).

        Returns the last delta. A stop string completed by the flushed text still
        cuts it (``stop_reason`` is then set).
        """
        if self.finished:
            return ""
        old_len = self._decoded_len
        if self._read < len(self._ids):
            new_text = self._decode(self._ids[self._prefix:])
            if len(new_text) > len(self._prefix_text):
                self._tail += new_text[len(self._prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
        update = self._emit(old_len, final=True)
        self.finished = True
        return update.text_delta
