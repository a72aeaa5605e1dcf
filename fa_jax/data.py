"""Pre-training data: documents from local files or TFDS, tokenized, packed into fixed-length rows, sharded by process.

    docs = load_documents("corpus/*.jsonl", text_field="text")         # datasets.Dataset, column "text"
    train, held_out = split_documents(docs, 0.01, seed=0)
    batches = PackedBatches(train, tokenizer, seq_len=2048, batch_size=8, seed=0)
    batch = next(batches)          # {"tokens", "labels", "mask", "segment_ids", "positions"}: int32 [B, T]
    saved = batches.state()        # JSON-serializable; PackedBatches(...).restore(saved) continues exactly here

Axes: B local rows (this process's share of the global batch), T sequence length (`seq_len`).

Sources (a "spec"): a path, a glob or a list of them, the format inferred from the extension: .txt/.md (text; one
document per paragraph, line or file, by `split`), .jsonl/.json (JSON Lines, one object per line, the document in
`text_field`), .parquet (column `text_field`), optionally compressed (.gz, .bz2, .xz) for text and JSON Lines; a
directory made by `Dataset.save_to_disk`; a dict {"path": ..., "text_field": ..., "split": ...} or
{"tfds": name, "data_dir": ..., "split": "train", "text_field": "text"} (TFDS array_record through
`tfds.data_source`, no TensorFlow; needs the `[tfds]` extra); or a `datasets.Dataset`/`IterableDataset` or
`TfdsDocuments` already loaded. In a dict, "split" is the dataset split for TFDS and save_to_disk sources and the
document splitting ("paragraph" | "line" | "file") for text files. Blank documents are dropped everywhere; text-file
documents also lose their surrounding whitespace.

Text and JSON Lines files are read by fa_jax, line by line, so that a malformed line (bad JSON or UTF-8, not an
object, missing or non-string text field) is reported as `file:line`; `on_error="skip"` drops it with a warning that
counts them, `on_error="fail"` raises `FaJaxError`. Map-style sources (the default) are converted once into Arrow
files in the `datasets` cache (memory-mapped, so corpora larger than memory work; datasets shows a progress bar for
the conversion) and read by random access; `streaming=True` reads the files on every pass instead.

Row layout. Documents become [BOS] + tokens + [EOS] (`add_bos`/`add_eos`, by default whichever the tokenizer has)
and are concatenated into one stream S. Row r is S[r*T : r*T + T + 1]: consecutive rows share one token, so every
next-token pair of the stream is trained exactly once. tokens = row[:T], labels = row[1:],
mask[t] = 1 where labels[t] is the next token of the same document as tokens[t] (0 across documents and on padding).
A document longer than the rest of a row continues in the next row, where it is a new segment: segment_ids number
the document pieces of a row 1, 2, ... (0 for padding) and positions restart at 0 in each segment, so positions
stay below T (on real tokens they equal `fa_jax.models.transformer.segment_positions(segment_ids)`). Padding
(segment 0, position 0, mask 0, the tokenizer's pad id) only appears at the end of a finite pass (`num_epochs`).

Order and sharding. Epoch e visits the documents in a pseudo-random permutation fixed by (seed, e); process i of P
takes documents perm[i::P] and packs its own rows, so processes read disjoint shares that together cover the corpus.
The permutation is a Feistel network computed for any slice without materializing it, which gives random access:
a restored iterator reads no document it had already consumed. Streaming sources cannot be permuted: each epoch is
the stream shuffled by `datasets` (shard order and a buffer of `shuffle_buffer` documents, seeded by (seed, e)),
process i takes every P-th document from the i-th, and a restored iterator skips the consumed documents again.

Tokenization happens on the fly, a few dozen documents at a time, so there is no tokenization pass to wait for.
"""
from __future__ import annotations

import bz2
import collections
import collections.abc
import glob
import gzip
import hashlib
import importlib
import itertools
import json
import lzma
import os
import warnings

