"""How a prompt is cut into pieces for prefill, by position alone.

A prompt is prefilled in pieces of at most `chunk` tokens whose boundaries sit at multiples of
`chunk` (0: the whole prompt in one piece). Fixing the boundaries by position makes a prompt
computed the same way whatever runs beside it, and makes every cached prefix end on a
boundary, where a request that reuses it would have cut its own prompt anyway: so fused
equals solo, with or without prefix hits.
"""

from __future__ import annotations

import dataclasses

from flover_jax.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class PromptPiece:
    """Tokens [start, start + len(tokens)) of the prompt of the request in `slot`."""

    slot: int
    tokens: list[int]
    start: int
    final: bool  # the piece ends the prompt: its request samples its first token
    params: SamplingParams

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def piece_end(start: int, prompt_len: int, chunk: int) -> int:
    """Where the piece of a prompt of prompt_len tokens that starts at `start` ends."""
    return prompt_len if chunk == 0 else min(prompt_len, (start // chunk + 1) * chunk)


def cacheable_len(prompt_len: int, chunk: int) -> int:
    """The longest prefix of a prompt that the prefix cache holds or reuses: whole pieces,
    always short of the last token (whose logits give the first output token)."""
    return 0 if chunk == 0 else (prompt_len - 1) // chunk * chunk


def shared_len(a: list[int], b: list[int], chunk: int, limit: int) -> int:
    """The longest opening of whole pieces (at most `limit` tokens) that prompts a and b share."""
    end = 0
    while end + chunk <= limit and a[end : end + chunk] == b[end : end + chunk]:
        end += chunk
    return end
