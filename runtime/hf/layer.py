"""TieredLayer: one full-attention layer of a transformers `Cache`, kept as blocks in a TieredStore.

It has the shape of transformers' `DynamicLayer` (`lazy_initialization`, `update`, `get_seq_length`,
`get_mask_sizes`, `crop`, the batch operations), but the keys and values of every row live in the
store's blocks: the partial last block of a row is private (`BlockKey(row namespace, layer, index)`),
and with batch size 1 the full blocks whose token ids the cache knows are sealed under content keys
(tiered.content), shared with every other cache and session of the same model. `update` returns the
whole history read back from the store: device blocks as they are, lower-tier blocks decoded where
they lie, so the returned K/V equal a DynamicLayer's whenever the codecs are raw. When the model's
attention is runtime.hf.attention's ("tiered"), a one-token step returns the new token marked as
standing for the history instead, and that attention reads the blocks in the store.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import CacheLayerMixin

from tiered import BlockKey, KVBlock, TieredStore
from tiered.content import content_key, is_content_key

from .attention import ATTENTION, defer
from .sparse import SparseRows


@dataclass
class SequenceState:
    """What the layers of one cache share: the store, the private namespace prefix and the content
    digests of the full blocks whose token ids are known (batch size 1 only)."""

    store: TieredStore
    prefix: str
    text_config: object = None  # the model's text config, when known: its attention implementation
    sparse: SparseRows | None = None  # sparse decode steps (under the "tiered" attention only)
    digests: list[bytes] = field(default_factory=list)
    serial: itertools.count = field(default_factory=itertools.count)

    @property
    def attention_reads_store(self) -> bool:
        """Whether the model's attention is runtime.hf.attention's, which reads blocks where they lie."""
        return getattr(self.text_config, "_attn_implementation", None) == ATTENTION

    def new_namespace(self) -> str:
        return f"{self.prefix}.{next(self.serial)}"

    @property
    def block_tokens(self) -> int:
        return self.store.config.block_tokens


@dataclass
class Row:
    """One batch row's blocks in order; all but the last are full."""

    namespace: str
    keys: list[BlockKey] = field(default_factory=list)


