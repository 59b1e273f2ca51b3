import json
import time
from pathlib import Path

import pytest

from sparamx.pipeline.errors import ModelError
from sparamx.pipeline.models import load_config, resolve_model


def test_default_alias_is_the_packaged_gguf():
    source = resolve_model(None)
    assert source.kind == "gguf" and (Path(source.location) / source.gguf_file).is_file()
    assert load_config(source).model_type == "llama"


def test_aliases_map_to_hub_ids():
    assert resolve_model("llama-3-8b").location == "meta-llama/Meta-Llama-3-8B"
    assert resolve_model("llama-2-7b").kind == "hub"
    assert resolve_model("org/some-model").location == "org/some-model"


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_paths(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model(str(tmp_path / "absent"))
    with pytest.raises(ModelError, match="unknown model 'llama3'"):
        resolve_model("llama3")


def test_unsupported_architecture_fails_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="model type 'gpt2' is not supported"):
        load_config(resolve_model(str(tmp_path)))


def test_unreachable_hub_fails_fast_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="cannot reach the Hugging Face hub .* pass a local model directory"):
        load_config(resolve_model("llama-3-8b"))
    assert time.perf_counter() - start < 10
