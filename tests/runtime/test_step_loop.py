"""Continuous batching (runtime.step_loop) on a tiny random Llama, without Ray: sessions that share
forward steps produce exactly what each produces alone."""

from __future__ import annotations

import pytest
import torch

from runtime import load_model
from runtime.session import Session, model_store_config
from runtime.step_loop import StepLoop
from runtime.worker import SessionWorker
from tiered import StoreConfig, TieredStore

BLOCK_TOKENS = 8
SPARSE = dict(mode="sparse", budget_tokens=32, page_tokens=8, sink_tokens=8, window_tokens=8, dense_layers=1)



def config(model, device_blocks: int = 4096, host_blocks: int = 4096, disk_dir=None) -> StoreConfig:
    block_bytes = 2 * model.config.num_kv_heads * BLOCK_TOKENS * model.config.head_dim * 4
    return StoreConfig(device="cpu", device_bytes=device_blocks * block_bytes, host_bytes=host_blocks * block_bytes,
                       block_tokens=BLOCK_TOKENS, disk_dir=disk_dir)


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths]


def alone(model, prompt: list[int], new_tokens: int, stop=(), **options) -> list[int]:
    with Session(model, config(model), **options) as session:
        session.extend(prompt)
        return session.generate(new_tokens, stop=stop)


def drain(loop: StepLoop, *requests) -> int:
    """Step until every request finished; the steps taken."""
    steps = 0
    while not all(request.finished for request in requests):
        assert loop.step() > 0
        steps += 1
    return steps


def test_a_batch_of_four_sessions_equals_each_session_alone(tiny_model, tmp_path):
    """Different lengths, exact and sparse, one joining mid-way and one leaving early, on a store
    small enough that their blocks sit in host and disk tiers: each gets its solo tokens."""
    texts = prompts(37, 75, 120, 9)
    modes = [{}, SPARSE, {}, dict(SPARSE, budget_tokens=24)]
    new = [30, 12, 25, 40]
    expected = [alone(tiny_model, text, n, **mode) for text, n, mode in zip(texts, new, modes)]

    store = TieredStore(model_store_config(tiny_model, config(tiny_model, device_blocks=40, host_blocks=12, disk_dir=tmp_path)))
    loop = StepLoop(tiny_model, step_tokens=48)
    sessions = [Session(tiny_model, store=store, **mode) for mode in modes]
    extends = [loop.extend(session, text) for session, text in zip(sessions[:3], texts[:3])]
    prefill_steps = drain(loop, *extends)
    assert [request.result() for request in extends] == [37, 75, 120]
    assert prefill_steps >= (37 + 75 + 120) // 48  # chunked within the step budget
    streams = [loop.stream(session, n, stop=[]) for session, n in zip(sessions[:3], new[:3])]
    for _ in range(5):
        loop.step()
    late = loop.extend(sessions[3], texts[3])  # joins while the others decode
    drain(loop, late)
    streams.append(loop.stream(sessions[3], new[3], stop=[]))
    steps_before = loop.steps
    loop.run()

    assert [list(request.tokens()) for request in streams] == expected
    assert streams[1].finished and len(expected[1]) < len(expected[3])  # left early, the others went on
    assert loop.steps - steps_before < sum(new)  # the decodes shared steps
    tiers = store.stats()["tiers"] if "tiers" in store.stats() else store.stats()
    assert tiers["host"]["hits"] > 0 and tiers["disk"]["hits"] > 0  # attention read blocks below the device
    for session in sessions:
        assert session.kv.tokens == len(session.tokens)
        session.close()
    store.close()


def test_a_long_prefill_does_not_stall_the_decodes_of_others(tiny_model):
    store = TieredStore(model_store_config(tiny_model, config(tiny_model)))
    loop = StepLoop(tiny_model, step_tokens=16)
    talker, reader = Session(tiny_model, store=store), Session(tiny_model, store=store)
    drain(loop, loop.extend(talker, prompts(20)[0]))
    stream = loop.stream(talker, 20, stop=[])
    long_prompt = loop.extend(reader, prompts(200, seed=1)[0])
    tokens_while_prefilling = 0
    while not long_prompt.finished:
        loop.step()
        tokens_while_prefilling += len(stream.poll()[0])
    assert tokens_while_prefilling >= 200 // 16 - 1  # a token per step, not one after the whole prompt
    loop.run()
    assert tokens_while_prefilling + len(stream.poll()[0]) == 20
    store.close()


def test_a_short_prefill_is_not_queued_behind_a_long_one_that_came_first(tiny_model):
    """A new turn's few tokens go into the next step, though a long prompt arrived before them and
    fills the step's budget; the long prompt takes what is left and still gets its tokens."""
    store = TieredStore(model_store_config(tiny_model, config(tiny_model)))
    loop = StepLoop(tiny_model, step_tokens=16)
    reader, asker = Session(tiny_model, store=store), Session(tiny_model, store=store)
    long_prompt = loop.extend(reader, prompts(200, seed=1)[0])
    loop.step()
    short_prompt = loop.extend(asker, prompts(5, seed=2)[0])
    assert loop.step() == 16  # the 5 tokens and 11 of the long prompt's
    assert short_prompt.finished and short_prompt.result() == 5
    assert not long_prompt.finished
    loop.run()
    assert long_prompt.result() == 200 and len(reader.tokens) == 200
    store.close()


