"""Capture a real model's attention as a policies.trace.Trace: the queries of each decode step and
layer, every key, and the true attention mass per block, for `tiered experiment`."""

from __future__ import annotations

import torch
from torch import Tensor

from policies.importance.tensors import block_mass
from policies.trace import Trace
from policies.trace.format import attention_logits

from .model import DenseKV, Model


class RecordingKV:
    """DenseKV that, while `recording`, keeps each layer's single query and its attention per block."""

    def __init__(self, model: Model, block_tokens: int, capacity_tokens: int) -> None:
        self.dense = DenseKV.for_model(model, capacity_tokens=capacity_tokens)
        self.block_tokens = block_tokens
        self.scale = model.config.head_dim**-0.5
        self.recording = False
        self.queries: list[list[Tensor]] = [[] for _ in range(model.config.num_layers)]  # each [heads, head_dim]
        self.masses: list[list[Tensor]] = [[] for _ in range(model.config.num_layers)]  # each [heads, blocks]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        out = self.dense.attend(layer, q, k, v, positions)
        if self.recording:
            query = q[:, -1].float()  # [heads, head_dim]
            weights = torch.softmax(attention_logits(query, self.dense.keys(layer), self.scale), dim=-1)  # [heads, tokens]
            self.queries[layer].append(query)
            self.masses[layer].append(block_mass(weights, self.block_tokens))
        return out


@torch.inference_mode()
def capture_trace(
    model: Model, prompt: list[int], steps: int, observe_steps: int = 8, block_tokens: int = 64, chunk_tokens: int = 512
) -> Trace:
    """Prefill `prompt`, feeding its last `observe_steps` tokens one at a time, then decode `steps`
    greedy tokens; record the query and attention mass of every one-token step and layer."""
    if not 0 <= observe_steps < len(prompt):
        raise ValueError(f"observe_steps must be in [0, {len(prompt)}), got {observe_steps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = len(prompt) + steps
    if total > model.config.max_position_embeddings:
        raise ValueError(f"{total} tokens exceed the model's maximum of {model.config.max_position_embeddings}")
    kv = RecordingKV(model, block_tokens, capacity_tokens=total)
    head = len(prompt) - observe_steps
    for i in range(0, head, chunk_tokens):
        logits = model.forward(torch.tensor(prompt[i : min(i + chunk_tokens, head)]), torch.arange(i, min(i + chunk_tokens, head)), kv)
    kv.recording = True
    fed = prompt[head:]
    position = head
    tokens = []
    while len(tokens) < observe_steps + steps:
        token = fed[len(tokens)] if len(tokens) < observe_steps else int(logits[-1].argmax())
        logits = model.forward(torch.tensor([token]), torch.tensor([position]), kv)
        position += 1
        tokens.append(position)
    layers = model.config.num_layers
    blocks = -(-position // block_tokens)
    mass = torch.zeros(len(tokens), layers, model.config.num_heads, blocks)  # [steps, layers, heads, blocks]
    for layer in range(layers):
        for step, step_mass in enumerate(kv.masses[layer]):
            mass[step, layer, :, : step_mass.shape[1]] = step_mass
    return Trace(
        query=torch.stack([torch.stack(kv.queries[layer]) for layer in range(layers)], dim=1),  # [steps, layers, heads, head_dim]
        keys=torch.stack([kv.dense.keys(layer).float() for layer in range(layers)]),  # [layers, kv_heads, tokens, head_dim]
        tokens=torch.tensor(tokens, dtype=torch.int64),
        block_mass=mass,
        block_tokens=block_tokens,
        scale=kv.scale,
        observe_steps=observe_steps,
        info={"source": f"captured from {model.config.architecture} {model.fingerprint[:12]}", "prompt_tokens": len(prompt)},
    )
