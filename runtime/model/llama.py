"""A compact Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) whose attention
calls an AttentionBackend instead of keeping a KV cache itself. `forward` runs one sequence's new
tokens; `forward_batch` runs the new tokens of several sequences in one step: the matrix
multiplications once over the packed tokens, attention per sequence through that sequence's backend."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import AttentionBackend
from .checkpoint import Checkpoint, layer_prefix
from .config import ModelConfig
from .packed import Linear
from .rope import apply_rope, rope_tables
from .tokenizer import Tokenizer

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v fused into one matrix and gate/up into another."""

    attention_norm: Tensor  # [hidden]
    qkv: Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: Tensor | None  # [(heads + 2 * kv_heads) * head_dim]
    out: Tensor  # [hidden, heads * head_dim]
    out_bias: Tensor | None  # [hidden]
    mlp_norm: Tensor  # [hidden]
    gate_up: Tensor  # [2 * intermediate, hidden]
    down: Tensor  # [hidden, intermediate]


@dataclass(frozen=True)
class LayerLinears:
    """The matrix multiplications of one decoder layer, over its LayerWeights (runtime.model.packed)."""

    qkv: Linear
    out: Linear
    gate_up: Linear
    down: Linear

    @classmethod
    def of(cls, layer: LayerWeights) -> LayerLinears:
        return cls(Linear(layer.qkv, layer.qkv_bias), Linear(layer.out, layer.out_bias), Linear(layer.gate_up),
                   Linear(layer.down))


@dataclass(frozen=True)
class StepInput:
    """One sequence's part of a batched step: its new tokens (a prefill chunk or one decode token)."""

    token_ids: Tensor  # [n] int64
    positions: Tensor  # [n] int64, consecutive, continuing what `kv` holds
    kv: AttentionBackend  # the sequence's KV cache
    last_only: bool = False  # logits for the last token only (a prefill chunk whose other rows nobody reads)


