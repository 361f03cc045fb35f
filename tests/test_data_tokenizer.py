"""Tokenizers: byte round-trip, HF wrapper, save/load, BPE training, spec errors."""

import json

import pytest

from moelab.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
from moelab.errors import ConfigError, DataError, MoelabError

TEXT = "Zorvan Keltap was born in Kraków in 1923. ✓\nQuestion: What?"


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.eos_id == 256 and tok.vocab_size == 257
    assert tok.decode(ids[:5] + [tok.eos_id] + ids[5:]) == TEXT  # specials are dropped


def test_byte_tokenizer_save_load(tmp_path):
    path = ByteTokenizer().save(tmp_path)
    assert json.loads(path.read_text()) == {"type": "byte"}
    assert load_tokenizer(tmp_path) == ByteTokenizer()
    assert load_tokenizer(path) == ByteTokenizer()
    assert load_tokenizer("byte") == ByteTokenizer()


def test_train_bpe_and_hf_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    data = tmp_path / "corpus.jsonl"
    lines = [{"text": f"The birth year of person {i} is {1900 + i % 100}. Their favourite colour is blue."} for i in range(300)]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = train_bpe([data], 400, tmp_path / "tok")
    assert out == tmp_path / "tok" / "tokenizer.json" and out.is_file()
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size <= 400 and tok.eos_id == 0
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(tok.encode(lines[0]["text"])) < len(lines[0]["text"].encode()) / 2  # merges were learned
    assert tok.eos_id not in tok.encode(TEXT)
    saved = tok.save(tmp_path / "copy")
    assert load_tokenizer(saved) == tok
    # the EOS text is public (generation adds it to the stop strings, as lm-eval does)
    from moelab.eval.generate import stop_strings

    assert tok.eos_token == "<|endoftext|>" and ByteTokenizer().eos_token is None
    assert stop_strings(["\n\n"], tok) == ("\n\n", "<|endoftext|>")
    assert stop_strings(["\n\n"], ByteTokenizer()) == ("\n\n",)


def test_train_bpe_errors(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe([tmp_path / "x.txt"], 10, tmp_path / "t.json")
    with pytest.raises(DataError, match="not found"):
        train_bpe([tmp_path / "missing.txt"], 300, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("spec", ["gpt2", "bytes", "/nonexistent/tokenizer.json"])
def test_unknown_tokenizer_spec(spec):
    with pytest.raises(ConfigError, match="unknown tokenizer spec"):
        load_tokenizer(spec)


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(MoelabError) as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)
