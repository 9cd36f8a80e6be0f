"""Choosing the next token of each sequence in a batch: OpenAI's sampling parameters on raw logits.

Per sequence, in this order (OpenAI's and vLLM's): logit bias, presence / frequency penalties over
the tokens generated so far, then either argmax (temperature 0: greedy) or temperature, top-k,
top-p and a draw from the sequence's own seeded generator, so a seed gives the same answer whatever
batch the sequence shares (on a given device: the generator lives with the logits). Log-probabilities
are the model's own (log-softmax of the raw logits), as vLLM reports them by default.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    seed: int | None = None  # None: a fresh random seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()  # stop strings; the answer ends before the first one
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Greedy on the raw logits: the batch can take one argmax."""
        return self.greedy and not (self.logit_bias or self.presence_penalty or self.frequency_penalty)

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


def generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """`generator` on `device`: a fresh one there with the same seed (call before its first draw)."""
    if generator is None or generator.device == device:
        return generator
    return torch.Generator(device=device).manual_seed(generator.initial_seed())


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def adjust(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None) -> torch.Tensor:
    """One sequence's (V,) logits with bias and penalties applied; `counts` = times each token was generated."""
    if not (params.logit_bias or params.presence_penalty or params.frequency_penalty):
        return logits
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token from adjusted (V,) logits, as a 0-dim tensor on their device (no host sync): argmax, or
    temperature / top-k / top-p sampling with `generator` (on the same device)."""
    if params.greedy:
        return logits.argmax()
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the token crossing the line included).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[0]


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """`sample` as a Python int."""
    return int(sample(logits, params, generator))


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], counts: list[torch.Tensor | None],
                generators: list[torch.Generator | None], index: list[int] | None = None
                ) -> tuple[list[int], list[TokenLogprob | None]]:
    """(N, V) last-position logits -> the next token of each sequence (sequence i reads row `index[i]`,
    default row i), and its logprobs where asked for.

    Everything runs on the logits' device (each sampled row with its own generator, which must live
    there too) and the chosen tokens come to the host in one small copy."""
    index = list(range(len(params))) if index is None else index
    logits = logits.float()
    chosen = logits.argmax(-1)[index]  # right for every plain-greedy row; the others are replaced below
    for i, (p, r) in enumerate(zip(params, index, strict=True)):
        if not p.plain:
            chosen[i] = sample(adjust(logits[r], p, counts[i]), p, generators[i])
    tokens = chosen.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    for i, (p, r) in enumerate(zip(params, index, strict=True)):
        if p.logprobs:
            table = torch.log_softmax(logits[r], dim=-1)
            top = torch.topk(table, min(p.top_logprobs, table.shape[-1])) if p.top_logprobs else None
            pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            logprobs[i] = TokenLogprob(tokens[i], float(table[tokens[i]]), pairs)
    return tokens, logprobs
