import json
import time
from pathlib import Path

import pytest
import torch

from sparamx.pipeline import gguf_cache
from sparamx.pipeline.errors import ModelError
from sparamx.pipeline.models import load_config, load_model, load_tokenizer, resolve_model


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


@pytest.mark.slow
def test_a_gguf_loads_through_its_converted_copy_unchanged(monkeypatch, data_root):
    """The cached directory gives the tensors, config and tokenizer of reading the GGUF itself (which is ~40x
    slower); a GGUF over the size limit is read directly."""
    source = resolve_model("smollm2-135m")
    location, kwargs = source.readable()
    assert kwargs == {} and Path(location).parent == gguf_cache.cache_dir() / "gguf"
    cached = load_model(source), load_config(source), load_tokenizer(source)
    monkeypatch.setattr(gguf_cache, "GGUF_CACHE_MAX_BYTES", 0)
    assert source.readable() == (source.location, {"gguf_file": source.gguf_file})
    direct = load_model(source), load_config(source), load_tokenizer(source)
    weights = [model.state_dict() for model, _, _ in (cached, direct)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    settings = [
        {k: v for k, v in config.to_diff_dict().items() if k not in ("architectures", "dtype", "_name_or_path")}
        for _, config, _ in (cached, direct)
    ]
    assert settings[0] == settings[1]
    text = (data_root / "wikitext-2-raw" / "wikitext2_test_joined.txt").read_text(encoding="utf-8")[:50_000]
    assert cached[2](text).input_ids == direct[2](text).input_ids
    chat = [{"role": "user", "content": "Name a prime."}]
    assert cached[2].apply_chat_template(chat, tokenize=False) == direct[2].apply_chat_template(chat, tokenize=False)