import jax
import numpy as np

from fa_jax.errors import FaJaxError

TEXT_SPLITS = ("paragraph", "line", "file")
ON_ERROR = ("skip", "fail")
_FORMATS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".ndjson": "json",
            ".parquet": "parquet"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SPEC_KEYS = ("path", "tfds", "data_dir", "split", "text_field", "download")
class _Lazy:
    """A module imported on first use. `datasets` brings pandas and pyarrow (about 0.1 GB of memory and 0.7 s): a
    process that never reads a data file (a run fed its own batches, `fa-jax compile`) does not pay for them."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


datasets, datasets_exceptions = _Lazy("datasets"), _Lazy("datasets.exceptions")
pc, pq = _Lazy("pyarrow.compute"), _Lazy("pyarrow.parquet")


def _features():
    return datasets.Features({"text": datasets.Value("string"), "error": datasets.Value("string")})
_READ_CHUNK = 64  # documents read together
_TOKENIZE_CHARS = 1 << 20  # characters tokenized in one call (fewer documents when they are long)
_REPORTED = 5  # malformed lines quoted in a warning; the rest are counted
_STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------- sources

def load_documents(spec, *, split: str = "paragraph", text_field: str = "text", on_error: str = "skip",
                   streaming: bool = False, cache_dir: str | None = None):
    """The non-blank documents of a source spec (see the module docstring).

    Returns a `datasets.Dataset` with one string column "text" (map-style: Arrow, memory-mapped, random access),
    a `datasets.IterableDataset` of {"text": str} when `streaming`, or a `TfdsDocuments` (a random-access
    sequence of str) for TFDS. `split`: "paragraph" | "line" | "file", how text files are cut into documents.
    `on_error`: "skip" | "fail" for malformed lines of text and JSON Lines files. `cache_dir`: where `datasets`
    keeps its Arrow copies (default: its own cache). Raises FaJaxError naming the source when nothing is left.
    """
    return _load(spec, split, text_field, on_error, streaming, cache_dir)[0]


def _load(spec, split, text_field, on_error, streaming, cache_dir):
    """(documents, a name of the source for messages)."""
    if on_error not in ON_ERROR:
        raise FaJaxError(f"on_error={on_error!r}: expected one of {list(ON_ERROR)}")
    dataset_split = None
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown or ("path" in spec) == ("tfds" in spec):
            raise FaJaxError(f"data source {spec!r}: expected a 'path' or a 'tfds' key, and only the keys "
                             f"{list(_SPEC_KEYS)}")
        text_field = spec.get("text_field", text_field)
        dataset_split = spec.get("split")
        if "path" in spec and dataset_split in TEXT_SPLITS:
            split, dataset_split = dataset_split, None
    if split not in TEXT_SPLITS:
        raise FaJaxError(f"split={split!r}: expected one of {list(TEXT_SPLITS)} (a document per paragraph, line or "
                         "file)")

    if isinstance(spec, dict) and "tfds" in spec:
        if streaming:
            raise FaJaxError(f"data source {spec!r}: TFDS sources are read by random access (out of core already); "
                             "expected streaming=False")
        docs = _load_tfds(spec["tfds"], spec.get("data_dir"), dataset_split or "train", text_field,
                          spec.get("download", False))
        where = docs.name
    elif isinstance(spec, TfdsDocuments):
        docs, where = spec, spec.name
    elif isinstance(spec, (datasets.Dataset, datasets.IterableDataset)):
        where = "the given dataset"
        docs = _text_column(spec, text_field, where)
        if streaming and isinstance(docs, datasets.Dataset):
            docs = docs.to_iterable_dataset()
        docs = _drop_blank(docs)
    else:
        spec = spec["path"] if isinstance(spec, dict) else spec
        files, kind = _resolve([spec] if isinstance(spec, (str, os.PathLike)) else list(spec))
        where = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"
        if kind == "saved":
            docs = _load_saved(files[0], dataset_split or "train", text_field, streaming)
        elif kind == "parquet":
            docs = _load_parquet(files, text_field, streaming, cache_dir)
        else:
            docs = _load_lines(files, kind, split, text_field, on_error, streaming, cache_dir, where)
    _check_not_empty(docs, where)
    return docs, where


def _resolve(paths) -> tuple[list[str], str]:
    """Files of a list of paths and globs, and their one format: "text", "json", "parquet" or "saved"."""
    files = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p) and glob.has_magic(p):
            matched = sorted(glob.glob(p, recursive=True))
            if not matched:
                raise FaJaxError(f"{p}: no file matches this pattern")
            files += matched
        elif not os.path.exists(p):
            raise FaJaxError(f"{p}: no such file or directory")
        else:
            files.append(p)
    if not files:
        raise FaJaxError("data source: an empty list of paths; expected at least one file")
    kinds = {f: _kind(f) for f in files}
    if len(set(kinds.values())) > 1:
        raise FaJaxError(f"data source mixes formats ({', '.join(f'{f}: {k}' for f, k in kinds.items())}); "
                         "expected files of one format")
    kind = kinds[files[0]]
    if kind == "saved" and len(files) > 1:
        raise FaJaxError(f"{files[1]}: expected one save_to_disk directory per source, got {len(files)}")
    return files, kind


def _kind(path: str) -> str:
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            return "saved"
        raise FaJaxError(f"{path}: a directory that Dataset.save_to_disk did not make (no state.json or "
                         "dataset_dict.json); expected such a directory or data files")
    base, ext = os.path.splitext(path.lower())
    if ext in _OPENERS:
        base, ext = os.path.splitext(base)
        if _FORMATS.get(ext) == "parquet":
            ext = ""  # parquet compresses internally
    if ext not in _FORMATS:
        raise FaJaxError(f"{path}: unknown data format; expected .txt/.md (text), .jsonl/.json (JSON Lines), "
                         ".parquet or a save_to_disk directory")
    return _FORMATS[ext]


def _load_lines(files, kind, split, text_field, on_error, streaming, cache_dir, where):
    """Text or JSON Lines files through fa_jax's own line reader, into datasets."""
    gen_kwargs = {"files": files, "kind": kind, "split": split, "text_field": text_field, "on_error": on_error}
    if streaming:
        return datasets.IterableDataset.from_generator(_read_files, features=_features(),
                                                       gen_kwargs={**gen_kwargs, "error_rows": False}
                                                       ).remove_columns("error")
    stamp = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    fingerprint = hashlib.sha256(json.dumps(["fa_jax.data/1", kind, split, text_field, on_error, stamp])
                                 .encode()).hexdigest()[:32]
    try:
        ds = datasets.Dataset.from_generator(_read_files, features=_features(), cache_dir=cache_dir,
                                             gen_kwargs={**gen_kwargs, "error_rows": True}, fingerprint=fingerprint)
    except datasets_exceptions.DatasetGenerationError as e:  # datasets wraps what the reader raised
        if isinstance(e.__cause__, FaJaxError):
            raise e.__cause__ from None
        raise
    errors = ds.data.column("error")
    n_bad = len(errors) - errors.null_count
    if n_bad:  # counted from the Arrow copy, so a run that reuses the cached copy reports them too
        quoted = errors.drop_null()[:_REPORTED].to_pylist()
        warnings.warn(f"{where}: skipped {n_bad} malformed line(s): " + "; ".join(quoted)
                      + ("; ..." if n_bad > _REPORTED else ""), stacklevel=3)
    if ds.data.column("text").null_count:  # error rows, or the placeholder row of a source without documents
        ds = _drop_blank(ds)
    return ds.remove_columns("error")


