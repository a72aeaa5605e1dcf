"""fa_jax.data: sources, malformed lines, packing layout, sharding, seeded order, resumable position."""
import gzip
import json
import warnings

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fa_jax import data
from fa_jax.errors import FaJaxError
from fa_jax.models.transformer import segment_positions

PAD, BOS, EOS = 0, 1, 2


def w(k):  # token id of the word f"w{k}"
    return 4 + k


@pytest.fixture(scope="module", autouse=True)
def quiet_and_contained(tmp_path_factory):
    """No progress bars; datasets' default cache (streaming generators lock files there) in a temporary dir."""
    was_enabled, cache = datasets.is_progress_bar_enabled(), datasets.config.HF_DATASETS_CACHE
    datasets.disable_progress_bars()
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = cache
    if was_enabled:
        datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level: "w0".."w499" -> 4..503, one token per word, with pad/bos/eos."""
    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS, "[UNK]": 3, **{f"w{k}": w(k) for k in range(500)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def words(*ks):
    return " ".join(f"w{k}" for k in ks)


def corpus(n, seed=0, max_words=30):
    """n distinct documents of 1..max_words words; document i starts with the word w_i."""
    rng = np.random.default_rng(seed)
    return [words(i, *rng.integers(0, 500, rng.integers(0, max_words))) for i in range(n)]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def packed(source, tokenizer, cache, **kw):
    kw = {"seq_len": 16, "batch_size": 3, "seed": 0, "process_index": 0, "process_count": 1, **kw}
    return data.PackedBatches(source, tokenizer, cache_dir=str(cache), **kw)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


# ------------------------------------------------------------------------------------------------------- layout

def test_packing_layout_by_hand(tokenizer, tmp_path):
    A, B, C = words(0, 1, 2), words(3, 4, 5, 6, 7, 8), words(9)  # 5, 8 and 3 tokens with BOS and EOS
    order = data.permute(np.arange(3), 3, (0, 0))  # epoch 0 visits docs[order[0]], docs[order[1]], ...
    docs = [None] * 3
    for text, i in zip((A, B, C), order):
        docs[i] = text
    it = packed(datasets.Dataset.from_dict({"text": docs}), tokenizer, tmp_path, seq_len=6, batch_size=2,
                num_epochs=1)
    b0, b1 = next(it), next(it)
    with pytest.raises(StopIteration):
        next(it)
    # stream: [1 4 5 6 2 | 1 7 8 9 10 11 12 2 | 1 13 2]; row r = stream[6r : 6r + 7]
    expect = {
        "tokens": [[1, 4, 5, 6, 2, 1], [7, 8, 9, 10, 11, 12], [2, 1, 13, 2, PAD, PAD], [PAD] * 6],
        "labels": [[4, 5, 6, 2, 1, 7], [8, 9, 10, 11, 12, 2], [1, 13, 2, PAD, PAD, PAD], [PAD] * 6],
        "mask": [[1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0] * 6],
        "segment_ids": [[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 1], [1, 2, 2, 2, 0, 0], [0] * 6],
        "positions": [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 0, 0], [0] * 6],
    }
    for k, v in expect.items():
        got = np.concatenate([b0[k], b1[k]])
        assert got.dtype == np.int32 and got.shape == (4, 6), k
        np.testing.assert_array_equal(got, v, err_msg=k)
    for b in (b0, b1):  # the model's own reading of segment ids gives the same positions on real tokens
        real = b["segment_ids"] != 0
        np.testing.assert_array_equal(np.asarray(segment_positions(b["segment_ids"]))[real], b["positions"][real])


def test_bos_eos_options(tokenizer, tmp_path):
    ds = datasets.Dataset.from_dict({"text": [words(0, 1, 2)]})
    rows = lambda **kw: next(packed(ds, tokenizer, tmp_path, seq_len=4, batch_size=1, num_epochs=1, **kw))
    np.testing.assert_array_equal(rows(add_bos=False)["tokens"], [[4, 5, 6, 2]])
    np.testing.assert_array_equal(rows(add_eos=False)["tokens"], [[1, 4, 5, 6]])
    np.testing.assert_array_equal(rows(add_bos=False, add_eos=False)["mask"], [[1, 1, 0, 0]])
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="[EOS]",
                                     pad_token="[PAD]")
    np.testing.assert_array_equal(next(packed(ds, no_bos, tmp_path, seq_len=4, batch_size=1))["tokens"],
                                  [[4, 5, 6, 2]])
    with pytest.raises(FaJaxError, match="no bos token"):
        packed(ds, no_bos, tmp_path, add_bos=True)


# ---------------------------------------------------------------------------------------------- order and shares

def test_permutation():
    for n in (1, 2, 5, 255, 256, 257, 1000, 4099):
        perm = data.permute(np.arange(n), n, (3, 1))
        np.testing.assert_array_equal(np.sort(perm), np.arange(n))
        idx = np.arange(n)[n // 3::2]
        np.testing.assert_array_equal(data.permute(idx, n, (3, 1)), perm[idx])
    a, b = data.permute(np.arange(1000), 1000, (0, 0)), data.permute(np.arange(1000), 1000, (0, 1))
    assert (a != b).mean() > 0.9 and abs(np.corrcoef(a, np.arange(1000))[0, 1]) < 0.1


def first_words(batches):
    """Document ids (w_i at the start of document i) in the order the batches hold them."""
    out = []
    for b in batches:
        t = b["tokens"].reshape(-1)
        starts = np.flatnonzero(t[:-1] == BOS) + 1
        out += [int(t[s]) - 4 for s in starts]
    return out


def test_process_shares_are_disjoint_and_cover(tokenizer, tmp_path):
    docs = [words(i) for i in range(41)]  # 1 word each: every document is [BOS, w_i, EOS]
    ds = datasets.Dataset.from_dict({"text": docs})
    shares = []
    for pi in range(3):
        batches = list(packed(ds, tokenizer, tmp_path, seq_len=8, batch_size=2, process_index=pi,
                              process_count=3, num_epochs=1))
        seen = [int(t) - 4 for b in batches for t in b["tokens"][b["tokens"] >= 4]]
        assert len(seen) == len(set(seen)) and len(seen) in (13, 14)
        shares.append(set(seen))
    assert not (shares[0] & shares[1]) and not (shares[0] & shares[2]) and not (shares[1] & shares[2])
    assert set.union(*shares) == set(range(41))


def test_seed_fixes_the_order_and_epochs_reshuffle(tokenizer, tmp_path):
    ds = datasets.Dataset.from_dict({"text": [words(i) for i in range(50)]})
    order = lambda seed: first_words(take(packed(ds, tokenizer, tmp_path, seq_len=15, batch_size=2, seed=seed), 10))
    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    assert sorted(a[:50]) == list(range(50)) and sorted(a[50:100]) == list(range(50))  # whole epochs
    assert a[:50] != a[50:100]  # a new permutation each epoch


# --------------------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("k", [0, 4, 13])
def test_resume_gives_the_same_batches(tokenizer, tmp_path, monkeypatch, streaming, k):
    path = write_jsonl(tmp_path / "c.jsonl", corpus(60))
    kw = dict(seq_len=16, batch_size=3, seed=7, process_index=1, process_count=2, streaming=streaming,
              shuffle_buffer=16)
    straight = take(packed(path, tokenizer, tmp_path, **kw), k + 12)  # ~8 batches per epoch: crosses epochs
    first = packed(path, tokenizer, tmp_path, **kw)
    take(first, k)
    state = json.loads(json.dumps(first.state()))
    assert set(state) >= {"epoch", "position", "pending"}

    reads = []
    real_permute = data.permute
    monkeypatch.setattr(data, "permute", lambda idx, n, key: reads.append((key[1], idx.min())) or
                        real_permute(idx, n, key))
    resumed = packed(path, tokenizer, tmp_path, **kw).restore(state)
    assert_batches_equal(take(resumed, 12), straight[k:])
    if not streaming:  # random access: the first read after restoring starts at the saved position
        assert reads[0] == (state["epoch"], 1 + 2 * state["position"])


def test_restore_checks_the_settings(tokenizer, tmp_path):
    ds = datasets.Dataset.from_dict({"text": corpus(10)})
    it = packed(ds, tokenizer, tmp_path)
    next(it)
    with pytest.raises(FaJaxError, match="seq_len=16"):
        packed(ds, tokenizer, tmp_path, seq_len=32).restore(it.state())
    with pytest.raises(FaJaxError, match="num_documents=10"):
        packed(datasets.Dataset.from_dict({"text": corpus(11)}), tokenizer, tmp_path).restore(it.state())
    with pytest.raises(FaJaxError, match="PackedBatches.state"):
        packed(ds, tokenizer, tmp_path).restore({"epoch": 0})


# -------------------------------------------------------------------------------------------------------- sources

DOCS = ["w1 w2 w3", "w4\nw5 w6", "w7 \u00e9t\u00e9 w8", "w9"]


def write_sources(tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(DOCS) + "\n\n\n  \n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "docs.jsonl").read_bytes()))
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"body": DOCS + ["  "], "n": list(range(5))}).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": DOCS, "n": list(range(4))}).save_to_disk(str(saved))
    return [str(text), jsonl, {"path": str(gz)}, {"path": str(parquet), "text_field": "body"},
            {"path": str(saved), "text_field": "body"}]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_sources_give_the_same_documents(tmp_path, streaming):
    for spec in write_sources(tmp_path):
        docs = data.load_documents(spec, streaming=streaming, cache_dir=str(tmp_path / "cache"))
        assert isinstance(docs, datasets.IterableDataset if streaming else datasets.Dataset)
        assert [d["text"] for d in docs] == DOCS, spec


def test_text_splits(tmp_path):
    path = tmp_path / "t.md"
    path.write_text("  a b\nc\n\n\nd\n   \ne f  \n")
    load = lambda split: list(data.load_documents(str(path), split=split, cache_dir=str(tmp_path))["text"])
    assert load("paragraph") == ["a b\nc", "d", "e f"]
    assert load("line") == ["a b", "c", "d", "e f"]
    assert load("file") == ["a b\nc\n\n\nd\n   \ne f"]
    twice = data.load_documents({"path": [str(path), str(path)], "split": "line"}, cache_dir=str(tmp_path))
    assert list(twice["text"]) == load("line") * 2
    with pytest.raises(FaJaxError, match="split='sentence'"):
        data.load_documents(str(path), split="sentence")


def test_globs_and_lists(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    write_jsonl(tmp_path / "b.jsonl", DOCS[2:])
    for spec in (str(tmp_path / "*.jsonl"), [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]):
        assert list(data.load_documents(spec, cache_dir=str(tmp_path / "c"))["text"]) == DOCS


BAD_JSONL = [
    '{"text": "w1 w2"}',
    '{"text": "w3" ',  # line 2: bad JSON
    '{"body": "w4"}',  # line 3: no text field
    '{"text": 5}',  # line 4: not a string
    '',  # blank lines are fine
    '["w5"]',  # line 6: not an object
    '{"text": "w6", "id": 1}',
]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_malformed_jsonl_lines(tmp_path, streaming):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_JSONL) + "\n")
    load = lambda on_error: data.load_documents(str(path), on_error=on_error, streaming=streaming,
                                                cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # the second map-style load reuses the cached Arrow copy and still reports
        with pytest.warns(UserWarning) as caught:
            docs = [d["text"] for d in load("skip")]
        assert docs == ["w1 w2", "w6"]
        said = " ".join(str(c.message) for c in caught)
        for line in (2, 3, 4, 6):
            assert f"{path}:{line}:" in said
        assert "skipped 4 malformed line(s)" in said
        assert f"{path}:5" not in said and f"{path}:1:" not in said
    with pytest.raises(FaJaxError, match=rf"^{path}:2: bad JSON"):
        list(load("fail"))


def test_malformed_lines_in_training(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_JSONL) + "\n")
    with pytest.warns(UserWarning, match="skipped 4"):
        it = packed(str(path), tokenizer, tmp_path, seq_len=4, batch_size=1)
    assert first_words([next(it), next(it)])[0] in (1, 6)
    with pytest.raises(FaJaxError, match=":2: bad JSON"):
        packed(str(path), tokenizer, tmp_path, on_error="fail")


def test_undecodable_text_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"w1\n\xff\xfe w2\nw3\n")
    with pytest.warns(UserWarning, match=r"t.txt:2: not valid UTF-8"):
        assert list(data.load_documents(str(path), split="line", cache_dir=str(tmp_path))["text"]) == ["w1", "w3"]


def test_empty_corpus_is_an_error(tokenizer, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    for streaming in (False, True):
        with pytest.raises(FaJaxError, match=rf"^{blank}: no documents"):
            data.load_documents(str(blank), streaming=streaming, cache_dir=str(tmp_path))
    allbad = tmp_path / "bad.jsonl"
    allbad.write_text('{"x": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FaJaxError, match=rf"^{allbad}: no documents"):
            packed(str(allbad), tokenizer, tmp_path)
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"text": ["", " \n"]}).to_parquet(str(parquet))
    with pytest.raises(FaJaxError, match="p.parquet: no documents"):
        data.load_documents(str(parquet), cache_dir=str(tmp_path))
    with pytest.raises(FaJaxError, match="3 document.*among 4 processes"):
        packed(datasets.Dataset.from_dict({"text": DOCS[:3]}), tokenizer, tmp_path, process_index=0,
               process_count=4)


def test_source_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    cases = {
        str(tmp_path / "missing.txt"): "missing.txt: no such file",
        str(tmp_path / "*.nothing"): "no file matches",
        str(tmp_path / "x.csv"): "x.csv: unknown data format",
        str(tmp_path): "save_to_disk did not make",
    }
    for spec, message in cases.items():
        with pytest.raises(FaJaxError, match=message):
            data.load_documents(spec)
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"body": ["a"], "n": [1]}).to_parquet(str(parquet))
    with pytest.raises(FaJaxError, match=r"p.parquet: no column 'text' \(columns: body, n\)"):
        data.load_documents(str(parquet))
    with pytest.raises(FaJaxError, match="column 'n' holds int64"):
        data.load_documents({"path": str(parquet), "text_field": "n"})
    with pytest.raises(FaJaxError, match="only the keys"):
        data.load_documents({"path": str(parquet), "field": "body"})
    with pytest.raises(FaJaxError, match="on_error='ignore'"):
        data.load_documents(str(parquet), on_error="ignore")


def test_split_documents(tmp_path):
    ds = datasets.Dataset.from_dict({"text": corpus(100)})
    train, held = data.split_documents(ds, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(list(train["text"]) + list(held["text"])) == sorted(ds["text"])
    assert list(data.split_documents(ds, 0.1, seed=3)[1]["text"]) == list(held["text"])
    assert list(data.split_documents(ds, 0.1, seed=4)[1]["text"]) != list(held["text"])
    stream_train, stream_held = data.split_documents(ds.to_iterable_dataset(), 0.2, seed=3)
    a, b = [d["text"] for d in stream_train], [d["text"] for d in stream_held]
    assert sorted(a + b) == sorted(ds["text"]) and 5 <= len(b) <= 40
    with pytest.raises(FaJaxError, match="held_out_fraction=1.5"):
        data.split_documents(ds, 1.5)


def test_finite_pass_for_evaluation(tokenizer, tmp_path):
    docs = corpus(30)
    ds = datasets.Dataset.from_dict({"text": docs})
    batches = list(packed(ds, tokenizer, tmp_path, num_epochs=1))
    n_targets = sum(len(d.split()) + 1 for d in docs)  # each word and the EOS are predicted once
    assert sum(int(b["mask"].sum()) for b in batches) == n_targets
    assert sorted(first_words(batches)) == list(range(30))


# ----------------------------------------------------------------------------------------------------------- TFDS

def test_tfds_source(tokenizer, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    texts = corpus(20)

    class FaJaxTinyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"content": tfds.features.Text(), "id": np.int32}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, t in enumerate(texts):
                yield i, {"content": t, "id": i}

    FaJaxTinyCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    spec = {"tfds": "fa_jax_tiny_corpus", "data_dir": str(tmp_path), "split": "train", "text_field": "content"}
    docs = data.load_documents(spec)
    assert isinstance(docs, data.TfdsDocuments) and sorted(docs) == sorted(texts)
    train, held = data.split_documents(docs, 0.25, seed=0)
    assert len(held) == 5 and sorted(list(train) + list(held)) == sorted(texts)

    straight = take(packed(spec, tokenizer, tmp_path), 10)
    assert sorted(first_words(straight)[:20]) == list(range(20))
    first = packed(spec, tokenizer, tmp_path)
    take(first, 3)
    assert_batches_equal(take(packed(spec, tokenizer, tmp_path).restore(first.state()), 7), straight[3:])

    with pytest.raises(FaJaxError, match="no feature 'text'"):
        data.load_documents({**spec, "text_field": "text"})
    with pytest.raises(FaJaxError, match="not found"):
        data.load_documents({"tfds": "fa_jax_no_such_corpus", "data_dir": str(tmp_path)})


def test_long_documents_tokenized_in_bounded_calls(tokenizer, tmp_path, monkeypatch):
    ds = datasets.Dataset.from_dict({"text": corpus(30, max_words=200)})
    whole = list(packed(ds, tokenizer, tmp_path, num_epochs=1))
    monkeypatch.setattr(data, "_TOKENIZE_CHARS", 50)  # about one document per tokenizer call
    assert_batches_equal(list(packed(ds, tokenizer, tmp_path, num_epochs=1)), whole)
