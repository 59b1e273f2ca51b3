import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Real text for calibration and evaluation: ../shared/data beside the checkout (as in CI), unless set already.
if "SPARAMX_DATA" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
    os.environ["SPARAMX_DATA"] = str(REPO.parent / "shared" / "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The last-artifact pointer and cached dense eval results of test runs stay out of the user's cache.
os.environ.setdefault("SPARAMX_CACHE", tempfile.mkdtemp(prefix="sparamx-test-cache-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = os.environ.get("SPARAMX_DATA")
    if not root or not Path(root).is_dir():
        pytest.fail("real text is needed: set SPARAMX_DATA to the shared data folder (../shared/data in CI)")
    return Path(root)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from sparamx.pipeline.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A small random Llama (SmolLM2's vocabulary and tokenizer, tied embeddings) saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=136,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def keeps_torch_threads(request):
    """A test that changes torch's thread count must put it back: every later test of the session (the end-to-end
    ones, most of the suite's time) would otherwise run on what it left."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        left = torch.get_num_threads()
        torch.set_num_threads(threads)
        pytest.fail(f"{request.node.nodeid} left torch at {left} threads (was {threads})")


_RESULTS: list[str] = []


@pytest.fixture
def report():
    """Record a measured figure; all of them are printed at the end of the run (also when output is captured)."""
    return _RESULTS.append


def pytest_terminal_summary(terminalreporter):
    if _RESULTS:
        terminalreporter.section("sparamx measurements")
        for line in _RESULTS:
            terminalreporter.write_line(line)