class Model:
    """A decoder ready to run: `forward(token_ids, positions, kv)` returns next-token logits.

    Attributes: `config` (ModelConfig, with its `fingerprint`), `tokenizer`, `fingerprint`, `dtype`,
    `device`. Build one with `runtime.load_model`."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype!r}")
        self.config: ModelConfig = checkpoint.config.with_fingerprint(checkpoint.digest, dtype)
        self.tokenizer: Tokenizer = checkpoint.tokenizer
        self.dtype = dtype
        self.device = torch.device(device)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model only {self.config.vocab_size}")
        tensors = checkpoint.tensors

        def weight(name: str) -> Tensor:
            return tensors[name].to(device=self.device, dtype=dtype)

        def fused(*names: str) -> Tensor | None:
            found = [tensors.get(name) for name in names]
            if all(t is None for t in found):
                return None
            # A missing bias among present ones is a zero bias.
            parts = [t if t is not None else torch.zeros(self._bias_size(n)) for t, n in zip(found, names)]
            return torch.cat([p.to(dtype) for p in parts]).to(self.device)

        cfg = self.config
        self.layers: list[LayerWeights] = []
        for layer in range(cfg.num_layers):
            p = layer_prefix(layer)
            self.layers.append(LayerWeights(
                attention_norm=weight(p + "input_layernorm.weight"),
                qkv=fused(*(p + f"self_attn.{x}_proj.weight" for x in "qkv")),
                qkv_bias=fused(*(p + f"self_attn.{x}_proj.bias" for x in "qkv")),
                out=weight(p + "self_attn.o_proj.weight"),
                out_bias=weight(p + "self_attn.o_proj.bias") if p + "self_attn.o_proj.bias" in tensors else None,
                mlp_norm=weight(p + "post_attention_layernorm.weight"),
                gate_up=fused(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=weight(p + "mlp.down_proj.weight"),
            ))
        self.embedding = weight("model.embed_tokens.weight")  # [vocab, hidden]
        self.lm_head = self.embedding if cfg.tie_word_embeddings else weight("lm_head.weight")  # [vocab, hidden]
        self.final_norm = weight("model.norm.weight")
        self._linears = [LayerLinears.of(layer) for layer in self.layers]
        self._vocab = Linear(self.lm_head)
        self.cos, self.sin = rope_tables(cfg, dtype, self.device)  # each [max_positions, head_dim]
        self._q_size = cfg.num_heads * cfg.head_dim
        self._kv_size = cfg.num_kv_heads * cfg.head_dim
        self._qk_v_sizes = [self._q_size + self._kv_size, self._kv_size]

    @property
    def fingerprint(self) -> str:
        """Hash of architecture, shape, weights and dtype: salts every shareable KV block key."""
        return self.config.fingerprint

    def _bias_size(self, name: str) -> int:
        return self.config.num_heads * self.config.head_dim if ".q_proj." in name else self.config.num_kv_heads * self.config.head_dim

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.config.rms_norm_eps)
        # Low precision: normalize in fp32, scale in the model's dtype, as Hugging Face's LlamaRMSNorm does.
        return weight * F.rms_norm(x.float(), weight.shape, None, self.config.rms_norm_eps).to(x.dtype)

    def check_token_ids(self, token_ids: Tensor) -> None:
        """ValueError unless every id of `token_ids` ([n] int64, n >= 1) is in the vocabulary."""
        vocab = self.config.vocab_size
        if token_ids.numel() == 1:
            lowest_id = highest_id = int(token_ids[0])
        else:
            lowest_id, highest_id = (int(v) for v in torch.aminmax(token_ids))
        if lowest_id < 0 or highest_id >= vocab:
            bad = lowest_id if lowest_id < 0 else highest_id
            raise ValueError(f"token ids must be in [0, {vocab}), got {bad}")

    def check_inputs(self, token_ids: Tensor, positions: Tensor, kv: AttentionBackend) -> None:
        """Raise TypeError/ValueError unless the inputs are what `forward` expects."""
        for name, tensor in (("token_ids", token_ids), ("positions", positions)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype != torch.int64:
                raise TypeError(f"{name} must be int64, got {tensor.dtype}")
            if tensor.dim() != 1 or tensor.numel() == 0:
                raise ValueError(f"{name} must have shape [n] with n >= 1, got {list(tensor.shape)}")
        if positions.shape != token_ids.shape:
            raise ValueError(f"positions {list(positions.shape)} and token_ids {list(token_ids.shape)} must have the same shape")
        if not callable(getattr(kv, "attend", None)):
            raise TypeError(f"kv must be an AttentionBackend (with attend()), got {type(kv).__name__}")
        n, limit = token_ids.numel(), self.config.max_position_embeddings
        self.check_token_ids(token_ids)
        if n == 1:
            first = last = int(positions[0])
        else:
            first, last = int(positions[0]), int(positions[-1])
            if not torch.equal(positions, torch.arange(first, first + n, device=positions.device)):
                raise ValueError("positions must be consecutive (the new tokens continue one sequence)")
        if first < 0:
            raise ValueError(f"positions must be >= 0, got {first}")
        if last >= limit:
            raise ValueError(f"a context of {last + 1} tokens exceeds this model's maximum of {limit} "
                             f"(max_position_embeddings)")

    def forward(self, token_ids: Tensor, positions: Tensor, kv: AttentionBackend) -> Tensor:
        """Logits for the next token after each of `token_ids`.

        token_ids, positions: [n] int64 (positions contiguous, continuing what `kv` holds). `kv` receives
        each layer's new keys and values and computes attention. Returns [n, vocab] float32."""
        return self.forward_batch([StepInput(token_ids, positions, kv)])[0]

    @torch.inference_mode()
    def forward_batch(self, parts: Sequence[StepInput]) -> list[Tensor]:
        """One step over several sequences (continuous batching): their new tokens are packed, every
        matrix multiplication runs once over all of them, and attention runs per sequence over that
        sequence's own KV (ragged: the sequences may hold any number of tokens).

        Returns, per part, its logits: [n, vocab] float32, or [1, vocab] for its last token when
        `last_only`. Every part is checked before any work; an error in a backend's attention ends
        the step with some layers of some parts appended (their callers truncate them)."""
        if not parts:
            raise ValueError("forward_batch needs at least one StepInput")
        for part in parts:
            self.check_inputs(part.token_ids, part.positions, part.kv)
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        sizes = [part.token_ids.numel() for part in parts]
        bounds = [0, *itertools.accumulate(sizes)]  # part i's rows are bounds[i]:bounds[i + 1]
        if len(parts) == 1:
            token_ids, positions = parts[0].token_ids.to(self.device), parts[0].positions.to(self.device)
        else:
            token_ids = torch.cat([part.token_ids for part in parts]).to(self.device)  # [n]
            positions = torch.cat([part.positions for part in parts]).to(self.device)  # [n]
        n = token_ids.numel()
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # each [n, 1, head_dim]
        x = self.embedding[token_ids]  # [n, hidden]
        for index, (layer, linear) in enumerate(zip(self.layers, self._linears)):
            h = self._norm(x, layer.attention_norm)
            qk, v = linear.qkv(h).split(self._qk_v_sizes, dim=1)  # [n, (heads + kv_heads) * head_dim], [n, kv_heads * head_dim]
            qk = apply_rope(qk.view(n, heads + kv_heads, head_dim), cos, sin).transpose(0, 1)  # [heads + kv_heads, n, head_dim]
            v = v.view(n, kv_heads, head_dim).transpose(0, 1)  # [kv_heads, n, head_dim]
            attended = torch.cat([  # [heads, n, head_dim]: each sequence over its own cache
                part.kv.attend(index, qk[:heads, a:b], qk[heads:, a:b], v[:, a:b], positions[a:b])
                for part, a, b in zip(parts, bounds, bounds[1:])
            ], dim=1) if len(parts) > 1 else parts[0].kv.attend(index, qk[:heads], qk[heads:], v, positions)
            x = x + linear.out(attended.transpose(0, 1).reshape(n, self._q_size))
            gate, up = linear.gate_up(self._norm(x, layer.mlp_norm)).chunk(2, dim=-1)  # each [n, intermediate]
            x = x + linear.down(F.silu(gate) * up)
        if any(part.last_only for part in parts):  # the vocabulary projection only for rows someone reads
            rows = [(b - 1, b) if part.last_only else (a, b) for part, a, b in zip(parts, bounds, bounds[1:])]
            x = torch.cat([x[a:b] for a, b in rows])
            sizes = [b - a for a, b in rows]
        logits = self._vocab(self._norm(x, self.final_norm)).float()  # [rows, vocab]
        return list(logits.split(sizes)) if len(parts) > 1 else [logits]

    __call__ = forward
