"""Per-request token sampling with TensorRT-LLM's parameter conventions.

Each request in a batch has its own settings and its own ``torch.Generator``, so a row is sampled on its own:
what else is in the batch never changes the random stream a seeded request draws from. The generator lives on the
logits' device (a CUDA generator's stream differs from a CPU one's for the same seed).

Conventions (as in TensorRT-LLM): ``temperature == 0`` is greedy (exact argmax, no randomness), ``top_k == 0``
and ``top_p == 1`` (or ``0``) switch those filters off.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from ragstack.contracts.errors import InvalidInput


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling_params(temperature: float, top_k: int, top_p: float, seed: Optional[int]) -> None:
    """Raise InvalidInput for values no sampler can honour."""
    # numbers.* rather than int/float: values often arrive as numpy scalars from Triton tensors.
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidInput(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_integer(top_k) or top_k < 0:
        raise InvalidInput(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _is_real(top_p) or not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1] (1 or 0 = off), got {top_p!r}")
    if seed is not None and (not _is_integer(seed) or not 0 <= seed < 2 ** 64):
        raise InvalidInput(f"seed must be an integer in [0, 2**64), got {seed!r}")


def make_generator(seed: Optional[int], device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A private random stream on ``device``: seeded for reproducibility, or freshly random (a default Generator
    would hand every unseeded request the same fixed seed)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        seed = int(seed)
        # manual_seed takes a signed 64-bit value; fold the unsigned range TensorRT-LLM accepts onto it.
        generator.manual_seed(seed - 2 ** 64 if seed >= 2 ** 63 else seed)
    return generator


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator) -> int:
    """Pick the next token from one row of logits (shape [vocab]; already masked by any grammar)."""
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(logits))
    scores = logits.float() / temperature
    if 0 < top_k < scores.numel():
        kth_best = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if 0 < top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(0, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---- penalties (TensorRT-LLM's tensorrt_llm inputs of the same names) ------------------------------------------

def check_penalty_params(repetition_penalty: float, presence_penalty: float, frequency_penalty: float,
                         min_tokens: int, len_penalty: float) -> None:
    """Raise InvalidInput for penalty values TensorRT-LLM would reject."""
    if not _is_real(repetition_penalty) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise InvalidInput(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                        ("len_penalty", len_penalty)):
        if not _is_real(value) or not math.isfinite(value):
            raise InvalidInput(f"{name} must be a finite number (0 = off), got {value!r}")
    if not _is_integer(min_tokens) or min_tokens < 0:
        raise InvalidInput(f"min_tokens must be an integer >= 0 (0 = off), got {min_tokens!r}")


def has_penalties(repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                  min_tokens: int = 0, len_penalty: float = 0.0) -> bool:
    """Whether any penalty changes a token's logit (len_penalty never does at beam width 1, as in TensorRT-LLM,
    where it only rescores finished beams)."""
    return repetition_penalty != 1.0 or presence_penalty != 0.0 or frequency_penalty != 0.0 or min_tokens > 0


def token_counts(token_ids, vocab_size: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """How often each vocabulary id occurs in ``token_ids`` (float32, shape [vocab_size])."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=device)
    return torch.bincount(ids, minlength=vocab_size)[:vocab_size].float()


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, *, repetition_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> torch.Tensor:
    """Penalise the tokens already in the sequence (``counts``: occurrences per id over prompt and output, as
    TensorRT-LLM counts them), in TensorRT-LLM's order and formulas, on one row of logits (returned, new tensor):

    * repetition: a seen token's logit ``l`` becomes ``l / p`` when ``l > 0``, else ``l * p``;
    * presence: a seen token's logit drops by ``presence_penalty``, once;
    * frequency: a token's logit drops by ``frequency_penalty`` times its count.

    Applied to the raw logits before temperature (at temperature 1, or greedy, the same as TensorRT-LLM, which
    scales by temperature first; for temperature t its additive penalties equal these times t)."""
    out = logits.float().clone()
    seen = counts > 0
    if repetition_penalty != 1.0:
        penalised = torch.where(out > 0, out / repetition_penalty, out * repetition_penalty)
        out = torch.where(seen, penalised, out)
    if presence_penalty != 0.0:
        out = out - seen.float() * presence_penalty
    if frequency_penalty != 0.0:
        out = out - counts * frequency_penalty
    return out


def suppress_end(logits: torch.Tensor, end_ids, generated: int, min_tokens: int) -> torch.Tensor:
    """``min_tokens``: while fewer than that many tokens were generated, the end ids cannot be sampled (in
    place on ``logits``; returned for chaining)."""
    if generated < min_tokens:
        for end_id in end_ids:
            if 0 <= end_id < logits.shape[-1]:
                logits[..., end_id] = float("-inf")
    return logits