class TieredLayer(CacheLayerMixin):
    """A full-attention cache layer over a TieredStore. K/V in and out: [batch, kv_heads, seq, head_dim].

    Rows of a batch (left padding included) are stored as separate private sequences; only a batch of
    one seals content-addressed blocks. Beam search and contrastive search reorder rows by reference:
    full blocks are shared between rows, only the partial last block is copied.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, state: SequenceState, layer_idx: int) -> None:
        super().__init__()
        self.state = state
        self.layer_idx = layer_idx
        self.tokens = 0  # tokens held per row (rows are always equally long)
        self.rows: list[Row] = []
        self.users: Counter[BlockKey] = Counter()  # rows listing each key (rows share keys after a reorder)

    def __repr__(self) -> str:
        return f"TieredLayer(layer={self.layer_idx}, rows={len(self.rows)}, tokens={self.tokens})"

    # -- the CacheLayerMixin contract ------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record device, dtype and shape from the first K/V ([batch, kv_heads, seq, head_dim])."""
        self._check_states(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        layout = self.state.store.layout
        if layout is not None and (layout.kv_heads, layout.head_dim, layout.dtype) != (heads, dim, key_states.dtype):
            raise ValueError(
                f"layer {self.layer_idx}: the store holds blocks of kv_heads={layout.kv_heads}, head_dim="
                f"{layout.head_dim}, dtype={layout.dtype}; this model gives kv_heads={heads}, head_dim={dim}, "
                f"dtype={key_states.dtype}: use a store made for this model"
            )
        if self.rows and len(self.rows) != batch:
            raise ValueError(f"layer {self.layer_idx} holds {len(self.rows)} rows; got a batch of {batch}")
        if not self.rows:
            self.rows = [Row(self.state.new_namespace()) for _ in range(batch)]
        self.device, self.dtype = key_states.device, key_states.dtype
        self.kv_heads, self.head_dim = heads, dim
        # Empty stand-ins, so code that looks at a layer's keys/values finds the right dtype and device.
        self.keys = torch.empty(0, dtype=self.dtype, device=self.device)
        self.values = torch.empty(0, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' K/V ([batch, kv_heads, new, head_dim]) and return every cached token's:
        two [batch, kv_heads, seq_length, head_dim] tensors that belong to the caller. No gradient flows
        through them: this is a cache for inference, as the store's blocks are. Under the "tiered"
        attention, one new token per row returns those K/V marked for this layer instead
        (runtime.hf.attention.defer): the attention reads the history from the store."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._check_states(key_states, value_states)
            if tuple(key_states.shape[:2]) + (key_states.shape[3],) != (len(self.rows), self.kv_heads, self.head_dim):
                raise ValueError(
                    f"layer {self.layer_idx}: expected K/V of shape [{len(self.rows)}, {self.kv_heads}, seq, "
                    f"{self.head_dim}], got {tuple(key_states.shape)}"
                )
            if key_states.dtype != self.dtype:
                raise TypeError(f"layer {self.layer_idx}: expected {self.dtype} K/V, got {key_states.dtype}")
        if self.state.sparse is not None and not self.state.attention_reads_store:
            raise ValueError(
                f"a sparse TieredCache needs the model's attention set to {ATTENTION!r}: "
                f"model.set_attn_implementation({ATTENTION!r}) (it picks the pages each step reads)"
            )
        with torch.no_grad():  # an inference cache: stored K/V carry no autograd history
            self._append(key_states.detach(), value_states.detach())
            if key_states.shape[2] == 1 and self.state.attention_reads_store:
                return defer(key_states, self)  # a decode step: the "tiered" attention reads the blocks
            return self.read_all()

    def get_seq_length(self) -> int:
        return self.tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask: every cached token plus the query's, from position 0."""
        return self.tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1  # grows as long as the store has room

    def reset(self) -> None:
        """Drop every row's blocks (private ones leave the store, shared ones are released)."""
        self._drop_rows()
        self.tokens = 0
        self.keys = self.values = None
        self.is_initialized = False
        if self.state.sparse is not None:
            self.state.sparse.clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative int, as DynamicLayer takes it)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(f"crop takes an int, got {type(tokens_to_remove).__name__}")
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative int, the number of tokens to remove from the end"
            )
        remove = min(-tokens_to_remove, self.tokens)
        if remove == 0:
            return
        self.truncate(self.tokens - remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: new row r continues old row beam_idx[r]."""
        self._select_rows(_as_indices(beam_idx, len(self.rows), "reorder_cache"))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row `repeats` times in place (row r becomes rows r*repeats .. r*repeats+repeats-1)."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
            raise ValueError(f"batch_repeat_interleave takes a positive int, got {repeats!r}")
        self._select_rows([r for r in range(len(self.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (ints or a boolean mask), in that order."""
        self._select_rows(_as_indices(indices, len(self.rows), "batch_select_indices"))

    def offload(self) -> None:
        """Nothing to do: the store moves blocks between tiers itself."""

    def prefetch(self) -> None:
        """Nothing to do: the store moves blocks between tiers itself."""

    # -- used by TieredCache ----------------------------------------------------------------------

    def adopt(self, keys: list[BlockKey], tokens: int) -> None:
        """Start as one row holding the stored blocks `keys` (already retained by the caller)."""
        if self.rows:
            raise ValueError(f"layer {self.layer_idx} already holds tokens")
        self.rows = [Row(self.state.new_namespace(), list(keys))]
        self.users.update(keys)
        self.tokens = tokens
        if self.state.sparse is not None and keys:  # page summaries of the adopted keys, read once
            with self.state.store.reading(keys) as (stored_keys, _):  # [kv_heads, tokens, head_dim]
                self.state.sparse.add(0, self.layer_idx, 0, stored_keys)

    def seal_known(self) -> None:
        """Seal every full private block whose content digest is known (batch size 1)."""
        if len(self.rows) != 1:
            return
        row, store, digests = self.rows[0], self.state.store, self.state.digests
        full = self.tokens // self.state.block_tokens
        for index in range(min(full, len(digests))):
            key = row.keys[index]
            if is_content_key(key):
                continue
            sealed = content_key(digests[index], self.layer_idx, index)
            store.seal(key, sealed)  # False: the same content was stored already, and serves instead
            store.retain([sealed])
            row.keys[index] = sealed
            self.users.pop(key, None)
            self.users[sealed] += 1

    def truncate(self, tokens: int) -> None:
        """Keep the first `tokens` tokens of every row."""
        block_tokens = self.state.block_tokens
        keep_blocks, tail = divmod(tokens, block_tokens)
        old_rows = self.rows
        self.rows = []
        for row in old_rows:
            kept = Row(row.namespace, row.keys[:keep_blocks])
            self.users.update(kept.keys)
            if tail:
                kept.keys.append(self._copy_block(row.keys[keep_blocks], tail, kept.namespace, keep_blocks))
            self.rows.append(kept)
        self._forget(old_rows)
        self.tokens = tokens
        if self.state.sparse is not None:
            self.state.sparse.truncate(tokens)

    def block_keys(self) -> list[list[BlockKey]]:
        """Each row's block keys, in order (a copy)."""
        return [list(row.keys) for row in self.rows]

    def close(self) -> None:
        self._drop_rows()
        self.tokens = 0

    # -- internals ----------------------------------------------------------------------------------

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, tensor in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"layer {self.layer_idx}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 4:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} must be [batch, kv_heads, seq, head_dim], got {tuple(tensor.shape)}"
                )
            if not tensor.is_floating_point():
                raise TypeError(f"layer {self.layer_idx}: {name} must be floating point, got {tensor.dtype}")
        if key_states.shape != value_states.shape or key_states.dtype != value_states.dtype:
            raise ValueError(
                f"layer {self.layer_idx}: keys {tuple(key_states.shape)} {key_states.dtype} and values "
                f"{tuple(value_states.shape)} {value_states.dtype} must have one shape and dtype"
            )

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write the new tokens block by block: [batch, kv_heads, new, head_dim] -> each row's blocks."""
        store, block_tokens = self.state.store, self.state.block_tokens
        new = key_states.shape[2]
        new_blocks: list[tuple[BlockKey, KVBlock]] = []  # stored together: their spills are one batch
        start = 0
        while start < new:
            index, offset = divmod(self.tokens + start, block_tokens)
            end = min(new, start + block_tokens - offset)
            for r, row in enumerate(self.rows):
                # keys, values of this row and block: [kv_heads, end - start, head_dim]
                keys, values = key_states[r, :, start:end], value_states[r, :, start:end]
                if offset == 0:
                    key = BlockKey(row.namespace, self.layer_idx, index)
                    row.keys.append(key)
                    self.users[key] += 1
                    new_blocks.append((key, KVBlock(keys, values)))
                else:
                    store.write_tokens(row.keys[index], offset, keys, values)
            start = end
        if new_blocks:
            store.put_many(new_blocks)
        if self.state.sparse is not None:
            for r in range(len(self.rows)):
                self.state.sparse.add(r, self.layer_idx, self.tokens, key_states[r])
        self.tokens += new
        if new and self.tokens % block_tokens < new:  # a block filled: seal it if its token ids are known
            self.seal_known()

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's tokens, read back from the store: two [batch, kv_heads, tokens, head_dim] tensors."""
        store = self.state.store
        if len(self.rows) == 1:
            with store.reading(self.rows[0].keys, limit_tokens=self.tokens) as (keys, values):  # [kv_heads, tokens, head_dim]
                if not _owns_storage(keys, self.state.block_tokens):  # a view of the device pool: copy it out
                    keys, values = keys.clone(), values.clone()
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)  # [1, kv_heads, tokens, head_dim]
        else:
            shape = (len(self.rows), self.kv_heads, self.tokens, self.head_dim)
            keys = torch.empty(shape, dtype=self.dtype, device=store.device)  # [batch, kv_heads, tokens, head_dim]
            values = torch.empty(shape, dtype=self.dtype, device=store.device)
            for r, row in enumerate(self.rows):
                with store.reading(row.keys, limit_tokens=self.tokens) as (row_keys, row_values):
                    keys[r].copy_(row_keys)
                    values[r].copy_(row_values)
        if keys.device != self.device:
            keys, values = keys.to(self.device), values.to(self.device)
        return keys, values

    def _copy_block(self, key: BlockKey, tokens: int, namespace: str, index: int) -> BlockKey:
        """A new private block `BlockKey(namespace, layer, index)` holding the first `tokens` of `key`."""
        store = self.state.store
        with store.reading([key], limit_tokens=tokens) as (keys, values):  # [kv_heads, tokens, head_dim]
            keys, values = keys.clone(), values.clone()
        copy = BlockKey(namespace, self.layer_idx, index)
        if self.users[copy]:  # the name is still in use by another row's list: take a fresh one
            copy = BlockKey(self.state.new_namespace(), self.layer_idx, index)
        elif store.holding([copy])[0]:
            store.remove(copy)
        store.write_tokens(copy, 0, keys, values)
        self.users[copy] += 1
        return copy

    def _select_rows(self, sources: list[int]) -> None:
        """New row r continues old row sources[r]: full blocks shared by reference, the partial last
        block copied for each new row (each row writes its own next tokens)."""
        if self.state.sparse is not None:
            raise ValueError("a sparse TieredCache does not reorder rows (beam search, contrastive search): "
                             "use an exact one")
        if not self.rows:
            return
        block_tokens = self.state.block_tokens
        full, tail = divmod(self.tokens, block_tokens)
        old_rows = self.rows
        self.rows = []
        for source in sources:
            row = Row(self.state.new_namespace(), old_rows[source].keys[:full])
            self.users.update(row.keys)
            if tail:
                row.keys.append(self._copy_block(old_rows[source].keys[full], tail, row.namespace, full))
            self.rows.append(row)
        self._forget(old_rows)

    def _forget(self, rows: list[Row]) -> None:
        """Drop `rows`' hold on their blocks: a key no row lists any more leaves the store (private) or is
        released (content-addressed, shared)."""
        store = self.state.store
        released = []
        for row in rows:
            for key in row.keys:
                self.users[key] -= 1
                if self.users[key] > 0:
                    continue
                del self.users[key]
                if is_content_key(key):
                    released.append(key)
                else:
                    store.remove(key)
        if released:
            store.release(released)

    def _drop_rows(self) -> None:
        rows, self.rows = self.rows, []
        self._forget(rows)