def test_a_cancelled_stream_frees_its_slot_and_its_partial_block(tiny_model):
    store = TieredStore(model_store_config(tiny_model, config(tiny_model)))
    loop = StepLoop(tiny_model, step_tokens=64)
    kept, cancelled = Session(tiny_model, store=store), Session(tiny_model, store=store)
    text_kept, text_cancelled = prompts(30, 41, seed=2)
    expected = alone(tiny_model, text_kept, 16)
    drain(loop, loop.extend(kept, text_kept), loop.extend(cancelled, text_cancelled))
    streams = [loop.stream(kept, 16, stop=[]), loop.stream(cancelled, 16, stop=[])]
    for _ in range(3):
        loop.step()
    handed_out = streams[1].poll()[0]
    loop.cancel(streams[1])
    loop.step()
    assert streams[1].finished and loop.running == 1
    assert cancelled.tokens == text_cancelled + handed_out  # every token it was given is in its log
    held = cancelled.kv.tokens
    assert held in (len(cancelled.tokens) - 1, len(cancelled.tokens))  # the chunk in flight was undone ...
    for keys in cancelled.kv.block_keys:  # ... with the block it had begun
        assert len(keys) == -(-held // BLOCK_TOKENS)
    loop.run()
    assert list(streams[0].tokens()) == expected
    # the cancelled session continues as an uninterrupted session over the same log does
    assert cancelled.generate(4, stop=[]) == alone(tiny_model, text_cancelled + handed_out, 4)
    kept.close()
    cancelled.close()
    store.close()


def test_bad_input_fails_that_request_alone(tiny_model, tiny_dir):
    store = TieredStore(model_store_config(tiny_model, config(tiny_model)))
    loop = StepLoop(tiny_model)
    good, bad = Session(tiny_model, store=store), Session(tiny_model, store=store)
    running = loop.extend(good, prompts(50)[0])
    with pytest.raises(ValueError, match="call in progress"):
        loop.extend(good, [4])
    with pytest.raises(ValueError, match="takes at most 256"):
        loop.extend(bad, list(range(3, 3 + 257)))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        loop.extend(bad, [5, 512])
    drain(loop, loop.extend(bad, [5, 6, 7]))
    for arguments, words in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                             (dict(max_new_tokens=-2), "max_new_tokens")]:
        with pytest.raises(ValueError, match=words):
            loop.stream(bad, **{"max_new_tokens": 4, **arguments})
    loop.run()
    assert running.result() == 50 and good.kv.tokens == 50 and bad.tokens == [5, 6, 7]
    other = load_model(tiny_dir)  # the same weights, another Model: a loop runs its own model's sessions
    with Session(other, config(other)) as stranger, pytest.raises(ValueError, match="another model"):
        loop.extend(stranger, [4])
    with pytest.raises(ValueError, match="step_tokens"):
        StepLoop(tiny_model, step_tokens=0)
    store.close()


def test_sampled_streams_in_a_batch_follow_their_seeds(tiny_model):
    texts = prompts(25, 33, seed=4)
    expected = []
    for text in texts:
        with Session(tiny_model, config(tiny_model)) as session:
            session.extend(text)
            expected.append(session.generate(12, temperature=0.8, seed=7, top_p=0.9, stop=[]))
    store = TieredStore(model_store_config(tiny_model, config(tiny_model)))
    loop = StepLoop(tiny_model)
    sessions = [Session(tiny_model, store=store) for _ in texts]
    drain(loop, *(loop.extend(session, text) for session, text in zip(sessions, texts)))
    streams = [loop.stream(session, 12, temperature=0.8, seed=7, top_p=0.9, stop=[]) for session in sessions]
    loop.run()
    assert [list(request.tokens()) for request in streams] == expected
    store.close()


def test_a_worker_batches_the_streams_its_caller_interleaves(tiny_model, tiny_dir):
    """SessionWorker drives its loop from the caller: two streams consumed in turn share steps."""
    texts = prompts(40, 22, seed=5)
    expected = [alone(tiny_model, text, 10, stop=None) for text in texts]
    worker = SessionWorker(str(tiny_dir), config(tiny_model))
    for index, text in enumerate(texts):
        worker.open(f"s{index}")
        assert worker.extend(f"s{index}", text) == len(text)
    steps_before = worker.loop.steps
    streams = [worker.stream(f"s{index}", 10) for index in range(len(texts))]
    outputs: list[list[int]] = [[], []]
    for _ in range(10):
        for output, stream in zip(outputs, streams):
            token = next(stream, None)
            if token is not None:
                output.append(token)
    assert outputs == expected
    assert worker.loop.steps - steps_before <= 11  # one step decoded both
    worker.shutdown()
