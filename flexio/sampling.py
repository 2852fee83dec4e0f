"""Logits -> next token id: greedy, or seeded temperature / top-k / top-p sampling.

Non-finite logits (a file with huge weight scales can overflow to inf, and inf - inf
is NaN): greedy keeps the argmax (numpy's: the first NaN if there is one, else the
largest), as a reference run would. Temperature sampling refuses them with a
NumericalError naming the step: a distribution over NaN means nothing, and sampling
quietly from the finite rest would hide a broken model behind plausible text. -inf
alone is fine (probability 0), as long as one logit is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import NumericalError, ParameterError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax of the raw logits, as llama.cpp's reference)
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise ParameterError(f"temperature: expected a number >= 0 (0 = greedy), got {self.temperature!r}",
                                 param="temperature")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ParameterError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}", param="top_k")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ParameterError(f"top_p: expected a number in (0, 1] (1 = off), got {self.top_p!r}", param="top_p")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ParameterError(f"seed: expected an integer >= 0, got {self.seed!r}", param="seed")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.steps = 0  # tokens sampled so far

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        self.steps += 1
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64)
        nan, posinf = int(np.isnan(z).sum()), int(np.isposinf(z).sum())
        if nan or posinf or not np.isfinite(z).any():
            raise NumericalError(
                f"the model produced non-finite logits at generation step {self.steps} ({nan} NaN, {posinf} +inf, "
                f"{int(np.isneginf(z).sum())} -inf of {z.size}): cannot sample at temperature {p.temperature}; "
                "the weights are probably corrupt or out of range"
            )
        idx = np.arange(z.size)
        if 0 < p.top_k < z.size:
            idx = np.argpartition(-z, p.top_k - 1)[: p.top_k]
        idx = idx[np.argsort(-z[idx], kind="stable")]
        with np.errstate(over="ignore"):
            zz = z[idx] / p.temperature
        if not np.isfinite(zz[0]):  # a temperature so small that the top logit overflowed: greedy
            return int(idx[0])
        probs = np.exp(zz - zz[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(idx[self.rng.choice(idx.size, p=probs)])
