import pytest
import torch

from sparamx.pipeline.errors import DataError
from sparamx.pipeline.textdata import calibration_windows, load_documents, read_documents


def test_c4_windows_from_the_shared_data(data_root, smol_tokenizer):
    docs = load_documents("c4")
    assert len(docs) > 1000
    windows = calibration_windows(smol_tokenizer, docs, nsamples=4, seqlen=256, seed=0)
    assert len(windows) == 4 and all(w.shape == (1, 256) and w.dtype == torch.long for w in windows)
    again = calibration_windows(smol_tokenizer, docs, nsamples=4, seqlen=256, seed=0)
    other = calibration_windows(smol_tokenizer, docs, nsamples=4, seqlen=256, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    assert not torch.equal(windows[0], other[0])
    assert "the" in smol_tokenizer.decode(windows[0][0]).lower()


def test_too_little_text_says_what_to_do(smol_tokenizer):
    with pytest.raises(DataError, match="lower calibration.nsamples"):
        calibration_windows(smol_tokenizer, ["a few words " * 50], nsamples=10, seqlen=64)
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(smol_tokenizer, ["tiny"], nsamples=1, seqlen=64)


def test_local_files_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": ""}\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_text("third document")
    assert read_documents(tmp_path) == ["first", "second", "third document"]
    assert load_documents("c4", tmp_path / "b.txt") == ["third document"]


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: expected an object with a string field 'text'"):
        read_documents(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        read_documents(path)
    with pytest.raises(DataError, match="text file not found"):
        read_documents(tmp_path / "absent.jsonl")
