"""raysae.text: a corpus → documents → token windows, without a model."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysae import text


class WordTokenizer:
    """Stands in for a tokenizer: one id per word (1 = BOS), for window arithmetic tests."""

    bos_token_id = 1

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[10 + len(word) for word in text.split()] for text in texts]}


def test_windows_hold_exactly_the_budget() -> None:
    documents = ["a bb ccc dddd eeeee", "f gg", "hhh iiii jjjjj kk l"]
    windows = text.build_windows(
        documents,
        WordTokenizer(),
        n_tokens=9,
        context_length=4,
        prepend_bos=True,
        excluded=np.array([1]),
    )
    assert sum(w.kept for w in windows) == 9
    assert [(w.doc_id, w.input_ids.tolist(), w.pos.tolist()) for w in windows] == [
        (0, [1, 11, 12, 13], [-1, 0, 1, 2]),
        (0, [1, 14, 15], [-1, 3, 4]),
        (1, [1, 11, 12], [-1, 0, 1]),
        (2, [1, 13, 14], [-1, 0, 1]),  # cut: 2 of its tokens complete the budget
    ]


def test_windows_without_bos_and_budget_too_large() -> None:
    windows = text.build_windows(
        ["a b c"],
        WordTokenizer(),
        n_tokens=3,
        context_length=2,
        prepend_bos=False,
        excluded=np.array([1]),
    )
    assert [w.pos.tolist() for w in windows] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="only 3 recordable tokens, n_tokens=4"):
        text.build_windows(
            ["a b c"],
            WordTokenizer(),
            n_tokens=4,
            context_length=2,
            prepend_bos=False,
            excluded=np.array([1]),
        )


def test_corpus_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n\nsecond one\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "from json"}) + "\n\n" + json.dumps({"text": "again"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["from parquet", None, ""]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.md").write_text("not a corpus file")
    assert list(text.iter_documents(str(tmp_path))) == [
        "first paragraph\nstill first",
        "second one",
        "from json",
        "again",
        "from parquet",
    ]
    with pytest.raises(ValueError, match="no 'body' field; set text_column"):
        list(text.iter_documents(str(tmp_path / "b.jsonl"), text_column="body"))


def test_hub_corpus_without_datasets_package_is_explained(monkeypatch) -> None:
    monkeypatch.setitem(
        sys.modules, "datasets", None
    )  # `import datasets` fails as if not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        next(text.iter_documents("someone/some-corpus"))


def test_stdlib_corpus_is_docstrings() -> None:
    documents = list(itertools.islice(text.stdlib_docstrings(), 50))
    assert len(documents) == 50 and all(isinstance(d, str) and d.strip() for d in documents)


def test_parse_retries_cpython_s_spurious_depth_mismatch(monkeypatch) -> None:
    """python/cpython#106905 fails a parse at random in a threaded 3.11 process; the same text
    parses again. Other SystemErrors, and a mismatch that keeps coming, still raise."""
    import ast

    from raysae import text

    real, calls = ast.parse, []

    def flaky(source):
        calls.append(source)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=18, after=75)")
        return real(source)

    monkeypatch.setattr(text.ast, "parse", flaky)
    assert isinstance(text._parse("x = 1"), ast.Module) and len(calls) == 2

    def always(source):
        raise SystemError("AST constructor recursion depth mismatch (before=1, after=2)")

    monkeypatch.setattr(text.ast, "parse", always)
    with pytest.raises(SystemError, match="depth mismatch"):
        text._parse("x = 1")

    def other(source):
        raise SystemError("something else")

    monkeypatch.setattr(text.ast, "parse", other)
    with pytest.raises(SystemError, match="something else"):
        text._parse("x = 1", attempts=5)
