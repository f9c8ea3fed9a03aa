"""The unit of storage: a key naming one block, and the block's keys and values."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_NAMESPACE_CHARS = 256


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Names one block: `block_size` consecutive tokens of one layer of one sequence.

    `namespace` names a sequence, or for shareable prefix blocks a content hash salted with the
    model fingerprint. It is an opaque label: no layer below may use it as a path.
    """

    namespace: str
    layer: int
    index: int
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str):
            raise TypeError(f"BlockKey.namespace must be str, got {type(self.namespace).__name__}")
        if not self.namespace or len(self.namespace) > MAX_NAMESPACE_CHARS:
            raise ValueError(
                f"BlockKey.namespace must have 1..{MAX_NAMESPACE_CHARS} characters, "
                f"got {len(self.namespace)}"
            )
        if not self.namespace.isprintable():
            raise ValueError(f"BlockKey.namespace must be printable text, got {self.namespace!r}")
        for name in ("layer", "index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BlockKey.{name} must be int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"BlockKey.{name} must be >= 0, got {value}")
        object.__setattr__(self, "_hash", hash((self.namespace, self.layer, self.index)))

    def __hash__(self) -> int:  # keys are hashed on every store operation: compute it once
        return self._hash


@dataclass(frozen=True, slots=True)
class KVBlock:
    """Keys and values of up to `block_tokens` consecutive tokens of one layer.

    keys, values: [kv_heads, tokens, head_dim], same dtype (fp16, bf16 or fp32) and device.
    """

    keys: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"KVBlock.{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 3:
                raise ValueError(
                    f"KVBlock.{name} must have shape [kv_heads, tokens, head_dim], "
                    f"got {tuple(tensor.shape)}"
                )
            if tensor.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"KVBlock.{name} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {tensor.dtype}"
                )
            if min(tensor.shape) == 0:
                raise ValueError(f"KVBlock.{name} must not be empty, got shape {tuple(tensor.shape)}")
        if self.keys.shape != self.values.shape:
            raise ValueError(
                f"KVBlock keys and values must have the same shape, "
                f"got {tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )
        if self.keys.dtype != self.values.dtype:
            raise TypeError(
                f"KVBlock keys and values must have the same dtype, got {self.keys.dtype} and {self.values.dtype}"
            )
        if self.keys.device != self.values.device:
            raise ValueError(
                f"KVBlock keys and values must be on the same device, "
                f"got {self.keys.device} and {self.values.device}"
            )

    @classmethod
    def trusted(cls, keys: torch.Tensor, values: torch.Tensor) -> KVBlock:
        """A block from tensors the caller guarantees valid (views of a checked block); no checks."""
        block = object.__new__(cls)
        object.__setattr__(block, "keys", keys)
        object.__setattr__(block, "values", values)
        return block

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KVBlock:
        return KVBlock.trusted(
            self.keys.to(device, non_blocking=non_blocking),
            self.values.to(device, non_blocking=non_blocking),
        )

    def clone(self) -> KVBlock:
        return KVBlock.trusted(self.keys.clone(), self.values.clone())

    def equal(self, other: KVBlock) -> bool:
        """Bit-exact equality of shape, dtype and contents."""
        return (
            self.keys.shape == other.keys.shape
            and self.dtype == other.dtype
            and torch.equal(self.keys.cpu(), other.keys.cpu())
            and torch.equal(self.values.cpu(), other.values.cpu())
        )


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """The shape every block of one store shares; fixed by the store's first put."""

    kv_heads: int
    block_tokens: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_nbytes(self) -> int:
        """Bytes of keys plus values of one full block."""
        return 2 * self.kv_heads * self.block_tokens * self.head_dim * self.dtype.itemsize

    def check(self, block: KVBlock) -> None:
        """Raise ValueError/TypeError unless `block` fits this layout (it may be partial)."""
        if (block.kv_heads, block.head_dim) != (self.kv_heads, self.head_dim):
            raise ValueError(
                f"block has kv_heads={block.kv_heads}, head_dim={block.head_dim}; this store holds "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}"
            )
        if block.dtype != self.dtype:
            raise TypeError(f"block dtype {block.dtype} differs from this store's {self.dtype}")
        if block.tokens > self.block_tokens:
            raise ValueError(
                f"block has {block.tokens} tokens; at most block_tokens={self.block_tokens} expected"
            )
