"""The plain parts of `tiered serve`, without Ray: settings, request schemas, error mapping,
tenant salts, and the command's answer to bad options."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError

from runtime.cli import main as tiered
from runtime.cluster.replica import SessionMissing
from runtime.serve import schema
from runtime.serve.engine import tenant_salt
from runtime.serve.errors import APIError, from_exception
from runtime.serve.settings import API_KEY_ENV, ServeSettings


def test_settings_name_the_bad_field():
    with pytest.raises(ValidationError, match="workers"):
        ServeSettings(workers=0)
    with pytest.raises(ValidationError, match="host_codec"):
        ServeSettings(host_codec="int3")
    with pytest.raises(ValidationError, match="unknown"):
        ServeSettings(unknown=1)


def test_api_keys_come_from_the_settings_or_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "k1, k2")
    assert ServeSettings().api_keys == ("k1", "k2")
    assert ServeSettings(api_keys=["mine"]).api_keys == ("mine",)
    monkeypatch.delenv(API_KEY_ENV)
    assert ServeSettings().api_keys == ()


def test_the_model_id_is_the_served_name_or_the_models_name():
    assert ServeSettings(model="smollm2-135m").model_id == "smollm2-135m"
    assert ServeSettings(model="/models/tiny-llama").model_id == "tiny-llama"
    assert ServeSettings(model="/models/tiny-llama", served_model_name="t").model_id == "t"


def test_store_config_has_the_sizes_in_bytes():
    config = ServeSettings(device_mib=3, host_mib=5, block_tokens=16).store_config()
    assert (config.device_bytes, config.host_bytes, config.block_tokens) == (3 << 20, 5 << 20, 16)


def test_requests_validate_like_openai():
    ok = schema.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                      {"type": "text", "text": "b"}]}],
                                      max_completion_tokens=5, stop="x", stream_options={"include_usage": True})
    assert ok.messages[0].text() == "ab" and ok.max_tokens == 5 and ok.stop_strings() == ["x"] and ok.include_usage
    for bad in (dict(messages=[]), dict(temperature=-1), dict(logprobs=True), dict(top_p=0.0), dict(top_p=1.5),
                dict(stop=[""]), dict(messages=[{"role": "robot", "content": "x"}])):
        with pytest.raises(ValidationError):
            schema.ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "x"}], **bad})
    assert schema.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], top_p=0.5,
                                        temperature=1.0).top_p == 0.5
    for bad in (dict(prompt=""), dict(prompt=["a", "b"]), dict(prompt="a", echo=True), dict(prompt="a", suffix="z")):
        with pytest.raises(ValidationError):
            schema.CompletionRequest(model="m", **bad)


@pytest.mark.parametrize("error, status", [
    (RayActorError(), 503), (ActorUnavailableError("gone", b"0" * 16), 503), (SessionMissing("s"), 503),
    (TimeoutError("slow"), 503), (ValueError("too long for the store"), 400), (RuntimeError("bug"), 500),
    (APIError(404, "no"), 404),
])
def test_failures_map_to_openai_errors(error, status):
    answer = from_exception(error)
    assert answer.status == status
    assert set(answer.body()["error"]) == {"message", "type", "param", "code"}


def test_a_validation_error_names_the_parameter():
    error = RequestValidationError([{"loc": ("body", "temperature"), "msg": "too hot", "type": "less_than_equal"}])
    answer = from_exception(error)
    assert (answer.status, answer.param) == (400, "temperature")


def test_tenant_salts_differ_by_key_and_by_cache_salt():
    salts = {tenant_salt(None, None), tenant_salt("a", None), tenant_salt("b", None), tenant_salt("a", "x"),
             tenant_salt(None, "x")}
    assert len(salts) == 5 and tenant_salt(None, None) == ""
    assert "secret-key" not in tenant_salt("secret-key", None)  # the key itself never reaches a replica


def test_the_command_refuses_bad_options_in_one_line(capsys):
    assert tiered(["serve", "--workers", "0"]) == 2
    assert tiered(["serve", "--host-codec", "int3"]) == 2
    assert tiered(["serve", "--port", "70000"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("tiered serve: --workers")
    assert "--host-codec" in lines[1] and "--port" in lines[2]


def _serve_args(argv: list[str]):
    from runtime.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_a_config_file_gives_settings_and_options_override_it(tmp_path):
    from runtime.commands.serve import settings_of

    config = tmp_path / "serve.yaml"
    config.write_text("workers: 3\nblock_tokens: 16\napi_keys: [a, b]\ncpus_per_worker: 0.5\n")
    settings = settings_of(_serve_args(["--config", str(config), "--workers", "2", "--max-tokens", "9"]))
    assert (settings.workers, settings.block_tokens, settings.api_keys) == (2, 16, ("a", "b"))
    assert (settings.cpus_per_worker, settings.default_max_tokens, settings.no_reuse) == (0.5, 9, False)
    assert settings_of(_serve_args(["--no-reuse"])).no_reuse is True


def test_a_bad_config_file_is_one_line_naming_the_field(tmp_path, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text("cpus_per_worker: -1\n")
    assert tiered(["serve", "--config", str(config)]) == 2
    assert tiered(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    config.write_text("- a list\n")
    assert tiered(["serve", "--config", str(config)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("tiered serve: --config: cpus_per_worker")
    assert "missing.yaml" in lines[1] and "mapping" in lines[2]


def test_settings_come_from_a_file_then_the_environment_then_options(tmp_path, monkeypatch, capsys):
    from runtime.commands.serve import settings_of

    config = tmp_path / "serve.yaml"
    config.write_text("workers: 3\nstep_tokens: 128\nhost_codec: int4\n")
    env = {"TIERED_WORKERS": "4", "TIERED_MAX_SEQUENCES": "1", "TIERED_NO_REUSE": "true"}
    settings = ServeSettings.load(config, env=env, step_tokens=64)
    assert (settings.workers, settings.max_sequences, settings.no_reuse) == (4, 1, True)  # the environment over the file
    assert (settings.step_tokens, settings.host_codec) == (64, "int4")  # options over both; the file's own
    with pytest.raises(ValidationError, match="max_sequences"):
        ServeSettings.load(env={"TIERED_MAX_SEQUENCES": "0"})
    monkeypatch.setenv("TIERED_WORKERS", "2")
    assert settings_of(_serve_args(["--config", str(config)])).workers == 2
    assert settings_of(_serve_args(["--config", str(config), "--workers", "5"])).workers == 5
    monkeypatch.setenv("TIERED_STEP_TOKENS", "many")
    assert tiered(["serve"]) == 2
    assert capsys.readouterr().out.strip().startswith("tiered serve: TIERED_STEP_TOKENS: ")
