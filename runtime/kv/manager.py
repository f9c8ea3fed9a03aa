"""KVManager: one sequence's KV cache as block tables over a TieredStore; the model's AttentionBackend.

Appends write into device-tier slots in place (the last, partial block grows until it is full).
Full blocks are sealed under their content address (tiered.content), so sequences with a common
prefix hold its blocks once, by reference; a sequence that starts on a cached prefix adopts those
blocks instead of computing them. Attention reads blocks where they are: a layer whose blocks
sit in consecutive device slots is read as one view of the pool; otherwise, in exact mode, device
runs and the payloads of quantized lower tiers each give a partial attention (quantized blocks read
where they lie, never dequantized), merged by log-sum-exp.
Two modes:

- exact:  every block takes part; the output equals a full cache's.
- sparse: at decode steps (one new token), past the first `dense_layers`, each KV head reads the
          sink pages, the recent window and its top pages by an importance estimator, within
          `budget_tokens` (runtime.kv.sparse); kept tokens keep their positions. Prefill attends
          exactly.

A block that no tier holds any more raises BlocksLost; the session recomputes it from its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from policies import make_prefetch
from tiered import BlockKey, KVBlock, TieredStore
from tiered.checked import NonNegative, Positive, checked
from tiered.content import content_key, is_content_key

from .attention import attend_stored, grouped_attention
from .sparse import SparseAttention

MODES = ("exact", "sparse")


class BlocksLost(KeyError):
    """Block `index` of `layer` (and maybe later ones) of sequence `namespace` is in no tier any
    more: recompute from there."""

    def __init__(self, layer: int, index: int, namespace: str = "") -> None:
        super().__init__(f"block {index} of layer {layer} is no longer stored")
        self.layer, self.index, self.namespace = layer, index, namespace


@dataclass
class KVCounters:
    appended_tokens: int = 0
    attended_tokens: int = 0  # keys read by attention, summed over layers, steps and KV heads' mean
    sparse_steps: int = 0  # layer-steps that read a selection rather than every block
    prefetched_blocks: int = 0  # blocks requested from the prefetch scheduler
    adopted_blocks: int = 0  # blocks (per layer) taken from the store's cache instead of computed
    shared_seals: int = 0  # sealed blocks whose content was stored already (this copy was dropped)


class KVManager:
    """Block tables per layer for the sequence `namespace` in `store`.

    Implements runtime.model.AttentionBackend: `attend(layer, q, k, v, positions)`.

    mode           "exact" or "sparse"
    budget_tokens  sparse mode: tokens each KV head reads per layer and step (sinks + window + top-k)
    importance     sparse mode: estimator name (policies.IMPORTANCE)
    prefetch       policy name (policies.PREFETCH) planning which blocks to bring up to the device
    page_tokens    sparse mode: the grain pages are scored and chosen at (divides block_tokens)
    sink_tokens, window_tokens   sparse mode: tokens always read at the start and the end
    dense_layers   sparse mode: the first layers attend exactly (their attention is not sparse)
    importance_kwargs            sparse mode: arguments of the estimator (quest gets the softmax scale)
    """

    @checked
    def __init__(
        self,
        store: TieredStore,
        namespace: str,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        mode: Literal[MODES] = "exact",
        budget_tokens: Positive | None = None,
        importance: str = "quest",
        prefetch: str = "none",
        page_tokens: NonNegative = 16,
        sink_tokens: NonNegative = 16,
        window_tokens: NonNegative = 32,
        dense_layers: NonNegative = 2,
        importance_kwargs: dict | None = None,
    ) -> None:
        BlockKey(namespace, 0, 0)  # validates the namespace
        make_prefetch(prefetch)  # an unknown name is refused in either mode
        self.block_tokens = store.config.block_tokens
        self.sparse = None
        if mode == "sparse":
            if budget_tokens is None:
                raise ValueError("sparse mode needs budget_tokens")
            self.sparse = SparseAttention(
                layers, kv_heads, head_dim, store.device, block_tokens=self.block_tokens,
                page_tokens=min(page_tokens, self.block_tokens), budget_tokens=budget_tokens,
                sink_tokens=sink_tokens, window_tokens=window_tokens, importance=importance,
                importance_kwargs=importance_kwargs, prefetch=prefetch,
            )
        self.store = store
        self.namespace = namespace
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.mode = mode
        self.budget_tokens = budget_tokens
        self.dense_layers = dense_layers
        self.lengths = [0] * layers
        self.block_keys: list[list[BlockKey]] = [[] for _ in range(layers)]
        self.sealed_blocks = 0  # the first blocks of every layer, under content keys
        self.counters = KVCounters()
        self._score_store = store.config.eviction == "importance"
        # exact mode: quantized blocks below the device take part in attention where they lie
        # (False: dequantized into a joined copy first, the path this replaced; kept to compare)
        self.quantized_reads = True

    @property
    def tokens(self) -> int:
        """Tokens every layer holds (the sequence length)."""
        return min(self.lengths)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Append `k`, `v` to `layer`, then attend. See runtime.model.AttentionBackend."""
        first = int(positions[0])
        if first != self.lengths[layer]:
            raise ValueError(f"layer {layer} holds {self.lengths[layer]} tokens; new tokens must start there, not at {first}")
        self.append(layer, k, v)
        try:
            if self._reads_sparse(layer, q.shape[1]):
                return self._attend_sparse(layer, q, positions)
            if not self.quantized_reads:  # every block dequantized into one joined copy, then attended
                with self.store.reading(self.block_keys[layer], limit_tokens=self.lengths[layer]) as (keys, values):
                    out, _ = grouped_attention(q, keys, values, positions)
            else:
                out = attend_stored(self.store, self.block_keys[layer], self.lengths[layer], q, positions)
        except KeyError as error:
            raise self._lost(layer) from error
        self.counters.attended_tokens += self.lengths[layer]
        return out

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write `k`, `v` ([kv_heads, n, head_dim]) after the tokens `layer` holds."""
        length, n, size = self.lengths[layer], k.shape[1], self.block_tokens
        keys = self.block_keys[layer]
        new_blocks: list[tuple[BlockKey, KVBlock]] = []  # stored together: their spills are one batch
        done = 0
        while done < n:
            index, offset = divmod(length + done, size)
            take = min(size - offset, n - done)
            part_k, part_v = k[:, done : done + take], v[:, done : done + take]  # [kv_heads, take, head_dim]
            if index == len(keys):
                keys.append(BlockKey(self.namespace, layer, index))
                new_blocks.append((keys[-1], KVBlock(part_k, part_v)))
            else:
                try:
                    self.store.write_tokens(keys[index], offset, part_k, part_v)
                except (KeyError, ValueError) as error:
                    if offset and keys[index] not in self.store:  # the partial block was lost below
                        raise BlocksLost(layer, index, self.namespace) from error
                    raise
            done += take
        if new_blocks:
            new_keys = [key for key, _ in new_blocks]
            self.store.retain(new_keys)  # the sequence holds a reference to each of its blocks
            try:
                self.store.put_many(new_blocks)
            except BaseException:
                self.store.release(new_keys)
                del keys[len(keys) - len(new_keys) :]
                raise
        if self.sparse is not None:
            self.sparse.add(layer, length, k)
        self.lengths[layer] += n
        self.counters.appended_tokens += n

    def seal(self, digests: list[bytes]) -> None:
        """Give full blocks sealed_blocks.. of every layer their content keys; `digests` are their
        content hashes, in order (runtime.Session computes them from the token log)."""
        full = self.tokens // self.block_tokens
        for index in range(self.sealed_blocks, min(full, self.sealed_blocks + len(digests))):
            digest = digests[index - self.sealed_blocks]
            for layer in range(self.layers):
                key = self.block_keys[layer][index]
                target = content_key(digest, layer, index)
                try:  # the sequence's reference moves with the block
                    if not self.store.seal(key, target):
                        self.counters.shared_seals += 1
                except KeyError:  # lost before it was sealed: the next read recomputes it
                    continue
                self.block_keys[layer][index] = target
        self.sealed_blocks = max(self.sealed_blocks, min(full, self.sealed_blocks + len(digests)))

    def adopt(self, digests: list[bytes]) -> int:
        """Take the cached blocks of `digests` (the content hashes of the next full blocks) from the
        store, as long as every layer's is there; returns how many were adopted. The sequence must
        end on a block boundary, every block of it sealed."""
        if self.tokens % self.block_tokens or self.sealed_blocks * self.block_tokens != self.tokens:
            raise ValueError("blocks are adopted only after whole sealed blocks")
        first = self.sealed_blocks
        taken = 0
        for offset, digest in enumerate(digests):
            keys = [content_key(digest, layer, first + offset) for layer in range(self.layers)]
            if not all(self.store.holding(keys)):
                break
            self.store.retain(keys)
            for layer, key in enumerate(keys):
                self.block_keys[layer].append(key)
            taken += 1
        if not taken:
            return 0
        start = first * self.block_tokens
        for layer in range(self.layers):
            self.lengths[layer] += taken * self.block_tokens
            if self.sparse is not None:  # page summaries of the adopted keys, read once
                try:
                    with self.store.reading(self.block_keys[layer][first:]) as (keys, _):
                        self.sparse.add(layer, start, keys)
                except KeyError:  # gone since: drop what was taken, the caller computes it
                    self.truncate(start)
                    return 0
        self.sealed_blocks += taken
        self.counters.adopted_blocks += taken
        # adopted blocks may lie on host or disk: bring them up in the background, layer by layer
        # (the order attention reads them), so that decoding reads them from the device
        adopted = [key for keys in self.block_keys for key in keys[first : first + taken]]
        self.store.prefetch(adopted, layers_ahead=[key.layer + 1 for key in adopted])  # layer 0 is read first
        self.counters.prefetched_blocks += len(adopted)
        return taken

    def truncate(self, tokens: int) -> None:
        """Forget every token from `tokens` on, in every layer (undoes a forward that failed midway).

        Shared blocks are released, the sequence's own are removed from the store. A sealed block
        cut in the middle is copied back into a block of the sequence's own; if it is lost, the
        cut moves back to its start (`tokens` then says where the sequence ends)."""
        if tokens % self.block_tokens and tokens < self.tokens and not self._unseal(tokens // self.block_tokens, tokens):
            tokens -= tokens % self.block_tokens
        keep_blocks = -(-tokens // self.block_tokens)
        for layer in range(self.layers):
            if self.lengths[layer] <= tokens:
                continue
            self._let_go(self.block_keys[layer][keep_blocks:])
            del self.block_keys[layer][keep_blocks:]
            self.lengths[layer] = tokens
        self.sealed_blocks = min(self.sealed_blocks, tokens // self.block_tokens)
        if self.sparse is not None:
            self.sparse.truncate(tokens)

    def _unseal(self, index: int, tokens: int) -> bool:
        """Give block `index` of every layer (sealed, to be cut at `tokens`) a private copy; False if one is lost."""
        keys = [self.block_keys[layer][index] for layer in range(self.layers)]
        if not any(is_content_key(key) for key in keys):
            return True
        blocks = self.store.get_many(keys)
        if any(block is None for block in blocks):
            return False
        keep = tokens - index * self.block_tokens
        for layer, (key, block) in enumerate(zip(keys, blocks)):
            if is_content_key(key):
                private = BlockKey(self.namespace, layer, index)
                self.store.remove(private)
                self.store.write_tokens(private, 0, block.keys[:, :keep], block.values[:, :keep])
                self.store.release([key])
                self.store.retain([private])
                self.block_keys[layer][index] = private
        return True

    def release(self) -> None:
        """Let go of every block of this sequence: shared ones stay cached in the store for others."""
        self.truncate(0)

    def _reads_sparse(self, layer: int, new_tokens: int) -> bool:
        return (
            self.sparse is not None and new_tokens == 1 and layer >= self.dense_layers
            and self.lengths[layer] > self.budget_tokens
        )

    def _attend_sparse(self, layer: int, q: Tensor, positions: Tensor) -> Tensor:
        keys = self.block_keys[layer]
        out, read, wanted, scores = self.sparse.attend(self.store, layer, keys, self.lengths[layer], q, positions)
        if self._score_store:
            for key, score in zip(keys, self.sparse.block_scores(layer, scores, len(keys)).tolist()):
                self.store.set_score(key, score)
        wanted_keys = [self.block_keys[lay][i] for lay, i in wanted if i < len(self.block_keys[lay])]
        if wanted_keys:
            # most urgent first: layer computations until each is read (policies.prefetch.base); this
            # layer's plan at the next step cancels what is still queued of this one
            ahead = [(key.layer - layer - 1) % self.layers + 1 for key in wanted_keys]
            self.store.prefetch(wanted_keys, layers_ahead=ahead, plan=(self.namespace, layer))
            self.counters.prefetched_blocks += len(wanted_keys)
        self.counters.attended_tokens += read
        self.counters.sparse_steps += 1
        return out

    def _lost(self, layer: int) -> BlocksLost:
        """The first block missing in any layer (so one recomputation repairs them all)."""
        first = None
        for index, keys in enumerate(self.block_keys):
            held = self.store.holding(keys)
            if False in held and (first is None or held.index(False) < first[1]):
                first = (index, held.index(False))
        return BlocksLost(*(first or (layer, 0)), self.namespace)

    def keys(self) -> list[BlockKey]:
        """Every block key of the sequence, all layers."""
        return [key for keys in self.block_keys for key in keys]

    def _let_go(self, keys: list[BlockKey]) -> None:
        self.store.release(keys)
        for key in keys:
            if not is_content_key(key):
                self.store.remove(key)
