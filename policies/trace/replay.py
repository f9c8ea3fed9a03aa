"""Replay: run importance estimators × prefetch policies × budgets over a trace, and measure them.

For every budget and estimator, each step and layer goes through `sparse_step`, the KV
manager's sparse step (runtime/kv/sparse.py) on a trace: the estimator scores the blocks from
the query and the key bounds, `select_per_head` keeps, per KV head, the sinks + window + that
head's own top-k within the budget, each head's queries attend over their KV head's kept blocks,
and the estimator is updated with what that attention saw (`feedback="kept"`: softmax over each
head's kept tokens only, as sparse attention computes it; `"all"`: the full attention, as exact
mode computes it). A trace block is the runtime's selection grain, its page. The first
`trace.observe_steps` steps (the prompt's tail) are not scored and always feed the full
attention, as prefill computes it.

Measures, averaged over scored steps and layers:
- mass_recall  the true attention mass (trace.block_mass) each head's kept blocks hold, averaged over heads;
- topk_recall  the fraction of the best possible selection (per KV head: sinks + window + the
               blocks of highest true mass of its group, same budget) that was kept; the oracle scores 1.0;
- hit_rate     the fraction of read blocks (the union of the heads' kept blocks, as the runtime
               reads them) already on the device when attention needed them.
               The device holds, per layer, what attention read last time plus what the prefetch
               policy requested since (a block requested before the attention that reads it is in
               time); the newest block was just written there;
- demand_blocks, prefetched_blocks, bytes_moved   blocks fetched on a miss, blocks moved by
               prefetch, and both in bytes (fp16 keys and values of a full block each).
The oracle is given the recorded block mass (placed on each block's first token), so that it
scores the truth itself rather than a recomputation of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..importance import IMPORTANCE, ImportanceEstimator, make_importance
from ..importance.select import select_per_head
from ..importance.tensors import group_heads
from ..prefetch import PREFETCH, PrefetchView, make_prefetch
from .format import Trace
from .threads import one_thread

COLUMNS = (
    "importance",
    "prefetch",
    "budget",
    "budget_blocks",
    "mass_recall",
    "topk_recall",
    "hit_rate",
    "demand_blocks",
    "prefetched_blocks",
    "bytes_moved",
    "steps",
    "layers",
)


@dataclass(frozen=True)
class ReplayConfig:
    """What to replay. Budgets are fractions of the context: budget_blocks = ceil(budget · blocks)."""

    importance: tuple[str, ...] = tuple(IMPORTANCE)
    prefetch: tuple[str, ...] = tuple(PREFETCH)
    budgets: tuple[float, ...] = (0.125, 0.25, 0.5)
    sink_blocks: int = 1
    window_blocks: int = 2
    feedback: str = "kept"
    importance_kwargs: dict[str, dict] = field(default_factory=dict)
    element_bytes: int = 2

    def __post_init__(self) -> None:
        for kind, names, registry in (
            ("importance", self.importance, IMPORTANCE),
            ("prefetch", self.prefetch, PREFETCH),
        ):
            if not names:
                raise ValueError(f"ReplayConfig.{kind} must name at least one policy")
            unknown = [n for n in names if n not in registry]
            if unknown:
                raise ValueError(f"unknown {kind} policies {unknown}; valid names: {sorted(registry)}")
        if not self.budgets or any(
            isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1 for b in self.budgets
        ):
            raise ValueError(f"ReplayConfig.budgets must be fractions in (0, 1], got {self.budgets}")
        if self.feedback not in ("kept", "all"):
            raise ValueError(f"ReplayConfig.feedback must be 'kept' or 'all', got {self.feedback!r}")
        for name in ("sink_blocks", "window_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ReplayConfig.{name} must be an int >= 0, got {value!r}")
        unknown = [n for n in self.importance_kwargs if n not in IMPORTANCE]
        if unknown:
            raise ValueError(
                f"ReplayConfig.importance_kwargs names unknown estimators {unknown}; valid names: {sorted(IMPORTANCE)}"
            )


@dataclass
class _Frame:
    """What replay precomputes for one step and layer, shared by every run."""

    query: torch.Tensor  # [heads, head_dim]
    key_min: torch.Tensor  # [blocks, kv_heads, head_dim]
    key_max: torch.Tensor
    logits: torch.Tensor  # [heads, tokens]
    mass: torch.Tensor  # [heads, blocks], recorded
    truth_scores: torch.Tensor  # [kv_heads, blocks], each KV head's group's true mass, what the oracle ranks by


@dataclass
class _Tally:
    mass: float = 0.0
    topk: float = 0.0
    frames: int = 0
    needed: int = 0
    hits: int = 0
    demand: int = 0
    prefetched: int = 0
    budget_blocks: int = 0


def replay(
    trace: Trace, config: ReplayConfig | None = None, progress: Callable[[int], None] | None = None
) -> list[dict]:
    """One row per (importance, budget, prefetch) with the columns in COLUMNS.

    `progress(n)` is called after each n steps × layers replayed (for a progress bar); the total
    is len(budgets) · len(importance) · trace.steps · trace.layers.
    """
    config = config or ReplayConfig()
    if not isinstance(trace, Trace):
        raise TypeError(f"replay expects a Trace, got {type(trace).__name__}")
    with one_thread():
        return _replay(trace, config, progress)


def _replay(trace: Trace, config: ReplayConfig, progress: Callable[[int], None] | None) -> list[dict]:
    frames = [[_frame(trace, step, layer) for layer in range(trace.layers)] for step in range(trace.steps)]
    rows = []
    for budget in config.budgets:
        best = _best_selections(trace, frames, budget, config)
        for name in config.importance:
            kwargs = {"block_tokens": trace.block_tokens, **config.importance_kwargs.get(name, {})}
            if name == "quest":
                kwargs.setdefault("scale", trace.scale)
            estimators = [make_importance(name, **kwargs) for _ in range(trace.layers)]
            tallies = _run(trace, frames, best, estimators, budget, config, progress)
            for prefetch, tally in tallies.items():
                rows.append(_row(trace, config, name, prefetch, budget, tally))
    return rows


def _frame(trace: Trace, step: int, layer: int) -> _Frame:
    key_min, key_max = trace.key_bounds(step, layer)
    mass = trace.mass(step, layer)
    truth = group_heads(mass, trace.kv_heads, "sum")  # [kv_heads, blocks], what the oracle ranks by
    return _Frame(trace.query[step, layer].float(), key_min, key_max, trace.logits(step, layer), mass, truth)


def _best_selections(
    trace: Trace, frames: list[list[_Frame]], budget: float, config: ReplayConfig
) -> list[list[torch.Tensor]]:
    """Per step and layer, the blocks of highest true mass each KV head can keep at this budget:
    [kv_heads, blocks] bool."""
    best = []
    for step in range(trace.steps):
        budget_blocks = math.ceil(budget * trace.blocks_at(step))
        best.append(
            [
                _as_mask(
                    select_per_head(
                        frame.truth_scores,
                        budget_blocks=budget_blocks,
                        sink_blocks=config.sink_blocks,
                        window_blocks=config.window_blocks,
                    ),
                    frame.truth_scores.shape[1],
                )
                for frame in frames[step]
            ]
        )
    return best


def _as_mask(keep: torch.Tensor, blocks: int) -> torch.Tensor:
    """[kv_heads, kept] indices -> [kv_heads, blocks] bool."""
    mask = torch.zeros(keep.shape[0], blocks, dtype=torch.bool)
    mask.scatter_(1, keep, True)
    return mask


def sparse_step(
    estimator: ImportanceEstimator,
    query: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    logits: torch.Tensor,
    *,
    budget_blocks: int,
    sink_blocks: int,
    window_blocks: int,
    kept_feedback: bool = True,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's decode step as runtime/kv/sparse.py takes it, on recorded tensors.

    query [heads, head_dim]; key_min, key_max [blocks, kv_heads, head_dim] (a block here is the
    runtime's page); logits [heads, tokens], scale · q·k. The estimator scores, select_per_head
    chooses each KV head's blocks, and the estimator is updated with the attention of each head
    over its KV head's kept tokens (`kept_feedback`) or over every token. `weights` is what an
    estimator that `needs_weights` (oracle) scores by. Returns (keep [kv_heads, kept] ascending,
    the scores [kv_heads, blocks] it chose from).
    """
    scores = estimator.score(query, key_min, key_max, weights=weights)  # [kv_heads, blocks]
    keep = select_per_head(
        scores.cpu(), budget_blocks=budget_blocks, sink_blocks=sink_blocks, window_blocks=window_blocks
    )
    estimator.update(query, _feedback(logits, keep, key_min.shape[0], estimator.block_tokens, kept_feedback))
    return keep, scores