def _read_files(files, kind, split, text_field, on_error, error_rows):
    """Generator of {"text", "error"} rows. A malformed line raises (fail), becomes an error row (map-style, so the
    count survives caching) or a warning (streaming)."""
    any_rows = False
    for path in files:
        n_bad = 0
        for lineno, text, problem in (_parse_json(path, text_field) if kind == "json" else _parse_text(path, split)):
            if problem is None:
                any_rows = True
                yield {"text": text, "error": None}
                continue
            message = f"{path}:{lineno}: {problem}"
            if on_error == "fail":
                raise FaJaxError(message + " (on_error='skip' skips malformed lines)")
            n_bad += 1
            if error_rows:
                any_rows = True
                yield {"text": None, "error": message}
            elif n_bad <= _REPORTED:
                warnings.warn(message + "; skipped", stacklevel=2)
        if n_bad and not error_rows:
            warnings.warn(f"{path}: skipped {n_bad} malformed line(s)", stacklevel=2)
    if error_rows and not any_rows:  # datasets cannot build a map-style dataset of no rows
        yield {"text": None, "error": None}


def _open(path):
    return _OPENERS.get(os.path.splitext(path.lower())[1], open)(path, "rb")


def _parse_json(path, text_field):
    """(line number, text, problem) for each non-blank line of a JSON Lines file; blank documents are left out."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            if lineno == 1 and line.lstrip().startswith("["):
                raise FaJaxError(f"{path}:1: a JSON array; expected JSON Lines (one JSON object per line)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"bad JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(record, dict):
                yield lineno, None, f"a JSON {type(record).__name__}; expected an object with a {text_field!r} field"
            elif text_field not in record:
                yield lineno, None, f"no {text_field!r} field (fields: {', '.join(map(str, record)) or 'none'})"
            elif not isinstance(record[text_field], str):
                got = "null" if record[text_field] is None else type(record[text_field]).__name__
                yield lineno, None, f"field {text_field!r} is {got}; expected a string"
            elif record[text_field].strip():
                yield lineno, record[text_field], None


def _parse_text(path, split):
    """(first line number, document, problem) of a text file cut by paragraph (blank lines), line, or whole file."""
    lines, first = [], 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if split == "line" or (split == "paragraph" and not line.strip()):
                doc = ("\n".join(lines) if split == "paragraph" else line).strip()
                if doc:
                    yield (first if split == "paragraph" else lineno), doc, None
                lines = []
                continue
            if not lines:
                first = lineno
            lines.append(line)
    doc = "\n".join(lines).strip()
    if doc:
        yield first, doc, None


def _load_parquet(files, text_field, streaming, cache_dir):
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise FaJaxError(f"{f}: not a readable parquet file ({e})") from None
        if text_field not in schema.names:
            raise FaJaxError(f"{f}: no column {text_field!r} (columns: {', '.join(schema.names)}); set text_field")
        kind = schema.field(text_field).type
        if str(kind) not in ("string", "large_string", "string_view"):
            raise FaJaxError(f"{f}: column {text_field!r} holds {kind}; expected strings")
    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train", columns=[text_field],
                               cache_dir=cache_dir, streaming=streaming)
    return _drop_blank(_text_column(ds, text_field, files[0]))


def _load_saved(path, dataset_split, text_field, streaming):
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if dataset_split not in ds:
            raise FaJaxError(f"{path}: no split {dataset_split!r} (splits: {', '.join(ds)}); set \"split\" in the "
                             "source spec")
        ds = ds[dataset_split]
    ds = _text_column(ds, text_field, path)
    return _drop_blank(ds.to_iterable_dataset() if streaming else ds)


def _text_column(ds, text_field, where):
    """`ds` reduced to one string column named "text"."""
    features = ds.features
    if features is not None:
        if text_field not in features:
            raise FaJaxError(f"{where}: no column {text_field!r} (columns: {', '.join(features)}); set text_field")
        feature = features[text_field]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise FaJaxError(f"{where}: column {text_field!r} holds {feature}; expected strings")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _drop_blank(ds):
    if isinstance(ds, datasets.IterableDataset):
        return ds.filter(lambda text: text is not None and not text.isspace() and text != "", input_columns="text")
    return ds.with_format("arrow").filter(
        lambda text: pc.invert(pc.match_substring_regex(pc.fill_null(text, ""), r"^\s*$")),
        batched=True, input_columns="text").with_format(None)


def _check_not_empty(docs, where):
    if isinstance(docs, datasets.IterableDataset):
        empty = next(iter(docs), None) is None  # reads up to the first document only
    else:
        empty = len(docs) == 0
    if empty:
        raise FaJaxError(f"{where}: no documents (blank documents and malformed lines are dropped); expected text")


class TfdsDocuments(collections.abc.Sequence):
    """Documents (str) of a TFDS array_record data source, by random access; `take(ids)` reads several at once."""

    def __init__(self, source, text_field: str, name: str, indices=None):
        self.source, self.text_field, self.name = source, text_field, name
        self._indices = None if indices is None else np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.source) if self._indices is None else len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        return self.take([range(len(self))[i]])[0]

    def take(self, ids) -> list[str]:
        keys = [int(k) for k in (ids if self._indices is None else self._indices[np.asarray(ids, np.int64)])]
        many = getattr(self.source, "__getitems__", None)
        records = many(keys) if many else [self.source[k] for k in keys]
        return [_decode(r[self.text_field]) for r in records]

    def select(self, ids) -> "TfdsDocuments":
        ids = np.asarray(ids, np.int64)
        return TfdsDocuments(self.source, self.text_field, self.name,
                             ids if self._indices is None else self._indices[ids])


def _decode(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load_tfds(name, data_dir, split, text_field, download):
    try:
        import tensorflow_datasets as tfds  # lazy: the optional [tfds] extra, and heavy (TensorFlow)
    except ImportError:
        raise FaJaxError(f"TFDS source {name!r}: tensorflow-datasets is not installed; "
                         "pip install 'fa_jax[tfds]'") from None
    where = f"TFDS dataset {name!r} (data_dir {data_dir}, split {split!r})"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.registered.DatasetNotFoundError:
        raise FaJaxError(f"{where}: not found; expected a dataset prepared as array_record in data_dir") from None
    except (ValueError, FileNotFoundError, AssertionError) as e:
        raise FaJaxError(f"{where}: {str(e).splitlines()[0]}") from None
    features = source.dataset_info.features
    if text_field not in features:
        raise FaJaxError(f"{where}: no feature {text_field!r} (features: {', '.join(features)}); set text_field")
    return TfdsDocuments(source, text_field, where)


def split_documents(docs, held_out_fraction: float, seed: int = 0):
    """(train, held_out) documents of `load_documents`' result, split by document with a seeded choice.

    Map-style sources (Dataset, TfdsDocuments) hold out exactly round(n * fraction) documents (at least one),
    both parts keeping the source order; a streaming IterableDataset holds out each document with probability
    `held_out_fraction`, decided by a hash of (seed, its index in the stream).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise FaJaxError(f"held_out_fraction={held_out_fraction!r}: expected a number between 0 and 1 (exclusive)")
    if isinstance(docs, datasets.IterableDataset):
        def keep(held):
            return lambda _, i: (_unit_hash(seed, i) < held_out_fraction) == held

        return docs.filter(keep(False), with_indices=True), docs.filter(keep(True), with_indices=True)
    if not isinstance(docs, (datasets.Dataset, TfdsDocuments)):
        raise FaJaxError(f"split_documents: got a {type(docs).__name__}; expected what load_documents returns")
    n = len(docs)
    k = max(1, round(n * held_out_fraction))
    if k >= n:
        raise FaJaxError(f"held_out_fraction={held_out_fraction}: holding out {k} of {n} documents leaves none "
                         "for training")
    order = np.random.default_rng(seed).permutation(n)
    return docs.select(np.sort(order[k:])), docs.select(np.sort(order[:k]))


