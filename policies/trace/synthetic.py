"""A synthetic trace with the structure real models show, made from real query and key vectors.

Nothing here writes attention directly: keys and queries are built, RoPE is applied, and the
attention mass is the softmax of their dot products. The structure comes from where the
vectors point:
- **sinks** — the first token's key has a large component along a sink direction that every
  query shares (StreamingLLM's attention sinks);
- **local windows** — every key and query carries the same vector in the mid-frequency RoPE
  channels, so q·k there is Σ_i |p_i|² cos(θ_i · distance): large for nearby tokens only;
- **recurring heavy hitters** — a few scattered tokens point along heavy directions that the
  queries switch on and off periodically (H2O's heavy hitters);
- **topic drift** — the prompt is a run of segments, each about one topic; the decode queries
  follow one topic per phase and move to another at each phase boundary, and the new tokens
  are about the current topic.
Semantic directions live in the lowest RoPE frequencies, which barely rotate over the context
(as real models keep their content channels). Each layer's directions are a perturbation of the
previous layer's, so consecutive layers look alike, as InfiniGen observes of real models.
Query heads mix these components with their own weights, so heads of a group differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..importance.tensors import check_positive_int
from .format import Trace, mass_from_vectors
from .threads import one_thread


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and strengths of a synthetic trace. Logit strengths are after the softmax scale."""

    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    block_tokens: int = 16
    prompt_tokens: int = 1024
    steps: int = 64  # decode steps, scored by replay
    observe_steps: int = 8  # queries of the prompt's last tokens, which only warm the estimators up
    topics: int = 6
    segment_tokens: tuple[int, int] = (24, 80)  # a topic segment's length, drawn uniformly
    phase_steps: int = 16  # decode steps per topic (topic drift)
    heavy_tokens: int = 12
    heavy_directions: int = 3
    rope_base: float = 500000.0
    sink_logit: float = 7.5
    topic_logit: float = 2.6
    heavy_logit: float = 5.0
    local_logit: float = 5.0
    local_tokens: int = 64  # the local pattern uses the RoPE pairs turning at least once per local_tokens
    key_noise: float = 0.15  # standard deviation of every key channel around its structure
    query_noise: float = 1.0  # standard deviation of every query channel around its structure
    layer_drift: float = 0.5  # how far each layer's directions move from the previous layer's
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(
            "SyntheticConfig",
            layers=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            block_tokens=self.block_tokens,
            prompt_tokens=self.prompt_tokens,
            steps=self.steps,
            topics=self.topics,
            local_tokens=self.local_tokens,
            phase_steps=self.phase_steps,
            heavy_directions=self.heavy_directions,
        )
        if self.heads % self.kv_heads:
            raise ValueError(f"SyntheticConfig.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 16:
            raise ValueError(f"SyntheticConfig.head_dim must be a multiple of 16, got {self.head_dim}")
        if not 0 <= self.observe_steps < self.prompt_tokens:
            raise ValueError(f"SyntheticConfig.observe_steps must be in 0..prompt_tokens-1, got {self.observe_steps}")
        if 1 + self.topics + self.heavy_directions > self.head_dim // 4:
            raise ValueError(
                "SyntheticConfig: 1 + topics + heavy_directions must fit in head_dim // 4 semantic channels"
            )
        low, high = self.segment_tokens
        if not 0 < low <= high:
            raise ValueError(
                f"SyntheticConfig.segment_tokens must be (low, high) with 0 < low <= high, got {self.segment_tokens}"
            )


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding, Llama's half-split layout: x [..., n, head_dim], positions [n]."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) / half)  # [half]
    angles = positions.double()[:, None] * freqs[None]  # [n, half]
    cos, sin = angles.cos().float(), angles.sin().float()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], -1)


def synthetic_trace(config: SyntheticConfig | None = None) -> Trace:
    """A Trace drawn from `config` (seeded: the same config gives the same trace)."""
    with one_thread():
        return _synthetic_trace(config or SyntheticConfig())