def _run(
    trace: Trace,
    frames: list[list[_Frame]],
    best_selections: list[list[torch.Tensor]],
    estimators: list[ImportanceEstimator],
    budget: float,
    config: ReplayConfig,
    progress: Callable[[int], None] | None,
) -> dict[str, _Tally]:
    policies = {name: make_prefetch(name) for name in config.prefetch}
    resident = {name: [set() for _ in range(trace.layers)] for name in policies}  # block indices on the device
    tallies = {name: _Tally() for name in policies}
    protect = {"sink_blocks": config.sink_blocks, "window_blocks": config.window_blocks}
    for step in range(trace.steps):
        scored = step >= trace.observe_steps
        blocks = trace.blocks_at(step)
        budget_blocks = math.ceil(budget * blocks)
        for layer in range(trace.layers):
            frame, estimator = frames[step][layer], estimators[layer]
            oracle_weights = _mass_as_weights(frame.mass, trace.block_tokens) if estimator.needs_weights else None
            keep, _ = sparse_step(
                estimator, frame.query, frame.key_min, frame.key_max, frame.logits,
                budget_blocks=budget_blocks, **protect,
                kept_feedback=scored and config.feedback == "kept", weights=oracle_weights,
            )  # fmt: skip
            needed = set(torch.unique(keep).tolist())  # the blocks the runtime reads: every head's, joined
            for name, tally in tallies.items():
                on_device = resident[name][layer] | {blocks - 1}
                hits = len(needed & on_device)
                if scored:
                    tally.needed += len(needed)
                    tally.hits += hits
                    tally.demand += len(needed) - hits
                resident[name][layer] = set(needed)
            if scored:
                best = best_selections[step][layer]  # [kv_heads, blocks] bool
                group = frame.mass.shape[0] // keep.shape[0]
                mass_recall = frame.mass.gather(1, keep.repeat_interleave(group, 0)).sum().item() / frame.mass.shape[0]
                topk_recall = best.gather(1, keep).sum().item() / best.sum().item()
                for tally in tallies.values():
                    tally.mass += mass_recall
                    tally.topk += topk_recall
                    tally.frames += 1
                    tally.budget_blocks += budget_blocks
            next_scores = None
            if "topk" in policies:
                next_scores = estimator.block_scores(
                    estimator.score(frame.query, frame.key_min, frame.key_max, weights=oracle_weights)
                )
            following = frames[step][layer + 1] if layer + 1 < trace.layers else None
            view = PrefetchView(
                layer=layer,
                layers=trace.layers,
                blocks=blocks,
                query=frame.query,
                next_key_min=None if following is None else following.key_min,
                next_key_max=None if following is None else following.key_max,
                block_scores=next_scores,
                budget_blocks=budget_blocks,
                max_blocks=budget_blocks,
                scale=trace.scale,
                **protect,
            )
            for name, policy in policies.items():
                for request in policy.plan(view):
                    target = resident[name][request.layer]
                    new = set(request.indices) - target
                    if scored:
                        tallies[name].prefetched += len(new)
                    target |= new
        if progress is not None:
            progress(trace.layers)
    return tallies