# ------------------------------------------------------------------------------------------------ order and packing

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _unit_hash(seed: int, i: int) -> float:
    return _mix64(_mix64(seed & _M64) ^ i) / 2.0 ** 64


def _mix64_np(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap silently
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(idx, n: int, key) -> np.ndarray:
    """perm[idx] for the pseudo-random permutation of range(n) fixed by `key` (a tuple of ints >= 0).

    A balanced Feistel network on 2^bits >= n values (6 rounds of splitmix64) with cycle walking, so any slice
    of the order costs O(len(idx)) time and memory, however large n is.
    """
    idx = np.asarray(idx, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"permutation indices outside [0, {n})")
    bits = max(8, (n - 1).bit_length())
    half = np.uint64((bits + 1) // 2)
    low = np.uint64((1 << int(half)) - 1)
    round_keys = np.random.SeedSequence([int(k) for k in key]).generate_state(6, dtype=np.uint64)
    out = idx.astype(np.uint64)
    todo = np.arange(out.size)
    while todo.size:  # cycle walking: a value outside [0, n) goes through the network again
        left, right = out[todo] >> half, out[todo] & low
        for k in round_keys:
            left, right = right, left ^ (_mix64_np(right ^ k) & low)
        out[todo] = (left << half) | right
        todo = todo[out[todo] >= n]
    return out.astype(np.int64)


def _stream_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def pack_row(tokens: np.ndarray, docs: np.ndarray, seq_len: int, pad_id: int) -> dict:
    """One training row from the first T+1 tokens of a stream (fewer: padded) and their document labels.

    `docs[t]` labels the document (piece) token t belongs to (> 0, equal within a document). Returns int32 [T]
    arrays tokens, labels, mask, segment_ids, positions as laid out in the module docstring.
    """
    T = seq_len
    n = min(len(tokens), T + 1)
    row = np.full(T + 1, pad_id, np.int32)
    row[:n] = tokens[:n]
    doc = np.zeros(T + 1, np.int64)
    doc[:n] = docs[:n]
    cur, nxt = doc[:T], doc[1:]
    real = cur != 0
    start = real & np.concatenate([[True], cur[1:] != cur[:-1]])
    t = np.arange(T)
    return {"tokens": row[:T], "labels": row[1:],
            "mask": (real & (cur == nxt)).astype(np.int32),
            "segment_ids": (np.cumsum(start) * real).astype(np.int32),
            "positions": ((t - np.maximum.accumulate(np.where(start, t, 0))) * real).astype(np.int32)}


class PackedBatches:
    """Iterator of packed next-token batches {"tokens", "labels", "mask", "segment_ids", "positions"}, each a numpy
    int32 [B, T] array holding this process's `batch_size` rows (layout in the module docstring).

    source: a spec for `load_documents`, or what it returned. tokenizer: a transformers tokenizer. seq_len: T.
    batch_size: B, rows of this process. seed: fixes the document order of every epoch. process_index /
    process_count: this process's share (default: jax.process_index() / jax.process_count(), read when the
    iterator is made, so after `jax.distributed.initialize`). add_bos / add_eos: None means "if the tokenizer
    has one". on_error, streaming, split, text_field, cache_dir: as in `load_documents`. num_epochs: None
    repeats forever (training); a number stops after that many passes, padding the last rows and batch
    (evaluation). shuffle_buffer: documents in the shuffle buffer of a streaming source (0: stream order).

    `state()` is a JSON-serializable dict of the position; a new iterator over the same source and settings
    continues exactly there after `restore(state)`. Each process saves and restores its own state.
    """

    def __init__(self, source, tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None,
                 add_bos: bool | None = None, add_eos: bool | None = None, on_error: str = "skip",
                 streaming: bool = False, *, split: str = "paragraph", text_field: str = "text",
                 num_epochs: int | None = None, shuffle_buffer: int = 10_000, cache_dir: str | None = None):
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise FaJaxError(f"{name}={value!r}: expected an integer >= {low}")
        if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise FaJaxError(f"num_epochs={num_epochs!r}: expected None (repeat forever) or an integer >= 1")
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if not (isinstance(process_count, int) and process_count >= 1 and isinstance(process_index, int)
                and 0 <= process_index < process_count):
            raise FaJaxError(f"process_index={process_index!r}, process_count={process_count!r}: expected "
                             "0 <= process_index < process_count")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.num_epochs, self.shuffle_buffer = num_epochs, int(shuffle_buffer)
        self.tokenizer = tokenizer
        self._specials = []
        for name, flag in (("bos", add_bos), ("eos", add_eos)):
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            if flag and token_id is None:
                raise FaJaxError(f"add_{name}=True but the tokenizer has no {name} token")
            self._specials.append([token_id] if (token_id is not None and flag is not False) else [])
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad if pad is not None else eos if eos is not None else 0)

        self.documents, self.name = _load(source, split, text_field, on_error, streaming, cache_dir)
        self._streaming = isinstance(self.documents, datasets.IterableDataset)
        if self._streaming:
            self.num_documents = None
        else:
            self.num_documents = len(self.documents)
            self._local_count = len(range(process_index, self.num_documents, process_count))
            if self.num_documents < process_count:  # checked on every process, so that all of them stop
                raise FaJaxError(f"{self.name}: {self.num_documents} document(s) cannot be shared among "
                                 f"{process_count} processes; expected at least one per process")
        self._epoch, self._position = 0, 0
        self._set_pending([])

    # -- position ------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The iterator position: epoch, documents consumed in it, and the tokens not yet emitted in rows."""
        cuts = np.flatnonzero(np.diff(self._doc)) + 1
        return {"version": _STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len,
                "process_index": self.process_index, "process_count": self.process_count,
                "num_documents": self.num_documents, "epoch": self._epoch, "position": self._position,
                "pending": [piece.tolist() for piece in np.split(self._tok, cuts)] if len(self._tok) else []}

    def restore(self, state: dict) -> "PackedBatches":
        """Continue from a `state()` taken on an iterator over the same source with the same settings."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise FaJaxError(f"data state {str(state)[:80]!r}: expected a dict made by PackedBatches.state() "
                             f"(version {_STATE_VERSION})")
        for key in ("seed", "seq_len", "process_index", "process_count", "num_documents"):
            if state.get(key) != getattr(self, key):
                raise FaJaxError(f"data state: saved with {key}={state.get(key)!r}, this iterator has "
                                 f"{getattr(self, key)!r}; expected the same source and settings")
        pending = state.get("pending")
        if not (isinstance(state.get("epoch"), int) and isinstance(state.get("position"), int)
                and isinstance(pending, list) and all(isinstance(p, list) for p in pending)):
            raise FaJaxError("data state: expected integer 'epoch' and 'position' and a list of token lists 'pending'")
        self._epoch, self._position = state["epoch"], state["position"]
        self._set_pending(pending)
        return self

    def _set_pending(self, pieces):
        """The carried-over tokens and a document label per token; drops anything read ahead."""
        self._tok = np.concatenate([np.asarray(p, np.int32) for p in pieces] or [np.zeros(0, np.int32)])
        self._doc = np.repeat(np.arange(1, len(pieces) + 1), [len(p) for p in pieces]).astype(np.int64)
        self._next_label = len(pieces) + 1
        self._ahead = collections.deque()  # tokenized documents after self._position
        self._reader = None
        self._found = self._from_start = False

    # -- reading -------------------------------------------------------------------------------------------------
    def _open_reader(self):
        """Chunks of document texts of this process's share of the current epoch, from the current position."""
        epoch, start, pi, pc = self._epoch, self._position, self.process_index, self.process_count
        if self._streaming:
            docs = self.documents
            if self.shuffle_buffer:
                docs = docs.shuffle(seed=_stream_seed(self.seed, epoch), buffer_size=self.shuffle_buffer)
            mine = itertools.islice(iter(docs), pi + pc * start, None, pc)
            while chunk := [r["text"] for r in itertools.islice(mine, _READ_CHUNK)]:
                yield chunk
            return
        for p in range(start, self._local_count, _READ_CHUNK):
            ids = permute(pi + pc * np.arange(p, min(p + _READ_CHUNK, self._local_count)), self.num_documents,
                          (self.seed, epoch))
            if isinstance(self.documents, datasets.Dataset):
                yield self.documents[ids.tolist()]["text"]
            else:
                yield self.documents.take(ids)

    def _next_document(self):
        """Token ids of the next non-empty document, or None after the last epoch."""
        while self.num_epochs is None or self._epoch < self.num_epochs:
            if not self._ahead:
                if self._reader is None:
                    self._reader, self._from_start, self._found = self._open_reader(), self._position == 0, False
                texts = next(self._reader, None)
                if texts is None:  # end of this epoch
                    if self._from_start and not self._found:
                        raise FaJaxError(f"{self.name}: process {self.process_index} of {self.process_count} "
                                         "found no documents in a whole pass; expected text")
                    self._epoch, self._position, self._reader = self._epoch + 1, 0, None
                    continue
                self._ahead.extend(self._tokenize(texts))
            ids = self._ahead.popleft()
            self._position += 1
            if ids is not None:
                self._found = True
                return ids
        return None

    def _tokenize(self, texts):
        """Token arrays with BOS/EOS, None for a document with no tokens (skipped, but counted in the position)."""
        out = [None] * len(texts)
        todo = [i for i, t in enumerate(texts) if t and not t.isspace()]
        bos, eos = self._specials
        while todo:  # calls of about a million characters: the tokenizer's Python lists cost ~36 bytes a token
            n = max(1, int(np.searchsorted(np.cumsum([len(texts[i]) for i in todo]), _TOKENIZE_CHARS)))
            group, todo = todo[:n], todo[n:]
            encoded = self.tokenizer([texts[i] for i in group], add_special_tokens=False,
                                     return_attention_mask=False, verbose=False)["input_ids"]
            for i, ids in zip(group, encoded):
                if ids:
                    out[i] = np.asarray(bos + list(ids) + eos, np.int32)
        return out

    # -- packing -------------------------------------------------------------------------------------------------
    def _next_row(self):
        T = self.seq_len
        if len(self._tok) < T + 1:
            tok, doc = [self._tok], [self._doc]
            have = len(self._tok)
            while have < T + 1:
                ids = self._next_document()
                if ids is None:
                    break
                tok.append(ids)
                doc.append(np.full(len(ids), self._next_label, np.int64))
                self._next_label += 1
                have += len(ids)
            self._tok, self._doc = np.concatenate(tok), np.concatenate(doc)
        if len(self._tok) < 2:  # the end of a finite pass: at most the token the last row already predicted
            return None
        row = pack_row(self._tok, self._doc, T, self.pad_id)
        # Keep row[T] (the last label) as the first token of the next row; after a padded row nothing is left.
        keep = T if len(self._tok) >= T + 1 else len(self._tok)
        self._tok, self._doc = self._tok[keep:], self._doc[keep:]
        return row

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.batch_size and (row := self._next_row()) is not None:
            rows.append(row)
        if not rows:
            raise StopIteration
        while len(rows) < self.batch_size:  # last batch of a finite pass: padding rows keep the shape fixed
            rows.append(pack_row(np.zeros(0, np.int32), np.zeros(0, np.int64), self.seq_len, self.pad_id))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