def _synthetic_trace(c: SyntheticConfig) -> Trace:
    g = torch.Generator().manual_seed(c.seed)
    scale = 1 / math.sqrt(c.head_dim)
    directions, pattern = _directions(c, g)
    topic, heavy, step_topic, info = _contents(c, g)
    tokens = torch.cat(  # [steps]: the observed prompt tail, then one more token per decode step
        [
            torch.arange(c.prompt_tokens - c.observe_steps + 1, c.prompt_tokens + 1),
            c.prompt_tokens + 1 + torch.arange(c.steps),
        ]
    )
    keys, query = _vectors(c, g, directions, pattern, topic, heavy, step_topic, tokens, scale)
    mass = mass_from_vectors(query, keys, tokens, c.block_tokens, scale)
    info = {"source": "synthetic", "generator": "policies.trace.synthetic", "config": asdict(c), **info}
    return Trace(query, keys, tokens, mass, c.block_tokens, scale, c.observe_steps, info)


def _directions(c: SyntheticConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """directions [layers, kv_heads, 1 + topics + heavy_directions, head_dim], pattern [layers, kv_heads, head_dim]."""
    half = c.head_dim // 2
    # Channels: pair i of the rotary layout is channels (i, i + half), turning at base^(-i/half).
    # The slowest quarter carries meaning; the pairs turning faster than 1/local_tokens carry the
    # local pattern; the pairs between carry noise only.
    semantic_pairs = torch.arange(half - c.head_dim // 8, half)
    turning = c.rope_base ** (-torch.arange(half, dtype=torch.float64) / half) * c.local_tokens >= 1
    local_pairs = torch.arange(half)[turning & (torch.arange(half) < semantic_pairs[0])]
    semantic = torch.cat([semantic_pairs, semantic_pairs + half])

    # Directions per layer and KV head: sink, topics, heavy, in the semantic channels (orthonormal
    # within a layer): directions [layers, kv_heads, n_dirs, head_dim]. The local pattern has the
    # same length in every fast pair, so q·k there is the mean of cos(θ_i · distance) over the
    # pairs: 1 at distance 0, falling off over ~1/θ_slowest tokens. pattern [layers, kv_heads, head_dim]
    n_dirs = 1 + c.topics + c.heavy_directions
    directions = torch.zeros(c.layers, c.kv_heads, n_dirs, c.head_dim)
    pattern = torch.zeros(c.layers, c.kv_heads, c.head_dim)
    base = torch.randn(c.kv_heads, semantic.numel(), n_dirs, generator=g)
    angle = 2 * math.pi * torch.rand(c.kv_heads, local_pairs.numel(), generator=g)  # of each pair's 2-D vector
    for layer in range(c.layers):
        if layer:
            base = base + c.layer_drift * torch.randn(base.shape, generator=g)
            angle = angle + c.layer_drift * torch.randn(angle.shape, generator=g)
        directions[layer, :, :, semantic] = torch.linalg.qr(base).Q.transpose(1, 2)
        pattern[layer, :, local_pairs] = angle.cos() / math.sqrt(local_pairs.numel())
        pattern[layer, :, local_pairs + half] = angle.sin() / math.sqrt(local_pairs.numel())
    return directions, pattern


def _contents(c: SyntheticConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """What each token is about: topic [tokens] in 0..topics-1, heavy [tokens] a direction or -1;
    the topic of each step's query, step_topic [steps]; and the layout, for the trace's info."""
    total = c.prompt_tokens + c.steps
    topic = torch.empty(total, dtype=torch.int64)
    segments = []  # [start, tokens, topic] of each prompt segment
    start = 1
    while start < c.prompt_tokens:
        length = min(
            int(torch.randint(c.segment_tokens[0], c.segment_tokens[1] + 1, (1,), generator=g)), c.prompt_tokens - start
        )
        segments.append([start, length, int(torch.randint(c.topics, (1,), generator=g))])
        topic[start : start + length] = segments[-1][2]
        start += length
    phases = -(-c.steps // c.phase_steps)
    phase_topic = [int(topic[c.prompt_tokens - 1])]  # the prompt ends on the first phase's topic
    for _ in range(phases - 1):
        phase_topic.append(
            int((phase_topic[-1] + 1 + torch.randint(c.topics - 1, (1,), generator=g)) % c.topics)
            if c.topics > 1
            else 0
        )
    step_topic = torch.tensor(
        [phase_topic[0]] * c.observe_steps + [phase_topic[s // c.phase_steps] for s in range(c.steps)]
    )
    topic[c.prompt_tokens :] = step_topic[c.observe_steps :]
    topic[0] = phase_topic[0]
    heavy = torch.full((total,), -1, dtype=torch.int64)
    heavy_at = 1 + torch.randperm(c.prompt_tokens - 1, generator=g)[: c.heavy_tokens]
    heavy[heavy_at] = torch.arange(heavy_at.numel()) % c.heavy_directions
    info = {"phase_topics": phase_topic, "segments": segments, "heavy_positions": sorted(heavy_at.tolist())}
    return topic, heavy, step_topic, info


def _vectors(
    c: SyntheticConfig,
    g: torch.Generator,
    directions: torch.Tensor,
    pattern: torch.Tensor,
    topic: torch.Tensor,
    heavy: torch.Tensor,
    step_topic: torch.Tensor,
    tokens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [layers, kv_heads, tokens, head_dim] and queries [steps, layers, heads, head_dim], RoPE applied."""
    total, steps = c.prompt_tokens + c.steps, c.observe_steps + c.steps
    # A key's component along a direction has length key_amp, the query's logit · q_amp, so that
    # their product times the softmax scale is the logit; each head mixes them by 0.5..1.5.
    mix = 0.5 + torch.rand(c.layers, c.heads, 4, generator=g)  # [layers, heads, (sink, topic, heavy, local)]
    key_amp = math.sqrt(1 / scale)  # length of a key component along a direction
    q_amp = 1 / (key_amp * scale)  # query length per unit of logit: logit · q_amp · key_amp · scale = logit

    # keys: [layers, kv_heads, total, head_dim]
    keys = c.key_noise * torch.randn(c.layers, c.kv_heads, total, c.head_dim, generator=g)
    keys += key_amp * pattern[:, :, None, :]
    relevance = 0.6 + 0.8 * torch.rand(total, generator=g)  # how strongly each token is about its topic
    keys += key_amp * relevance[None, None, :, None] * directions[:, :, 1 + topic, :]
    is_heavy = heavy >= 0
    keys[:, :, is_heavy] += key_amp * directions[:, :, 1 + c.topics + heavy[is_heavy], :]
    keys[:, :, 0] += key_amp * directions[:, :, 0, :]
    keys = rope(keys, torch.arange(total), c.rope_base)

    # queries: [steps, layers, heads, head_dim], step s at position tokens[s] - 1
    period = 6 + 18 * torch.rand(c.heavy_directions, generator=g)  # steps per on/off cycle of each heavy direction
    phase = 2 * math.pi * torch.rand(c.heavy_directions, generator=g)
    active = (
        torch.cos(2 * math.pi * torch.arange(steps)[:, None] / period + phase) > 0
    ).float()  # [steps, heavy_directions]
    heavy_level = 0.4 + 0.6 * active
    kv_of_head = torch.arange(c.heads) // (c.heads // c.kv_heads)
    d = directions[:, kv_of_head]  # [layers, heads, n_dirs, head_dim]
    query = c.query_noise * torch.randn(steps, c.layers, c.heads, c.head_dim, generator=g)
    query += q_amp * c.sink_logit * mix[None, :, :, 0, None] * d[None, :, :, 0]
    query += q_amp * c.topic_logit * mix[None, :, :, 1, None] * d[:, :, 1 + step_topic].permute(2, 0, 1, 3)
    heavy_dirs = d[:, :, 1 + c.topics :]  # [layers, heads, heavy_directions, head_dim]
    query += q_amp * c.heavy_logit * mix[None, :, :, 2, None] * torch.einsum("sj,lhjd->slhd", heavy_level, heavy_dirs)
    query += q_amp * c.local_logit * mix[None, :, :, 3, None] * pattern[None, :, kv_of_head]
    query = rope(query.transpose(0, 2), tokens - 1, c.rope_base).transpose(0, 2).contiguous()
    return keys, query
