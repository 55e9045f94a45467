"""Text windows: a corpus → documents → token windows, the model's input, as harvest cuts them.

Harvest records the activations of these windows, and the splice evaluation (raysae.splice)
scores the same windows, so both read the corpus and cut it here, with the same TextWindows
settings (harvest writes them into each dataset's manifest).

Corpus
    `stdlib` (the docstrings of Python's standard library, on every machine and offline), a
    .txt/.jsonl/.parquet file or a directory of them, or a hub dataset (needs `datasets`).
    Documents come in a fixed order; `doc_id` is a document's index in it.

Windows
    Each document is tokenised without special tokens and cut into windows of
    `context_length` tokens, each starting with the tokenizer's BOS token when it has one
    (`prepend_bos`). Tokens that are special (BOS, EOS, …) are not recorded by default
    (`exclude_special_tokens`): their activations are outliers an SAE should not spend
    latents on. `pos` is a token's index within its document (−1 for a prepended BOS), so
    (doc_id, pos) identifies a token. A budget of `n_tokens` counts recorded tokens exactly:
    the last window is cut short.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: configs built on TextWindows stay light
    import torch

from raysae.settings import ConfigError, check_choices


@dataclass(frozen=True, kw_only=True)
class TextWindows:
    """How a corpus becomes the model's token windows and which tokens count. Harvest records
    these in the manifest, and the splice evaluation (raysae.splice) reads them back, so both
    see the same windows."""

    corpus: str = "stdlib"
    """`stdlib` (standard-library docstrings), a .txt/.jsonl/.parquet file or directory, or a hub dataset"""
    corpus_config: str | None = None
    """Hub dataset configuration name, e.g. `wikitext-103-raw-v1`."""
    corpus_split: str = "train"
    """Hub dataset split."""
    text_column: str = "text"
    """Field holding the text in .jsonl, .parquet and hub datasets."""
    context_length: int = 128
    """Tokens per forward-pass window, BOS included."""
    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token, if it has one."""
    exclude_special_tokens: bool = True
    """Skip rows whose token is special (BOS, EOS, padding, …)."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""

    def _check_windows(self, where: str) -> None:
        """Validate these settings, and every Literal field of the subclass; its __post_init__
        calls this, `where` naming its section in errors ("harvest", "splice")."""
        if self.context_length < 2:
            raise ConfigError(
                f"{where}.context_length={self.context_length} must be >= 2 (BOS plus one token)"
            )
        check_choices(self, where=where)


# ---------------------------------------------------------------- corpus


def stdlib_docstrings() -> Iterator[str]:
    """Docstrings of Python's standard library, parsed (never imported), in file order.

    Offline and on every machine, though its content varies with the Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    # Parsed on a thread of its own: CPython 3.11's AST conversion can fail with "SystemError: AST
    # constructor recursion depth mismatch" when called deep in a call stack (seen under pytest's
    # fixtures); a fresh thread starts with a shallow stack. It also fails at random while
    # another thread converts an AST (python/cpython#106905: the depth counter is shared), which
    # no stack helps; `_parse` then parses again.
    with concurrent.futures.ThreadPoolExecutor(1) as parser:
        for path in sorted(root.rglob("*.py")):
            if skip & set(path.relative_to(root).parts):
                continue
            try:
                text = path.read_text(encoding="utf-8")
                tree = parser.submit(_parse, text).result()
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately malformed
            yield from _docstrings(tree)


def _parse(text: str, attempts: int = 5) -> ast.AST:
    """ast.parse, again after CPython 3.11's spurious "recursion depth mismatch" SystemError
    (python/cpython#106905: a race with other threads; the same text parses on a retry)."""
    for attempt in range(attempts):
        try:
            return ast.parse(text)
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """The non-empty docstrings of a module's tree: the module's, its classes' and functions'."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                yield doc


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    """Documents of one local file: .txt paragraphs (blank-line separated), .jsonl lines, .parquet rows."""
    if path.suffix == ".txt":
        yield from (
            p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()
        )
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_column not in record:
                        raise ValueError(
                            f"{path}:{number} has no {text_column!r} field; set text_column"
                        )
                    yield record[text_column]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_column]):
            yield from (text for text in batch.column(0).to_pylist() if text)
    else:
        raise ValueError(f"corpus file {path}: expected .txt, .jsonl or .parquet")


def iter_documents(
    corpus: str, *, text_column: str = "text", split: str = "train", config: str | None = None
) -> Iterator[str]:
    """The documents of `corpus` (see TextWindows.corpus), in a fixed order."""
    if corpus == "stdlib":
        yield from stdlib_docstrings()
        return
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl", ".parquet"})
        if not files:
            raise ValueError(f"corpus directory {path} holds no .txt, .jsonl or .parquet files")
        for file in files:
            yield from _file_documents(file, text_column)
        return
    if path.is_file():
        yield from _file_documents(path, text_column)
        return
    try:
        import datasets  # optional: only hub corpora need it
    except ImportError:
        raise ValueError(
            f"corpus {corpus!r} is not 'stdlib' or a local file/directory; reading it as a hub "
            "dataset needs the `datasets` package: pip install datasets"
        ) from None
    for record in datasets.load_dataset(corpus, config, split=split, streaming=True):
        if record[text_column]:
            yield record[text_column]


# ---------------------------------------------------------------- token windows


class Window(NamedTuple):
    """One forward-pass input: a slice of a document, BOS first when prepended."""

    doc_id: int
    """Index of the document in the corpus order."""
    pos: np.ndarray
    """Document position of each token (int32; −1 for a prepended BOS)."""
    input_ids: np.ndarray
    """Token ids (int32)."""
    kept: int
    """Rows this window contributes (tokens not excluded)."""


def keep_mask(input_ids: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Which tokens of `input_ids` are recorded (shared by driver budget and actors)."""
    return ~np.isin(input_ids, excluded)