def _mass_as_weights(mass: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """[heads, blocks] mass as [heads, blocks · block_tokens] weights, each block's on its first token."""
    heads, blocks = mass.shape
    weights = torch.zeros(heads, blocks, block_tokens)  # [heads, blocks, block_tokens]
    weights[:, :, 0] = mass
    return weights.view(heads, -1)


def _feedback(
    logits: torch.Tensor, keep: torch.Tensor, blocks: int, block_tokens: int, kept_only: bool
) -> torch.Tensor:
    """The attention weights [heads, tokens] a step sees: each head's over its KV head's kept
    blocks (keep [kv_heads, kept]), or over every token."""
    if not kept_only:
        return torch.softmax(logits, -1)
    heads, tokens = logits.shape
    kept = _as_mask(keep, blocks)  # [kv_heads, blocks]
    visible = kept.repeat_interleave(block_tokens, 1)[:, :tokens].repeat_interleave(heads // keep.shape[0], 0)
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)  # [heads, tokens]


def _row(trace: Trace, config: ReplayConfig, importance: str, prefetch: str, budget: float, tally: _Tally) -> dict:
    frames = max(tally.frames, 1)
    block_nbytes = trace.block_nbytes(config.element_bytes)
    return {
        "importance": importance,
        "prefetch": prefetch,
        "budget": budget,
        "budget_blocks": tally.budget_blocks / frames,
        "mass_recall": tally.mass / frames,
        "topk_recall": tally.topk / frames,
        "hit_rate": tally.hits / max(tally.needed, 1),
        "demand_blocks": tally.demand,
        "prefetched_blocks": tally.prefetched,
        "bytes_moved": (tally.demand + tally.prefetched) * block_nbytes,
        "steps": trace.steps - trace.observe_steps,
        "layers": trace.layers,
    }


def summarize(rows: Sequence[dict], metric: str, prefetch: str = "none") -> dict[tuple[str, float], float]:
    """{(importance, budget): metric} over the rows of one prefetch policy (recall does not depend on it)."""
    return {(r["importance"], r["budget"]): r[metric] for r in rows if r["prefetch"] == prefetch}
