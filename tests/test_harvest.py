"""raysae.harvest: a transformers LM's activations → committed shards, through Ray Data."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import zlib
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from test_text import WordTokenizer

from raysae import data, harvest, text
from raysae.data import storage, stream

pytestmark = pytest.mark.timeout(300)

TINY = {
    "layers": (0, 1),
    "n_tokens": 3000,
    "context_length": 32,
    "tokens_per_part": 1000,
    "batch_size": 8,
}


def read_rows(uri: str) -> dict[str, torch.Tensor]:
    """Every row of a dataset (act as float32 and all metadata), in stored order."""
    columns = ("act", "token_id", "doc_id", "pos")
    batches = list(data.iter_batches(uri, 4096, columns=columns))
    return {name: torch.cat([b[name] for b in batches]) for name in columns}


def reference_activations(
    model, tokenizer, documents: list[str], layers: list[int], context_length: int
) -> dict:
    """(layer, doc_id, pos) → hidden_states[layer + 1] of a plain forward over each window,
    written independently of raysae: tokenise, cut into windows of context_length − 1, prepend BOS."""
    expected = {}
    with torch.inference_mode():
        for doc_id, text in enumerate(documents):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), context_length - 1):
                window = [tokenizer.bos_token_id, *ids[start : start + context_length - 1]]
                # The decoder alone: same hidden states, without the costly vocabulary projection.
                hidden_states = model.base_model(
                    torch.tensor([window]), output_hidden_states=True
                ).hidden_states
                for layer, j in itertools.product(layers, range(1, len(window))):
                    expected[(layer, doc_id, start + j - 1)] = hidden_states[layer + 1][0, j]
    return expected


def assert_rows_match_reference(
    output: str, layers: list[int], documents: Iterable[str], model, tokenizer, context_length: int
) -> int:
    """Compare every stored row of every layer with the reference forward; returns rows per layer."""
    rows = {layer: read_rows(harvest.layer_uri(output, layer)) for layer in layers}
    n_docs = max(int(r["doc_id"].max()) for r in rows.values()) + 1
    expected = reference_activations(
        model, tokenizer, list(itertools.islice(documents, n_docs)), layers, context_length
    )
    for layer, layer_rows in rows.items():
        keys = zip(layer_rows["doc_id"].tolist(), layer_rows["pos"].tolist())
        reference = torch.stack([expected[(layer, *key)] for key in keys]).to(torch.float16).float()
        torch.testing.assert_close(layer_rows["act"], reference, rtol=2e-3, atol=2e-3)
    return len(layer_rows["act"])


@pytest.fixture(scope="module")
def short_docs_corpus(tmp_path_factory) -> str:
    """A .txt corpus of short documents (one-paragraph stdlib docstrings), one per paragraph."""
    short = [
        d
        for d in itertools.islice(text.stdlib_docstrings(), 5000)
        if len(d) < 300 and "\n\n" not in d
    ]
    path = tmp_path_factory.mktemp("corpus") / "short.txt"
    path.write_text("\n\n".join(short[:1000]))
    return str(path)


@pytest.fixture(scope="module")
def tiny_harvest(
    ray_cluster, tiny_model_dir: str, short_docs_corpus: str, tmp_path_factory
) -> dict:
    """Layers 0 and 1 of the tiny model over 3000 tokens of short documents, in 3 parts."""
    output = str(tmp_path_factory.mktemp("harvest"))
    cfg = harvest.HarvestConfig(
        model=tiny_model_dir, output=output, corpus=short_docs_corpus, **TINY
    )
    return {"cfg": cfg, "manifests": harvest.harvest(cfg, progress=None)}


# ---------------------------------------------------------------- with the tiny model


def test_manifests_describe_the_harvest(tiny_harvest: dict) -> None:
    cfg = tiny_harvest["cfg"]
    for layer, manifest in tiny_harvest["manifests"].items():
        uri = harvest.layer_uri(cfg.output, layer)
        assert data.open_dataset(uri, verify=True).manifest == manifest
        assert manifest.n_tokens == 3000 and len(manifest.parts) == 3
        assert (manifest.layer, manifest.hook, manifest.d_in) == (
            layer,
            f"blocks.{layer}.hook_resid_post",
            32,
        )
        assert manifest.harvest["context_length"] == 32 and manifest.model == cfg.model
        assert sorted(os.listdir(uri)) == sorted(
            [data.MANIFEST_NAME, *(p.name for p in manifest.parts)]
        )
        for part in manifest.parts:  # what every read checks
            assert part.crc32 == zlib.crc32(open(os.path.join(uri, part.name), "rb").read())


def test_rows_match_a_direct_forward(tiny_harvest: dict, tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # all 3 blocks
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = tiny_harvest["cfg"]
    documents = text.iter_documents(cfg.corpus)
    assert (
        assert_rows_match_reference(
            cfg.output, [0, 1], documents, model, tokenizer, context_length=32
        )
        == 3000
    )


def test_layers_share_one_row_order_without_special_tokens(
    tiny_harvest: dict, tiny_model_dir: str
) -> None:
    from transformers import AutoTokenizer

    first, second = (
        read_rows(harvest.layer_uri(tiny_harvest["cfg"].output, layer)) for layer in (0, 1)
    )
    for name in ("token_id", "doc_id", "pos"):
        assert torch.equal(first[name], second[name])
    assert not np.isin(
        first["token_id"].numpy(), AutoTokenizer.from_pretrained(tiny_model_dir).all_special_ids
    ).any()
    assert int(first["pos"].min()) >= 0
    assert (
        len(set(zip(first["doc_id"].tolist(), first["pos"].tolist()))) == 3000
    )  # (doc_id, pos) is a key


def test_statistics_match_the_stored_rows(tiny_harvest: dict) -> None:
    manifest = tiny_harvest["manifests"][1]
    acts = read_rows(harvest.layer_uri(tiny_harvest["cfg"].output, 1))["act"].double()
    np.testing.assert_allclose(manifest.stats.mean, acts.mean(0).numpy(), rtol=1e-9, atol=1e-12)
    assert manifest.stats.mean_squared_norm == pytest.approx(
        acts.pow(2).sum(1).mean().item(), rel=1e-9
    )


def test_training_batches_mix_documents(tiny_harvest: dict) -> None:
    uri = harvest.layer_uri(tiny_harvest["cfg"].output, 0)
    dataset = stream.build_dataset(uri, columns=("doc_id",), seed=0)
    batches = stream.iter_torch_batches(
        dataset, batch_size=256, dtype=torch.float32, d_in=32, columns=("doc_id",)
    )
    distinct = [len(torch.unique(batch["doc_id"])) for batch in batches]
    total = len(torch.unique(read_rows(uri)["doc_id"]))
    # Unshuffled, 256 consecutive tokens of these ~40-token documents would span about 7.
    # Each part holds a random third of the corpus' windows, its rows shuffled again.
    assert len(distinct) == 11 and min(distinct) >= 20, (
        f"documents per batch {distinct} (of {total})"
    )


def test_existing_harvest_is_refused_and_kept(tiny_harvest: dict) -> None:
    cfg = tiny_harvest["cfg"]
    before = storage.read_bytes(storage.join(harvest.layer_uri(cfg.output, 0), data.MANIFEST_NAME))
    with pytest.raises(FileExistsError, match="overwrite"):
        harvest.harvest(dataclasses.replace(cfg, n_tokens=10))
    assert (
        storage.read_bytes(storage.join(harvest.layer_uri(cfg.output, 0), data.MANIFEST_NAME))
        == before
    )


def test_interrupted_harvest_leaves_no_manifest_and_reruns_from_the_cli(
    ray_cluster, tiny_model_dir: str, s3_prefix: str
) -> None:
    cfg = harvest.HarvestConfig(model=tiny_model_dir, output=s3_prefix, **TINY)  # stdlib docstrings

    def interrupt(progress: harvest.Progress) -> None:
        raise KeyboardInterrupt("stopped after the first part")

    with pytest.raises(KeyboardInterrupt):
        harvest.harvest(cfg, progress=interrupt)
    for layer in cfg.layers:
        files = storage.list_files(harvest.layer_uri(s3_prefix, layer))
        assert data.MANIFEST_NAME not in files and files  # parts, no commit
        with pytest.raises(data.DatasetError, match="harvest did not finish"):
            data.open_dataset(harvest.layer_uri(s3_prefix, layer))

    parser = harvest.add_harvest_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            tiny_model_dir,
            "--output",
            s3_prefix,
            "--layers",
            "0",
            "1",
            "--n-tokens",
            "3000",
            "--context-length",
            "32",
            "--tokens-per-part",
            "1000",
            "--batch-size",
            "8",
        ]
    )
    assert harvest.run_harvest_cli(args) == 0
    for layer in cfg.layers:
        manifest = data.open_dataset(harvest.layer_uri(s3_prefix, layer)).manifest
        assert manifest.n_tokens == 3000
        names = set(storage.list_files(harvest.layer_uri(s3_prefix, layer))) - {data.MANIFEST_NAME}
        assert names == {p.name for p in manifest.parts}  # the interrupted run's parts are gone


# ---------------------------------------------------------------- the real model (slow)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_smollm2_gguf_rows_match_a_direct_forward(ray_cluster, smollm2_gguf: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = harvest.HarvestConfig(
        model=smollm2_gguf,
        layers=(3,),
        output=str(tmp_path),
        n_tokens=5000,
        context_length=64,
        batch_size=16,
        cpus_per_actor=2,
    )
    manifest = harvest.harvest(cfg, progress=None)[3]
    assert manifest.d_in == 576 and manifest.n_tokens == 5000
    directory, name = os.path.split(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()  # all 30 blocks
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    assert (
        assert_rows_match_reference(
            str(tmp_path), [3], text.stdlib_docstrings(), model, tokenizer, 64
        )
        == 5000
    )


# ---------------------------------------------------------------- without Ray


def test_part_jobs_cover_every_window_once() -> None:
    windows = text.build_windows(
        [" ".join(["w"] * n) for n in range(1, 40)],
        WordTokenizer(),
        n_tokens=700,
        context_length=8,
        prepend_bos=True,
        excluded=np.array([1]),
    )
    jobs = harvest.part_jobs(windows, tokens_per_part=100, seed=0)
    assert [job.column("part")[0].as_py() for job in jobs] == list(range(len(jobs)))
    kept = sum(len(harvest._unnest(job.column("input_ids"))) for job in jobs)
    assert kept == len(windows)
    first_docs = jobs[0].column("doc_id")[0].values.to_pylist()
    assert first_docs != sorted(first_docs)  # windows were shuffled across the corpus


def test_config_validation_and_unknown_keys() -> None:
    base = {"model": "m", "layers": [3], "output": "/tmp/x"}
    assert harvest.HarvestConfig.from_dict(base).layers == (3,)
    assert harvest.HarvestConfig.from_dict({**base, "layers": 3}).layers == (3,)
    with pytest.raises(ValueError, match="harvest: unknown key\\(s\\) 'layer'"):
        harvest.HarvestConfig.from_dict({**base, "layer": 3})
    for bad, message in [
        ({"layers": []}, "layers="),
        ({"n_tokens": 0}, "n_tokens=0"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"context_length": 1}, "context_length=1"),
        ({"layers": [2, 2]}, "distinct"),
        ({"layers": ["x"]}, "harvest.layers\\[0\\]='x'"),
        ({"seed": "zero"}, "harvest.seed='zero'"),
    ]:
        with pytest.raises(ValueError, match=message):
            harvest.HarvestConfig.from_dict({**base, **bad})


def test_cli_arguments_mirror_the_config() -> None:
    parser = harvest.add_harvest_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            "m",
            "--layers",
            "2",
            "5",
            "--output",
            "o",
            "--no-prepend-bos",
            "--dtype",
            "bfloat16",
        ]
    )
    cfg = harvest.HarvestConfig.from_dict(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(harvest.HarvestConfig)}
    )
    assert cfg == harvest.HarvestConfig(
        model="m", layers=(2, 5), output="o", prepend_bos=False, dtype="bfloat16"
    )
    assert "Rows to record per layer (exact)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--layers", "1", "--output", "o", "--dtype", "int8"])


def test_last_block_and_missing_layers_are_refused(tiny_model_dir: str, tmp_path) -> None:
    for layers in [(2,), (7,)]:  # the tiny model has blocks 0..2; 2 is the last
        with pytest.raises(ValueError, match="choose layers < 2"):
            harvest.harvest(
                harvest.HarvestConfig(model=tiny_model_dir, layers=layers, output=str(tmp_path))
            )
