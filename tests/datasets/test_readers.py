import gzip
import json

import numpy as np
import pytest

from modelpress.datasets import NAMED, ImageDataset, LabeledTextDataset, PairDataset, TextCorpus, load_dataset
from modelpress.datasets.hub import parse_hub_spec
from modelpress.errors import DataNotFoundError, DatasetError
from modelpress.locations import DATA_ENV, find_data_dir

# What the shared data README states for each file (counts checked against the real files).
EXPECTED = {
    "stsb-dev": (PairDataset, 1500),
    "stsb-train": (PairDataset, 5749),
    "sst2-dev": (LabeledTextDataset, 872),
    "sst2-train": (LabeledTextDataset, 67349),
    "trec-test": (LabeledTextDataset, 500),
    "trec-train": (LabeledTextDataset, 5452),
    "wikitext2-test": (TextCorpus, 1),
    "tinystories": (TextCorpus, 5),
    "tinyshakespeare": (TextCorpus, 1),
    "tinyshakespeare-train": (TextCorpus, 1),
    "tinyshakespeare-test": (TextCorpus, 1),
    "mnist-test": (ImageDataset, 10000),
    "mnist-train5k": (ImageDataset, 5000),
}


def test_every_named_dataset_has_an_expectation():
    assert set(EXPECTED) == set(NAMED), "add the new dataset to EXPECTED with its size"


@pytest.mark.needs_data
@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_dataset_reads(name, data_dir):
    kind, n = EXPECTED[name]
    ds = load_dataset(name, kind, data_dir_=data_dir)
    assert isinstance(ds, kind) and len(ds) == n


@pytest.mark.needs_data
def test_reader_details(data_dir):
    sst = load_dataset("sst2-dev", data_dir_=data_dir)
    assert sum(sst.labels) == 444 and sst.label_names == ["negative", "positive"]
    trec = load_dataset("trec-train", data_dir_=data_dir)
    assert len(trec.label_names) == 6 and set(trec.labels) == set(range(6))
    sts = load_dataset("stsb-dev", data_dir_=data_dir)
    assert sts.scores[0] == 5.0 and sts.sentences1[0] == "A man with a hard hat is dancing."
    assert all(0 <= s <= 5 for s in sts.scores)
    mn = load_dataset("mnist-test", data_dir_=data_dir)
    assert mn.images.shape == (10000, 28, 28) and mn.images.dtype == np.uint8 and set(mn.labels.tolist()) == set(range(10))
    five = load_dataset("mnist-train5k", data_dir_=data_dir)
    assert five.images.max() > 200  # pixels are 0-255
    stories = load_dataset("tinystories", data_dir_=data_dir)
    assert all(d.startswith(("Once", "One")) for d in stories.documents)
    assert load_dataset("stsb-dev", data_dir_=data_dir, limit=10).__len__() == 10


def test_wrong_kind_is_refused_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_DATA", str(tmp_path))
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2/dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(DatasetError, match="holds LabeledTextDataset, but this task needs PairDataset") as err:
        load_dataset("sst2-dev", PairDataset)
    assert "stsb-dev (embedding)" in str(err.value)


def test_user_csv_tsv_jsonl_txt_npz(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text('sentence1,sentence2,score\n"a, quoted",b,4.5\nc,d,1\n')
    ds = load_dataset(str(csv), PairDataset)
    assert ds.sentences1 == ["a, quoted", "c"] and ds.scores == [4.5, 1.0]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("review\tstars\ngreat\tgood\nbad\tpoor\nok\tgood\n")
    ds = load_dataset(str(tsv), LabeledTextDataset, columns={"text": "review", "label": "stars"})
    assert ds.texts == ["great", "bad", "ok"] and ds.labels == [0, 1, 0] and ds.label_names == ["good", "poor"]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(["x", "y", "z"])))
    ds = load_dataset(str(jl), LabeledTextDataset)
    assert ds.labels == [0, 1, 0] and ds.label_names == ["0", "1"]
    txt = tmp_path / "corpus.txt"
    txt.write_text("hello world\n")
    assert load_dataset(str(txt), TextCorpus).documents == ["hello world\n"]
    npz = tmp_path / "imgs.npz"
    np.savez(npz, images=np.zeros((3, 28, 28), np.uint8), labels=np.array([1, 2, 3]))
    assert len(load_dataset(str(npz), ImageDataset)) == 3


def test_wrong_columns_say_what_is_there(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("question,answer\nwhy,because\n")
    with pytest.raises(DatasetError, match=r"no column 'sentence1' \(columns found: question, answer\)") as err:
        load_dataset(str(f), PairDataset)
    assert "--columns" in str(err.value)
    g = tmp_path / "scores.csv"
    g.write_text("sentence1,sentence2,score\na,b,high\n")
    with pytest.raises(DatasetError, match="not a number"):
        load_dataset(str(g), PairDataset)


def test_bad_jsonl_and_empty_and_unknown(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "a", "label": 1}\n{broken\n')
    with pytest.raises(DatasetError, match=r"x.jsonl:2: not valid JSON"):
        load_dataset(str(f), LabeledTextDataset)
    e = tmp_path / "e.csv"
    e.write_text("text,label\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(str(e), LabeledTextDataset)
    with pytest.raises(DatasetError, match=r"Known names: .*stsb-dev"):
        load_dataset("stsb-devv", PairDataset)
    with pytest.raises(DatasetError, match="needs a task"):
        load_dataset(str(e))


def test_image_files_must_be_npz(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("a\n1\n")
    with pytest.raises(DatasetError, match="npz"):
        load_dataset(str(f), ImageDataset)


def test_stsb_reader_rejects_short_rows(tmp_path):
    from modelpress.datasets.local import read_stsb

    f = tmp_path / "s.csv"
    f.write_text("a\tb\tc\n")
    with pytest.raises(DatasetError, match="at least 7"):
        read_stsb(f)


def test_mnist_idx_reader_roundtrip(tmp_path):
    import struct

    from modelpress.datasets.local import read_mnist_idx

    imgs = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    with gzip.open(tmp_path / "i.gz", "wb") as fh:
        fh.write(struct.pack(">HBB3I", 0, 8, 3, 2, 28, 28) + imgs.tobytes())
    with gzip.open(tmp_path / "l.gz", "wb") as fh:
        fh.write(struct.pack(">HBB1I", 0, 8, 1, 2) + bytes([7, 3]))
    ds = read_mnist_idx(tmp_path / "i.gz", tmp_path / "l.gz")
    np.testing.assert_array_equal(ds.images, imgs)
    assert ds.labels.tolist() == [7, 3]


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert find_data_dir() == tmp_path.resolve()
    assert find_data_dir(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        find_data_dir()
    with pytest.raises(DataNotFoundError, match="does not exist"):
        find_data_dir(tmp_path / "nope")


def test_missing_file_in_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"sts-dev\.csv' is missing"):
        load_dataset("stsb-dev", PairDataset, data_dir_=tmp_path)


def test_hub_spec_parsing():
    assert parse_hub_spec("hf:glue/sst2:validation") == ("glue", "sst2", "validation")
    assert parse_hub_spec("hf:imdb:test") == ("imdb", None, "test")
    assert parse_hub_spec("hf:owner/ds/cfg:train") == ("owner/ds", "cfg", "train")
    with pytest.raises(DatasetError, match="names no split"):
        parse_hub_spec("hf:imdb")
