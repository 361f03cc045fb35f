"""Token shards: round-trip, manifest validation, corruption detection, prepare() on bad inputs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moelab.data.shards import ShardSet, dtype_for_vocab, prepare, write_shards
from moelab.data.tokenizer import ByteTokenizer
from moelab.errors import DataError, MoelabError

DOCS = [f"document number {i}: " + "abc" * (i % 7) for i in range(200)]


def expected_ids(docs):
    tok = ByteTokenizer()
    out = []
    for d in docs:
        out += tok.encode(d) + [tok.eos_id]
    return out


def test_round_trip_multiple_shards(tmp_path):
    m = write_shards(DOCS, "byte", tmp_path / "s", shard_tokens=1000)
    assert len(m["shards"]) > 3 and m["dtype"] == "uint16" and m["n_documents"] == 200
    s = ShardSet.open(tmp_path / "s", verify=True)
    want = expected_ids(DOCS)
    assert s.total_tokens == len(want) == m["total_tokens"]
    assert s.all_tokens().tolist() == want
    # A read that straddles two shard files.
    assert s.read(995, 10).tolist() == want[995:1005]
    on_disk = np.fromfile(tmp_path / "s" / "shard_00000.bin", dtype="<u2")
    assert on_disk.tolist() == want[:1000]
    assert s.tokenizer() == ByteTokenizer()
    assert [p.name for p in sorted((tmp_path / "s").glob("*.bin"))] == [f"shard_{i:05d}.bin" for i in range(len(m["shards"]))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pre_tokenized_docs_round_trip(tmp_path):
    m = write_shards([[1, 2, 3], [], [255]], "byte", tmp_path / "s")
    assert m["n_documents"] == 3
    assert ShardSet.open(tmp_path / "s").all_tokens().tolist() == [1, 2, 3, 256, 256, 255, 256]


def test_dtype_for_vocab():
    assert dtype_for_vocab(257) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


def test_out_of_vocab_ids_rejected(tmp_path):
    with pytest.raises(DataError, match="outside"):
        write_shards([[1, 2, 300]], "byte", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_corrupted_byte_detected_only_with_verify(tmp_path):
    write_shards(DOCS, "byte", tmp_path / "s", shard_tokens=1000)
    f = tmp_path / "s" / "shard_00001.bin"
    data = bytearray(f.read_bytes())
    data[10] ^= 0x01
    f.write_bytes(bytes(data))
    ShardSet.open(tmp_path / "s")  # size still matches
    with pytest.raises(DataError, match="sha256 mismatch"):
        ShardSet.open(tmp_path / "s", verify=True)


def test_missing_and_truncated_shard(tmp_path):
    write_shards(DOCS, "byte", tmp_path / "s", shard_tokens=1000)
    f = tmp_path / "s" / "shard_00002.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        ShardSet.open(tmp_path / "s")
    f.unlink()
    with pytest.raises(DataError, match="missing"):
        ShardSet.open(tmp_path / "s")
    with pytest.raises(DataError, match="manifest.json not found"):
        ShardSet.open(tmp_path / "nowhere")


def test_prepare_jsonl_and_txt(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "wörld", "x": 1}) + "\n")
    t = tmp_path / "b.txt"
    t.write_text("plain text file\nwith two lines")
    m = prepare([j, t], tmp_path / "out")
    assert m["n_documents"] == 3
    s = ShardSet.open(tmp_path / "out", verify=True)
    assert s.all_tokens().tolist() == expected_ids(["hello", "wörld", "plain text file\nwith two lines"])


def _assert_clean(parent: Path, out: Path):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_prepare_malformed_line_names_file_and_line(tmp_path):
    j = tmp_path / "bad.jsonl"
    rows = [json.dumps({"text": f"row {i}"}) for i in range(20)]
    rows[16] = '{"text": "unterminated'
    j.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        prepare([j], tmp_path / "out", shard_tokens=16)
    assert f"{j}:17: invalid JSON" in str(e.value) and "\n" not in str(e.value)
    _assert_clean(tmp_path, tmp_path / "out")


def test_prepare_missing_field(tmp_path):
    j = tmp_path / "q.jsonl"
    j.write_text(json.dumps({"question": "a"}) + "\n" + json.dumps({"answer": "b"}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl:2: missing field 'question' \(fields: answer\)"):
        prepare([j], tmp_path / "out", field="question")
    _assert_clean(tmp_path, tmp_path / "out")


def test_prepare_missing_input_and_bad_type(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        prepare([missing], tmp_path / "out")
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported input type"):
        prepare([csv], tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no documents"):
        prepare([empty], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_non_empty_out_unless_overwrite(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("abc")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(MoelabError, match="not empty"):
        prepare([t], out)
    prepare([t], out, overwrite=True)
    assert ShardSet.open(out).all_tokens().tolist() == [97, 98, 99, 256]
    assert not (out / "keep").exists()


def test_prepare_real_gsm8k_questions(tmp_path):
    root = Path(os.environ.get("MOELAB_DATA", "/work/shared/data")) / "gsm8k" / "train.jsonl"
    if not root.is_file():
        pytest.skip(f"real data not found at {root} (set MOELAB_DATA)")
    lines = root.read_text(encoding="utf-8").splitlines()[:300]
    sample = tmp_path / "gsm8k300.jsonl"
    sample.write_text("\n".join(lines) + "\n")
    m = prepare([sample], tmp_path / "out", field="question")
    s = ShardSet.open(tmp_path / "out", verify=True)
    assert m["n_documents"] == 300
    assert s.all_tokens().tolist() == expected_ids([json.loads(x)["question"] for x in lines])