def _owns_storage(tensor: torch.Tensor, block_tokens: int) -> bool:
    """Whether `tensor` ([kv_heads, tokens, head_dim]) is a gathered copy rather than a view of the device
    pool: a gather allocates exactly [kv_heads, blocks, block_tokens, head_dim], the pool holds far more."""
    heads, tokens, dim = tensor.shape
    blocks = -(-tokens // block_tokens)
    gathered_nbytes = heads * blocks * block_tokens * dim * tensor.element_size()
    return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == gathered_nbytes


def _as_indices(indices: object, rows: int, operation: str) -> list[int]:
    """Row indices from an int tensor or a boolean mask over the rows."""
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices)
    if indices.dtype == torch.bool:
        if indices.shape != (rows,):
            raise ValueError(f"{operation}: a boolean mask must have shape [{rows}], got {tuple(indices.shape)}")
        indices = indices.nonzero().flatten()
    if indices.dim() != 1 or indices.is_floating_point():
        raise ValueError(f"{operation}: expected a 1-D tensor of row indices, got {indices.dtype} {tuple(indices.shape)}")
    picked = indices.tolist()
    if any(not 0 <= i < rows for i in picked):
        raise ValueError(f"{operation}: row indices must be in [0, {rows}), got {picked}")
    return picked
