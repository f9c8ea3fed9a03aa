"""TieredCache: a transformers `Cache` whose full-attention layers keep their KV in a TieredStore."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from tiered import StoreConfig, TieredStore
from tiered.content import chain_hashes, chain_root, content_key

from .identity import check_store_fits, model_fingerprint
from .layer import SequenceState, TieredLayer
from .sparse import SparseRows


class TieredCache(Cache):
    """A `transformers` cache over device, host and disk tiers: `model.generate(ids, cache=TieredCache(...))`
    (or `past_key_values=`) gives the same greedy tokens as `DynamicCache` while the KV spills to the
    store's lower tiers, through their codecs (raw tiers: exact; int8: close).

    TieredCache(store_config=None, *, store=None, config=None, salt="")
        store_config  the StoreConfig of a new store this cache owns and closes (default StoreConfig());
                      with `config`, its `layers` (per-layer device rooms, for zero-copy reads) and
                      `fingerprint` are filled in from the model when left unset
        store         a shared, open TieredStore instead (the caller closes it); it must fit the model
        config        the model's config (`model.config`), when known up front; otherwise the layers are
                      made on the first `update`, all as TieredLayers
        salt          a tenant's cache salt: content keys with different salts never match
        sparse        sparse decode steps, e.g. {"budget_tokens": 1024}: past the budget, each KV head of
                      each layer (but the first `dense_layers`) reads its sinks, its recent window and
                      the pages Quest ranks highest; every block stays in the store. Options as
                      runtime.hf.sparse.SparseRows takes them. Needs `config` and the "tiered"
                      attention; beam and contrastive search (row reordering) are refused

    Layers: full-attention layers are TieredLayers; sliding-window and chunked layers (Mistral,
    Gemma 2/3, Qwen with `use_sliding_window`) are kept as transformers' own dynamic layers, in memory.
    K/V shapes are transformers': [batch, kv_heads, seq, head_dim]. Any batch size works, left padding
    included: each row is its own private sequence. Beam search and contrastive search reorder rows
    (full blocks shared, the partial last block copied); `crop` serves assisted decoding.

    Sharing (batch size 1): the cache seals every full block whose token ids it knows under a content
    key (tiered.content: a chain hash over the token ids, salted with the model fingerprint), so other
    caches and sessions of the same model reuse it. It learns the ids from `for_prompt` and `commit`;
    `TieredCache.for_prompt(store, input_ids, config=...)` starts a cache already holding the longest
    prefix of `input_ids` that the store has. With a batch above 1 every block stays private.

    Attention: with the model's attention implementation set to "tiered" (runtime.hf.ATTENTION) and
    `config` given, a decode step without a padding mask reads the blocks where they lie instead of
    copying the history into new tensors (runtime.hf.attention).

    `close()` (or `with TieredCache(...) as cache`) drops the private blocks and releases shared ones.
    """

    def __init__(
        self,
        store_config: StoreConfig | None = None,
        *,
        store: TieredStore | None = None,
        config=None,
        salt: str = "",
        sparse: dict | None = None,
    ) -> None:
        if store_config is not None and store is not None:
            raise ValueError("TieredCache takes store_config (a new store) or store (a shared one), not both")
        if store_config is not None and not isinstance(store_config, StoreConfig):
            raise TypeError(f"store_config must be a StoreConfig, got {type(store_config).__name__}")
        if store is not None and not isinstance(store, TieredStore):
            raise TypeError(f"store must be a TieredStore, got {type(store).__name__}")
        if config is not None and not hasattr(config, "get_text_config"):
            raise TypeError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
        if not isinstance(salt, str):
            raise TypeError(f"salt must be str, got {type(salt).__name__}")
        self.model_config = config
        self._owns_store = store is None
        if store is None:
            store = TieredStore(_fill_in(store_config or StoreConfig(), config))
        elif config is not None:
            check_store_fits(store.config, store.layout, config)
        self.store = store
        self.salt = salt
        self.reused_tokens = 0  # tokens for_prompt found in the store
        self._token_ids: list[int] = []  # the ids of the tokens held (and of the prompt ahead), batch 1
        text_config = None if config is None else config.get_text_config(decoder=True)
        self.state = SequenceState(store, prefix=f"hf-{uuid.uuid4().hex[:16]}", text_config=text_config)
        if sparse is not None:
            try:
                self.state.sparse = _sparse_rows(sparse, text_config, store)
            except BaseException:
                if self._owns_store:
                    store.close()
                raise
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: TieredLayer(self.state, len(self.layers)))
        else:
            super().__init__(layers=self._make_layers(config))

    def _make_layers(self, config) -> list:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = []
        for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if layer_type == "full_attention":
                layers.append(TieredLayer(self.state, index))
            else:  # sliding window, chunked, linear attention, dummy: transformers' own layer, in memory
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        return layers

    # -- sharing by content --------------------------------------------------------------------------

    @classmethod
    def for_prompt(
        cls, store: TieredStore, input_ids: torch.Tensor | Sequence[int], *, config, salt: str = ""
    ) -> "TieredCache":
        """A cache over the shared `store` already holding the longest prefix of `input_ids` ([1, T] or
        [T]) that the store has in full blocks (`reused_tokens` says how many tokens; at least one
        token is left for the model to process). Pass it to `generate(input_ids, cache=...)`: only the
        rest of the prompt is computed, and its full blocks are sealed for the next turn. Call
        `commit(output_ids)` after generating to seal the answer's blocks too."""
        if config is None:
            raise ValueError("for_prompt needs the model's config (model.config): content keys name the model")
        cache = cls(store=store, config=config, salt=salt)
        if any(not isinstance(layer, TieredLayer) for layer in cache.layers):
            raise ValueError("for_prompt needs a model whose layers are all full attention (no sliding windows)")
        ids = _token_list(input_ids)
        cache.commit(ids)
        block_tokens = store.config.block_tokens
        candidates = min(len(cache.state.digests), (len(ids) - 1) // block_tokens)
        wanted = [
            [content_key(cache.state.digests[i], layer, i) for i in range(candidates)] for layer in range(len(cache.layers))
        ]
        flat = [key for layer_keys in wanted for key in layer_keys]
        store.retain(flat)  # readers first, so what the check finds stays found
        held = store.holding(flat)
        reused = candidates
        for layer in range(len(cache.layers)):
            row = held[layer * candidates : (layer + 1) * candidates]
            reused = min(reused, row.index(False) if False in row else candidates)
        store.release([key for layer_keys in wanted for key in layer_keys[reused:]])
        for layer, layer_keys in zip(cache.layers, wanted):
            layer.adopt(layer_keys[:reused], reused * block_tokens)
        cache.reused_tokens = reused * block_tokens
        return cache

    def commit(self, token_ids: torch.Tensor | Sequence[int]) -> None:
        """Tell the cache the token ids of its sequence (batch size 1): those of the tokens it holds, and
        optionally of tokens it will hold next. Every full block whose ids are known is sealed under its
        content key. The ids must agree with those committed before, up to the shorter of the two."""
        if any(isinstance(layer, TieredLayer) and len(layer.rows) > 1 for layer in self.layers):
            raise ValueError("commit works on a batch of one; rows of a larger batch stay private")
        ids = _token_list(token_ids)
        common = min(len(ids), len(self._token_ids))
        if ids[:common] != self._token_ids[:common]:
            raise ValueError("these token ids differ from the ones the cache was told it holds")
        if len(ids) > len(self._token_ids):
            self._token_ids = ids
            block_tokens = self.store.config.block_tokens
            self.state.digests[:] = chain_hashes(self._chain_root(), self._token_ids, block_tokens)
        for layer in self._tiered_layers():
            layer.seal_known()

    def _chain_root(self) -> bytes:
        fingerprint = self.store.config.fingerprint
        if not fingerprint:
            if self.model_config is None:
                raise ValueError("content keys need the model: make the cache with config=model.config")
            fingerprint = model_fingerprint(self.model_config)
        return chain_root(fingerprint, self.store.config.block_tokens, self.salt)

    # -- Cache operations that change which tokens are held -----------------------------------------

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._forget_ids_past(self.get_seq_length())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._forget_ids_past(self.get_seq_length())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._forget_ids_past(self.get_seq_length())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._forget_ids_past(self.get_seq_length())

    def reset(self) -> None:
        super().reset()
        self._forget_ids_past(0)

    def _forget_ids_past(self, tokens: int) -> None:
        """Ids past `tokens` may no longer be what the rows will hold: forget them."""
        del self._token_ids[tokens:]
        del self.state.digests[tokens // self.store.config.block_tokens :]

    # -- lifetime and inspection ------------------------------------------------------------------

    def _tiered_layers(self) -> list[TieredLayer]:
        return [layer for layer in self.layers if isinstance(layer, TieredLayer)]

    def block_keys(self, layer_idx: int) -> list[list]:
        """The store keys of each row's blocks of layer `layer_idx`, in order."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, TieredLayer):
            raise ValueError(f"layer {layer_idx} is a {type(layer).__name__}, kept in memory, not in the store")
        return layer.block_keys()

    def close(self) -> None:
        """Drop the private blocks, release the shared ones, and close the store if this cache made it."""
        for layer in self._tiered_layers():
            layer.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "TieredCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TieredCache(layers={len(self.layers)}, tokens={self.get_seq_length()}, tiers={self.store.tier_names})"


def _sparse_rows(options: dict, text_config, store: TieredStore) -> SparseRows:
    """The sparse decode state of a cache of the model `text_config` over `store`."""
    if text_config is None:
        raise ValueError("a sparse TieredCache needs the model's config (config=model.config)")
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return SparseRows(options, text_config.num_hidden_layers, kv_heads, head_dim, store.config.block_tokens,
                      store.device)


def _fill_in(store_config: StoreConfig, config) -> StoreConfig:
    """The store's config with the model's layer count and fingerprint where left unset."""
    if config is None:
        return store_config
    changes = {}
    if store_config.layers is None:
        changes["layers"] = config.get_text_config(decoder=True).num_hidden_layers
    if not store_config.fingerprint:
        changes["fingerprint"] = model_fingerprint(config)
    filled = dataclasses.replace(store_config, **changes) if changes else store_config
    check_store_fits(filled, None, config)  # before the store allocates anything
    return filled


def _token_list(token_ids: torch.Tensor | Sequence[int]) -> list[int]:
    """Token ids as a list of ints, from [T], [1, T] or a sequence of ints."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 2 and token_ids.shape[0] == 1:
            token_ids = token_ids[0]
        if token_ids.dim() != 1 or token_ids.is_floating_point():
            raise ValueError("expected the token ids of one sequence, [T] or [1, T]; "
                             f"got {token_ids.dtype} {tuple(token_ids.shape)}")
        return [int(i) for i in token_ids.tolist()]
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"expected token ids as a tensor or a sequence of ints, got {type(token_ids).__name__}")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in token_ids):
        raise TypeError("token ids must be ints")
    return list(token_ids)
