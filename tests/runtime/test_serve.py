"""`tiered serve`'s application on a real local Ray with Ray Serve, through the official `openai`
client over HTTP on 127.0.0.1: two CPU replicas of a tiny random Llama (with a ChatML template).

Answers equal an in-process Session's at temperature 0; streamed equals non-streamed; a second
turn reuses the first turn's blocks (cached_tokens), only within a tenant (API key, cache_salt);
errors are OpenAI-shaped and the server keeps serving; 16 concurrent requests are all answered;
a stream whose replicas are killed ends (completed or with an error event) and the conversation
goes on; while no replica of an application lives, its requests get 503 and, once one is back,
answers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

import ray
from ray import serve

from runtime import Session
from runtime.actors import start_ray
from runtime.serve.app import build
from tiered import StoreConfig


BLOCK_TOKENS = 16
KEY_A, KEY_B = "key-tenant-a", "key-tenant-b"
MODEL = "tiny"
NEW_TOKENS = 8
STORE = dict(device_mib=8, host_mib=8, host_codec="raw", disk_codec="raw", block_tokens=BLOCK_TOKENS)
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def base_url(tiny_dir):
    port = _free_port()
    start_ray("local", num_cpus=4)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        args = dict(model=str(tiny_dir), served_model_name=MODEL, workers=2, api_keys=[KEY_A, KEY_B],
                    default_max_tokens=NEW_TOKENS, failover_timeout_s=90, call_timeout_s=120, **STORE)
        serve.run(build(args), name="tiered", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY_A, max_retries=0, timeout=120)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float = 180) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s} s")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reference(model, prompt_ids: list[int], max_tokens: int = NEW_TOKENS) -> str:
    """What an in-process session answers at temperature 0."""
    config = StoreConfig(device="cpu", device_bytes=8 << 20, host_bytes=8 << 20, block_tokens=BLOCK_TOKENS)
    with Session(model, config) as session:
        session.extend(prompt_ids)
        return model.tokenizer.decode(session.generate(max_tokens))


def chat(client, messages, **options):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **options)


# -- answers --------------------------------------------------------------------------------------

def test_health_needs_no_key_and_models_lists_the_model(base_url, client):
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["max_model_len"] == 256
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_equals_an_in_process_session(client, tiny_model):
    messages = user("First Citizen: Before we proceed any further, hear me speak.")
    reply = chat(client, messages, max_tokens=NEW_TOKENS)
    prompt_ids = tiny_model.tokenizer.apply_chat_template(messages)
    assert reply.choices[0].message.content == reference(tiny_model, prompt_ids)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= reply.usage.completion_tokens <= NEW_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_text_equals_the_non_streamed_text(client):
    messages = user("All: Speak, speak. Resolved, resolved.")
    whole = chat(client, messages, max_tokens=12)
    chunks = list(chat(client, messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices]) >= 3  # role, content..., finish
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_event_stream_ends_with_done(base_url):
    body = {"model": MODEL, "messages": user("You are all resolved rather to die"), "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_a_second_turn_reuses_the_first_turns_blocks(client, tiny_model):
    first = user("Second Citizen: One word, good citizens. We are accounted poor citizens, the patricians good.")
    reply = chat(client, first, max_tokens=NEW_TOKENS)
    first_tokens = len(tiny_model.tokenizer.apply_chat_template(first))
    second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "What authority surfeits on would relieve us?"}]
    again = chat(client, second, max_tokens=NEW_TOKENS)
    assert first_tokens >= 2 * BLOCK_TOKENS
    assert again.usage.prompt_tokens_details.cached_tokens >= first_tokens // BLOCK_TOKENS * BLOCK_TOKENS
    assert again.usage.prompt_tokens == len(tiny_model.tokenizer.apply_chat_template(second))


def test_completions_equal_an_in_process_session(client, tiny_model):
    prompt = "MENENIUS: What work's, my countrymen, in hand?"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    prompt_ids = tiny_model.tokenizer.encode(prompt)
    assert reply.choices[0].text == reference(tiny_model, prompt_ids)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    by_ids = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text


def test_a_seed_makes_sampling_reproducible(client):
    messages = user("BRUTUS: Mark'd you his lip and eyes?")
    texts = [client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=seed,
                                            max_tokens=12).choices[0].message.content for seed in (5, 5, 6, 7)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1  # other seeds draw other tokens (12 tokens of a random model)


def test_a_stop_string_ends_the_text_before_it(client):
    prompt = "MARCIUS: Thanks. What's the matter, you dissentious rogues"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stop = whole[3:5]  # occurs in the greedy answer
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == whole[: whole.index(stop)]
    assert cut.finish_reason == "stop"


def test_a_session_id_keeps_the_conversation_on_one_session(base_url, client, tiny_model):
    prompt_ids = tiny_model.tokenizer.encode("CORIOLANUS: They are dissolved: hang 'em! They said they were an-hungry.")
    config = StoreConfig(device="cpu", device_bytes=8 << 20, host_bytes=8 << 20, block_tokens=BLOCK_TOKENS)
    with Session(tiny_model, config) as session:  # the answer's token ids (served answers equal it, above)
        session.extend(prompt_ids)
        answer_ids = session.generate(NEW_TOKENS)
    first = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0,
                                      user="conversation-7")
    assert first.choices[0].text == tiny_model.tokenizer.decode(answer_ids)
    second_ids = prompt_ids + answer_ids + tiny_model.tokenizer.encode(" Go, get you home, you fragments!")
    again = client.completions.create(model=MODEL, prompt=second_ids, max_tokens=2, temperature=0,
                                      extra_headers={"X-Session-Id": "conversation-7"})
    held = len(prompt_ids) + len(answer_ids)
    assert held % BLOCK_TOKENS  # so the whole log, not just its full blocks, counts as cached
    assert again.usage.prompt_tokens_details.cached_tokens == held
    other_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY_B, max_retries=0)
    foreign = other_key.completions.create(model=MODEL, prompt=second_ids, max_tokens=2, temperature=0,
                                           user="conversation-7")
    assert foreign.usage.prompt_tokens_details.cached_tokens == 0  # another key's pin is another session


# -- tenants --------------------------------------------------------------------------------------

def test_cached_blocks_serve_only_their_tenant(base_url, client):
    messages = user("VOLUMNIA: I pray you, daughter, sing; or express yourself in a more comfortable sort.")
    salted = dict(max_tokens=2, extra_body={"cache_salt": "tenant-one"})
    chat(client, messages, **salted)
    assert chat(client, messages, **salted).usage.prompt_tokens_details.cached_tokens >= BLOCK_TOKENS
    other_salt = chat(client, messages, max_tokens=2, extra_body={"cache_salt": "tenant-two"})
    assert other_salt.usage.prompt_tokens_details.cached_tokens == 0
    other_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY_B, max_retries=0)
    assert chat(other_key, messages, **salted).usage.prompt_tokens_details.cached_tokens == 0


def test_requests_without_a_valid_key_are_refused(base_url):
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(wrong, user("hello"))
    assert refused.value.status_code == 401
    assert refused.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/v1/models").status_code == 401


# -- errors ---------------------------------------------------------------------------------------

def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert refused.value.body["code"] == "model_not_found" and refused.value.body["param"] == "model"


@pytest.mark.parametrize("options, param", [
    (dict(temperature=3.0), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=2), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
])
def test_bad_parameters_are_400_naming_the_parameter(client, options, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=user("hi"), **options)
    assert refused.value.body["param"] == param
    assert refused.value.body["type"] == "invalid_request_error"


def test_a_prompt_longer_than_the_context_is_400_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, user("to the Capitol! " * 200))
    assert refused.value.body["code"] == "context_length_exceeded"
    assert "256" in refused.value.body["message"]
    assert chat(client, user("Come, come."), max_tokens=2).usage.completion_tokens >= 1


def test_malformed_json_is_400(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# -- load and failure -----------------------------------------------------------------------------

def test_sixteen_concurrent_requests_are_all_answered(base_url, tiny_model):
    prompts = [user(f"Citizen {k}: we are {k} times resolved to famish.") for k in range(16)]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY_A, max_retries=0, timeout=240) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model=MODEL, messages=m, temperature=0, max_tokens=4) for m in prompts))

    replies = asyncio.run(ask_all())
    for messages, reply in zip(prompts, replies):
        expected = reference(tiny_model, tiny_model.tokenizer.apply_chat_template(messages), 4)
        assert reply.choices[0].message.content == expected


def test_a_stream_whose_replicas_die_ends_and_the_conversation_goes_on(client):
    messages = user("MENENIUS: Either you must confess yourselves wondrous malicious, or be accused of folly.")
    stream = chat(client, messages, max_tokens=120, stream=True)
    received = [next(stream), next(stream)]
    replicas = replica_actors("tiered")
    assert len(replicas) == 2
    for entry in replicas:
        ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))
    ended_with = "completed"
    try:
        received += list(stream)
    except openai.APIError:
        ended_with = "error event"
    assert ended_with == "error event" or received[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in received)
    follow_up = messages + [{"role": "assistant", "content": text[:40]}, {"role": "user", "content": "Well, well."}]
    assert chat(client, follow_up, max_tokens=2).usage.completion_tokens >= 1


def replica_actors(application: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{application}#SessionReplica")]


def test_while_no_replica_lives_requests_get_503_and_then_answers(base_url, client, tiny_dir):
    """A second application of one replica, with short timeouts; a bounded loop kills its replica as
    soon as Serve starts a new one, so no replica can take a request meanwhile."""
    args = dict(model=str(tiny_dir), served_model_name=MODEL, workers=1, api_keys=[KEY_A], default_max_tokens=2,
                failover_timeout_s=1, call_timeout_s=3, **STORE)
    serve.run(build(args), name="brief", route_prefix="/brief")
    brief = openai.OpenAI(base_url=f"{base_url}/brief/v1", api_key=KEY_A, max_retries=0, timeout=60)
    assert chat(brief, user("First, you know")).usage.completion_tokens >= 1
    stop = threading.Event()

    def keep_killing(limit_s: float = 20.0) -> None:
        deadline_s = time.monotonic() + limit_s
        while not stop.is_set() and time.monotonic() < deadline_s:
            for entry in replica_actors("brief"):
                try:
                    ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))
                except ValueError:
                    pass  # gone between the listing and the kill
            time.sleep(0.05)

    killer = threading.Thread(target=keep_killing, daemon=True)
    killer.start()
    try:
        time.sleep(0.5)
        with pytest.raises(openai.InternalServerError) as refused:
            chat(brief, user("Caius Marcius is chief enemy to the people."))
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "unavailable" and refused.value.body["type"] == "service_unavailable"
        assert chat(client, user("Come, come."), max_tokens=2).usage.completion_tokens >= 1  # others go on
    finally:
        stop.set()
        killer.join()
    deadline_s = time.monotonic() + 180
    while True:  # Serve replaces the replica; then the application answers again
        try:
            assert chat(brief, user("We know't, we know't.")).usage.completion_tokens >= 1
            break
        except openai.InternalServerError as error:
            assert error.status_code == 503
            if time.monotonic() > deadline_s:
                raise
            time.sleep(1)
    serve.delete("brief")

