"""Mode name -> Mode: the one definition of the weight-residency modes (FlexInfer and its baselines).

Each mode is a handful of named properties; the planner and the engine read the
properties and never compare mode names, so a new mode is one line here. All modes
run the same forward pass and give the same greedy tokens; they differ only in
which bytes stay in memory and when the rest is read.

  resident   what stays in the locked arena:
               "all"          every tensor (nothing streams)
               "balanced"     an equal share of every stage (balanced locking), the rest streams
               "first-stages" whole stages, the first ones first, the rest streams (no balance)
               "none"         nothing beyond the window's slots
  policy     which tensors of a stage are kept first: "ffn", "attn", "mixed" (the same fraction
             of each), or None: the caller's --policy ("auto" = the measured cost model decides)
  window     stages read ahead of compute: None = the caller's --window, 1 = read a stage only
             when compute needs it (no overlap of I/O and compute)
  page_cache True: weights are views of an mmap of the file and the kernel's page cache decides
             what is in memory (llama.cpp's way): no arena, no reads of ours
  expert_cache  mixture-of-experts models: whether the budget the layers leave keeps experts cached
             (else every expert a token uses is read when it is needed)
  predict    mixture-of-experts models: whether the next layer's experts are predicted (its router
             applied to this layer's input) and read ahead of their use
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParameterError

POLICIES = ("auto", "ffn", "attn", "mixed")


@dataclass(frozen=True)
class Mode:
    name: str
    resident: str  # "all" | "balanced" | "first-stages" | "none"
    policy: str | None = None
    window: int | None = None
    page_cache: bool = False
    expert_cache: bool = True
    predict: bool = True
    summary: str = ""

    @property
    def reads(self) -> bool:
        """Whether weights are read by flexio's reader while generating (else all are in memory or mapped)."""
        return self.resident != "all" and not self.page_cache

    @property
    def locks_beyond_window(self) -> bool:
        """Whether the mode keeps a share of the weights resident (so a budget that holds the whole model
        keeps it all); the "none" baselines stream everything whatever the budget."""
        return self.resident != "none"

    @property
    def overlaps(self) -> bool:
        """Whether reads overlap compute (a prefetch window), as the cost model predicts it."""
        return self.window != 1


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("memory", "all", summary="every tensor resident in the locked arena"),
    Mode("flexinfer", "balanced", summary="balanced locking + flexible preservation (policy) + prefetch window"),
    Mode("no-preserve", "balanced", policy="mixed", summary="balanced locking, the same fraction of every tensor"),
    Mode("no-balance", "first-stages", policy="ffn", summary="whole layers locked (the first ones), the rest prefetched"),
    Mode("prefetch-only", "none", policy="ffn", expert_cache=False,
         summary="nothing locked beyond the window, prefetched"),
    Mode("no-prefetch", "balanced", window=1, predict=False,
         summary="balanced + preservation, each stage read when needed"),
    Mode("sync", "none", policy="ffn", window=1, expert_cache=False, predict=False,
         summary="nothing locked, each stage read when needed, no overlap"),
    Mode("mmap", "all", page_cache=True, summary="views of an mmap of the file: the page cache decides (llama.cpp)"),
    # mixture-of-experts ablations (on a dense model they are flexinfer)
    Mode("no-predict", "balanced", predict=False, summary="flexinfer, experts read only once the router picked them"),
    Mode("no-cache", "balanced", expert_cache=False, summary="flexinfer, no expert stays cached between tokens"),
)}


def mode(name: str | Mode) -> Mode:
    """A mode by name; raises ParameterError naming the known ones."""
    if isinstance(name, Mode):
        return name
    m = MODES.get(name)
    if m is None:
        raise ParameterError(f"unknown mode {name!r} (one of: {', '.join(MODES)})", param="mode")
    return m
