import json
import tracemalloc

import numpy as np
import pytest

from jetson_dllm.errors import DllmError
from jetson_dllm.tokenizer import TextTokenizer
from train_host.data import CanvasDataset, batch_indices, load_manifest, prepare_data
from train_host.sources import Source, detect_format

DOCS = ["Once upon a time there was a cat.", "The dog ran to the park.\nIt was happy.", "Lily found a red ball."]


def test_tinystories_format_splits_on_endoftext(tmp_path):
    f = tmp_path / "ts.txt"
    f.write_text("\n<|endoftext|>\n".join(DOCS) + "\n<|endoftext|>\n")
    assert detect_format(f) == "tinystories"
    assert list(Source(str(f)).documents()) == DOCS


def test_endoftext_inside_a_line(tmp_path):
    f = tmp_path / "ts.txt"
    f.write_text("First story.<|endoftext|>Second story.\n<|endoftext|>")
    assert list(Source(str(f)).documents()) == ["First story.", "Second story."]


def test_lines_format_one_document_per_line(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("first doc\n\nsecond doc\n")
    assert detect_format(f) == "lines"
    assert list(Source(str(f)).documents()) == ["first doc", "second doc"]


def test_jsonl_with_a_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"story": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    assert list(Source(str(f), text_field="story").documents()) == DOCS
    with pytest.raises(DllmError, match="--text-field"):
        list(Source(str(f)).documents())
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DllmError, match="line 2 is not JSON"):
        list(Source(str(tmp_path / "bad.jsonl")).documents())


