"""`tiered serve` as a user starts it (a subprocess on 127.0.0.1), with the real default model:
a chat answer equals an in-process Session's at temperature 0, and the next turn of the
conversation reuses the first turn's blocks; SIGTERM stops the server cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

from runtime import Session
from tiered import StoreConfig

pytestmark = pytest.mark.timeout(420)
MODEL = "smollm2-135m"
BLOCK_TOKENS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path_factory.mktemp("serve-smollm2") / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", "--model", MODEL, "--workers", "1", "--port", str(port),
             "--num-cpus", "2", "--host-codec", "raw", "--disk-codec", "raw", "--device-mib", "128"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TIERED_API_KEY")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline_s = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"tiered serve exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline_s, f"not healthy in time: {log_path.read_text()[-2000:]}"
            try:
                if "serving" in log_path.read_text() and httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield process, url, log_path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_a_conversation_with_the_default_model(server, smollm2):
    _, url, log_path = server
    assert f"serving '{MODEL}' on {url}/v1" in log_path.read_text()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=240)
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly. You know geography: "
                                              "countries, their capitals, rivers and famous buildings, and you "
                                              "answer questions about them in one short sentence, without lists."},
                {"role": "user", "content": "The capital of France is a city on the Seine. What is the capital of "
                                            "France, and name one famous building there?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    prompt_ids = smollm2.tokenizer.apply_chat_template(messages)
    with Session(smollm2, StoreConfig(device="cpu", block_tokens=BLOCK_TOKENS)) as session:
        session.extend(prompt_ids)
        expected = smollm2.tokenizer.decode(session.generate(12))
    answer = reply.choices[0].message.content
    assert answer == expected and "Paris" in answer
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert len(prompt_ids) >= BLOCK_TOKENS
    assert again.usage.prompt_tokens_details.cached_tokens >= len(prompt_ids) // BLOCK_TOKENS * BLOCK_TOKENS


def test_sigterm_stops_the_server(server):
    process, url, _ = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=5)