def _document_windows(
    doc_id: int, ids: list[int], *, length: int, bos: int | None, excluded: np.ndarray
) -> Iterator[Window]:
    """Cut one tokenised document into windows of `length` tokens, BOS included."""
    step = length - (bos is not None)
    for start in range(0, len(ids), step):
        body = np.asarray(ids[start : start + step], dtype=np.int32)
        pos = np.arange(start, start + len(body), dtype=np.int32)
        if bos is not None:
            body, pos = (
                np.concatenate([[bos], body]).astype(np.int32),
                np.concatenate([[-1], pos]).astype(np.int32),
            )
        yield Window(doc_id, pos, body, int(keep_mask(body, excluded).sum()))


def build_windows(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    n_tokens: int,
    context_length: int,
    prepend_bos: bool,
    excluded: np.ndarray,
) -> list[Window]:
    """Windows holding exactly `n_tokens` recorded tokens (the last one cut short)."""
    bos = tokenizer.bos_token_id if prepend_bos else None
    windows, total, doc_id = [], 0, 0
    for chunk in _chunks(documents, 256):  # fast tokenizers encode a list in parallel
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            for window in _document_windows(
                doc_id, ids, length=context_length, bos=bos, excluded=excluded
            ):
                if total + window.kept >= n_tokens:
                    windows.append(_cut(window, n_tokens - total, excluded))
                    return windows
                if window.kept:
                    windows.append(window)
                    total += window.kept
            doc_id += 1
    raise ValueError(
        f"the corpus holds only {total} recordable tokens, n_tokens={n_tokens}: "
        "lower n_tokens or use a larger corpus"
    )


def _cut(window: Window, rows: int, excluded: np.ndarray) -> Window:
    """The shortest prefix of `window` holding `rows` recorded tokens."""
    end = int(np.searchsorted(np.cumsum(keep_mask(window.input_ids, excluded)), rows)) + 1
    return Window(window.doc_id, window.pos[:end], window.input_ids[:end], rows)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def corpus_windows(
    settings: TextWindows, tokenizer: Any, n_tokens: int
) -> tuple[list[Window], np.ndarray]:
    """The first windows of the corpus holding exactly `n_tokens` recorded tokens, and the
    token ids not recorded (the tokenizer's special ids with `exclude_special_tokens`)."""
    excluded = np.asarray(
        tokenizer.all_special_ids if settings.exclude_special_tokens else [], dtype=np.int64
    )
    documents = iter_documents(
        settings.corpus,
        text_column=settings.text_column,
        split=settings.corpus_split,
        config=settings.corpus_config,
    )
    windows = build_windows(
        documents,
        tokenizer,
        n_tokens=n_tokens,
        context_length=settings.context_length,
        prepend_bos=settings.prepend_bos,
        excluded=excluded,
    )
    return windows, excluded


def pad_windows(
    windows: list[np.ndarray], positions: list[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad windows into (B, T) tensors: token ids, document positions, attention mask."""
    import torch

    shape = (len(windows), max(len(w) for w in windows))
    ids, pos, attention = (
        torch.zeros(shape, dtype=torch.long),
        torch.full(shape, -2, dtype=torch.int32),
        torch.zeros(shape, dtype=torch.long),
    )
    for row, (window, window_pos) in enumerate(zip(windows, positions)):
        ids[row, : len(window)] = torch.tensor(window)
        pos[row, : len(window)] = torch.tensor(window_pos)
        attention[row, : len(window)] = 1
    return ids, pos, attention