def test_parquet_in_the_hugging_face_data_set_shape(tmp_path):
    # roneneldan/TinyStories on the hub: data/train-0000x-of-0000y.parquet with a "text" column.
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"text": DOCS * 500}), path, row_group_size=256)
    docs = list(Source(str(path)).documents())
    assert len(docs) == 1500 and docs[:3] == DOCS
    with pytest.raises(DllmError, match="column"):
        list(Source(str(path), text_field="story").documents())


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(DllmError, match="not found"):
        Source(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DllmError, match="empty"):
        Source(str(tmp_path / "empty.txt"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DllmError, match="unknown data format"):
        Source(str(tmp_path / "x.csv"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DllmError, match="not UTF-8"):
        list(Source(str(tmp_path / "latin1.txt")).documents())
    with pytest.raises(DllmError, match="unknown format"):
        Source("builtin", fmt="csv")


def test_large_file_is_streamed_not_read_whole(tmp_path):
    f = tmp_path / "big.txt"
    story = "Once upon a time there was a little fox who liked to run. " * 8
    with open(f, "w") as out:
        for _ in range(40000):
            out.write(story + "\n<|endoftext|>\n")
    size = f.stat().st_size
    assert size > 15_000_000
    tracemalloc.start()
    n = sum(1 for _ in Source(str(f)).documents())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 40000
    assert peak < size / 5, f"peak {peak} bytes while reading a {size}-byte file"  # format sniffing reads 1 MiB


def test_prepare_writes_shards_split_and_manifest(tmp_path):
    m = prepare_data([Source("builtin", builtin_stories=200)], tmp_path / "d", vocab_size=400, val_fraction=0.1)
    assert m["splits"]["val"]["docs"] == 20 and m["splits"]["train"]["docs"] == 180
    assert load_manifest(tmp_path / "d")["tokenizer_sha256"] == m["tokenizer_sha256"]
    tok = TextTokenizer.from_file(tmp_path / "d" / "tokenizer.json")
    tokens = np.memmap(tmp_path / "d" / "train.bin", dtype=np.uint16, mode="r")
    offsets = np.load(tmp_path / "d" / "train.idx.npy")
    assert offsets[-1] == tokens.size == m["splits"]["train"]["tokens"]
    assert (tokens[offsets[1:] - 1] == tok.eot_id).all()  # every document ends with end-of-text
    from train_host.corpus import story

    assert tok.decode(tokens[offsets[0] : offsets[1]]) == story(1)  # story 0 went to validation


def test_existing_output_is_never_damaged(tmp_path):
    out = tmp_path / "d"
    prepare_data([Source("builtin", builtin_stories=50)], out, vocab_size=300, val_fraction=0.1)
    before = (out / "train.bin").read_bytes()
    with pytest.raises(DllmError, match="--overwrite"):
        prepare_data([Source("builtin", builtin_stories=60)], out, vocab_size=300, val_fraction=0.1)

    def explode(phase, done, total):
        if phase == "tokenize":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_data([Source("builtin", builtin_stories=600)], out, vocab_size=300, overwrite=True, progress=explode)
    assert (out / "train.bin").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_no_documents_is_an_error(tmp_path):
    f = tmp_path / "blank.txt"
    f.write_text("\n\n   \n")
    with pytest.raises(DllmError, match="no documents"):
        prepare_data([Source(str(f))], tmp_path / "d", vocab_size=300)


def test_canvases_one_document_each_long_ones_windowed(tmp_path):
    f = tmp_path / "ts.txt"
    long_doc = " ".join(f"word{i}" for i in range(200))
    # 15 documents; with val_fraction 0.2 documents 0, 5 and 10 go to validation.
    docs = ["held out"] + [long_doc] + DOCS * 4 + ["the last short one"]
    f.write_text("\n<|endoftext|>\n".join(docs))
    prepare_data([Source(str(f))], tmp_path / "d", vocab_size=300, val_fraction=0.2)
    tok = TextTokenizer.from_file(tmp_path / "d" / "tokenizer.json")
    ds = CanvasDataset(tmp_path / "d", "train", canvas_len=32, pad_id=tok.pad_id)
    n_long = len(tok.encode(long_doc)) + 1
    assert n_long > 64
    assert len(ds) == 11 + -(-n_long // 32)  # 11 short train documents, the long one in windows
    batch = ds.batch(np.arange(len(ds)))
    assert batch.shape == (len(ds), 32)
    assert (batch == tok.eot_id).sum() == 12  # one end-of-text per document, in the last window of the long one
    windows = batch[: -(-n_long // 32)]
    assert tok.decode(windows.reshape(-1)) == long_doc
    short = batch[-1]
    n = int(np.argmax(short == tok.eot_id))
    assert tok.decode(short) == "the last short one" and (short[n + 1 :] == tok.pad_id).all()


def test_truncated_shard_is_refused(tmp_path):
    prepare_data([Source("builtin", builtin_stories=50)], tmp_path / "d", vocab_size=300, val_fraction=0.1)
    data = (tmp_path / "d" / "train.bin").read_bytes()
    (tmp_path / "d" / "train.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(DllmError, match="truncated"):
        CanvasDataset(tmp_path / "d", "train", 64, 0)
    with pytest.raises(DllmError, match="not a prepared data folder"):
        CanvasDataset(tmp_path, "train", 64, 0)


def test_batch_order_is_a_function_of_the_data_position():
    a = np.concatenate([batch_indices(10, 4, s, seed=3) for s in range(0, 40, 4)])
    b = batch_indices(10, 40, 0, seed=3)
    assert np.array_equal(a, b)
    for epoch in range(4):
        assert sorted(b[epoch * 10 : (epoch + 1) * 10]) == list(range(10))  # each epoch a permutation
    assert not np.array_equal(b[:10], b[10:20])
    assert not np.array_equal(batch_indices(10, 10, 0, seed=4), b[:10])


def test_pairs_are_the_first_sentence_and_the_rest_in_the_shards_split(tmp_path):
    import json

    from train_host.data import prepare_data
    from train_host.pairs import read_pairs, split_pair
    from train_host.sources import Source

    assert split_pair('Tom ran. "Wait!" he said.') == ("Tom ran.", '"Wait!" he said.')
    assert split_pair('"Come here!" Mom said. Tom came.') == ('"Come here!"', "Mom said. Tom came.")
    assert split_pair("One sentence only.") is None and split_pair("no end at all") is None
    corpus = tmp_path / "c.txt"
    docs = [f"Story {i} starts here. It goes on {i}." if i % 3 else f"Only one sentence {i}." for i in range(60)]
    corpus.write_text("\n".join(docs) + "\n")
    m = prepare_data([Source(str(corpus), fmt="lines")], tmp_path / "d", vocab_size=300, val_fraction=0.1, pairs=True)
    val = read_pairs(tmp_path / "d")  # the folder: its validation pairs
    assert m["pairs"]["val"]["pairs"] == len(val) and m["pairs"]["val"]["skipped"] + len(val) == m["splits"]["val"]["docs"]
    assert m["pairs"]["train"]["pairs"] + m["pairs"]["val"]["pairs"] == 40
    assert all(c.startswith("Story") and c.endswith("starts here.") and t.startswith("It goes on") for c, t in val)
    stride = round(1 / 0.1)  # the shards' split: documents 0, stride, 2 stride... are validation
    assert [c for c, _ in val] == [f"Story {i} starts here." for i in range(0, 60, stride) if i % 3]
    assert set(m["files"]) >= {"pairs.train.jsonl", "pairs.val.jsonl"}
    assert all(json.loads(line).keys() == {"condition", "text"} for line in (tmp_path / "d" / "pairs.train.jsonl").open())
