"""Content addresses: chained over a prefix's token ids, salted with the model, stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tiered.content import chain_hashes, chain_root, content_key, is_content_key

IDS = list(range(1000, 1000 + 40))

CHILD = """
import sys
from tiered.content import chain_hashes, chain_root
root = chain_root("model-a", 8, "tenant")
print(",".join(d.hex() for d in chain_hashes(root, list(range(1000, 1040)), 8)))
"""


def digests(ids=IDS, fingerprint="model-a", block_tokens=8, salt="tenant"):
    return chain_hashes(chain_root(fingerprint, block_tokens, salt), ids, block_tokens)


def test_one_digest_per_full_block_and_a_chain():
    found = digests()
    assert len(found) == 5 and len(set(found)) == 5
    assert digests(IDS[:39]) == found[:4]  # the trailing partial block has no address
    changed = IDS[:]
    changed[12] += 1  # a token of block 1: blocks 1.. change, block 0 does not
    other = digests(changed)
    assert other[0] == found[0] and all(a != b for a, b in zip(other[1:], found[1:]))
    assert chain_hashes(chain_root("model-a", 8, "tenant"), IDS[16:], 8, parent=found[1]) == found[2:]


@pytest.mark.parametrize("change", [dict(fingerprint="model-b"), dict(salt="other"), dict(salt="")])
def test_the_salt_separates_models_and_tenants(change):
    assert not set(digests(**change)) & set(digests())


def test_block_size_is_part_of_the_address():
    assert digests(block_tokens=4)[1] != digests(block_tokens=8)[0]


def test_stable_across_processes_and_hash_seeds():
    seen = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
        seen.add(out.stdout.strip())
    assert seen == {",".join(d.hex() for d in digests())}


def test_content_keys_and_bad_input():
    key = content_key(digests()[0], layer=3, index=0)
    assert is_content_key(key) and key.layer == 3 and len(key.namespace) == 34
    with pytest.raises(ValueError, match="fingerprint"):
        chain_root("", 8)
    with pytest.raises(ValueError, match="block_tokens"):
        chain_root("m", 0)
    with pytest.raises(ValueError, match="token ids"):
        chain_hashes(chain_root("m", 2), [1, -1], 2)
    with pytest.raises(ValueError, match="token ids"):
        chain_hashes(chain_root("m", 2), [1, 2**32], 2)
