"""raysae.splice: the SAE spliced into the LM (CE loss recovered, KL), on a tiny random Llama."""

import json
import math

import numpy as np
import pytest
import torch

from raysae import data, text
from raysae.__main__ import main
from raysae.checkpoint import save_sae
from raysae.config import SAEConfig
from raysae.lm import decoder_blocks, hook_name, load_model, load_tokenizer, replaced_output
from raysae.saes import build_sae
from raysae.splice import (
    SpliceStats,
    _replace_rows,
    evaluate_splice,
    make_batch,
    residual_mean,
    run_splice,
)
from raysae.splice_config import SpliceConfig, resolve_config

pytestmark = pytest.mark.timeout(300)

LAYER = 1
D = 32  # tiny_model_dir's hidden size


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """(model, windows, excluded): the tiny Llama, briefly trained on ~600 harvest-style tokens
    of stdlib text, and those tokens' windows.

    Trained so that its residual stream carries information: a random model's loss is about
    log(vocab) whatever is done to it, so ablating could not be shown to hurt.
    """
    model = load_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    excluded = np.asarray(tokenizer.all_special_ids, dtype=np.int64)
    windows = text.build_windows(
        text.iter_documents("stdlib"),
        tokenizer,
        n_tokens=600,
        context_length=32,
        prepend_bos=True,
        excluded=excluded,
    )
    batch = make_batch(windows, excluded, torch.device("cpu"))
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False), windows, excluded


def relu_sae(W_enc, W_dec, b_dec=None):
    """A ReLU SAE with the given weights, zero b_enc, b_dec (default 0), input scale 1."""
    sae = build_sae(SAEConfig(d_in=W_dec.shape[1], n_latents=W_dec.shape[0], architecture="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.zeros(W_dec.shape[1]) if b_dec is None else b_dec)
    return sae


def identity_sae(d=D):
    """x̂ = relu(x) − relu(−x) = x, exactly: n_latents = 2d, W_enc = W_dec = [I; −I]."""
    signed = torch.cat([torch.eye(d), -torch.eye(d)])
    return relu_sae(signed, signed)


def constant_sae(value):
    """x̂ = value for every token: zero decoder, b_dec = value."""
    d = value.shape[0]
    return relu_sae(torch.randn(2 * d, d), torch.zeros(2 * d, d), value)


def run(lm, sae, **kwargs):
    model, windows, excluded = lm
    return evaluate_splice(model, LAYER, sae, windows, excluded=excluded, **kwargs)


def test_identity_sae_recovers_everything(lm):
    m = run(lm, identity_sae()).compute()
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-9)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert m["ce_loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=1e-9)
    assert abs(m["kl_spliced"]) < 1e-9
    assert m["ce_zero_ablated"] > m["ce_clean"] and m["kl_zero_ablated"] > 0
    assert m["ce_mean_ablated"] > m["ce_clean"] and m["kl_mean_ablated"] > 0


def test_zero_sae_recovers_nothing_and_the_mean_sae_matches_mean_ablation(lm):
    zero = run(lm, constant_sae(torch.zeros(D))).compute()
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert zero["kl_spliced"] == pytest.approx(zero["kl_zero_ablated"], rel=1e-9)
    model, windows, excluded = lm
    batches = [
        make_batch(windows[i : i + 8], excluded, torch.device("cpu"))
        for i in range(0, len(windows), 8)
    ]
    mean = residual_mean(model, LAYER, batches).float()
    m = run(lm, constant_sae(mean)).compute()
    assert m["ce_loss_recovered_mean_ablation"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_spliced"] == pytest.approx(m["ce_mean_ablated"], rel=1e-6)


def test_a_random_sae_loses_loss(lm):
    torch.manual_seed(0)
    m = run(lm, build_sae(SAEConfig(d_in=D, n_latents=64, k=4)), mean_ablation=False).compute()
    assert m["kl_spliced"] > 1e-3 and m["ce_spliced"] > m["ce_clean"]
    assert math.isnan(m["ce_mean_ablated"]) and math.isnan(m["ce_loss_recovered_mean_ablation"])


def test_scored_and_replaced_positions_follow_harvest(lm):
    _, windows, excluded = lm
    m = run(lm, identity_sae(), mean_ablation=False).compute()
    # Harvest records the non-special tokens; a prediction is scored where one of them has a
    # next token in its window.
    expected = sum(int(np.isin(w.input_ids[:-1], excluded, invert=True).sum()) for w in windows)
    assert m["n_tokens"] == expected and expected < sum(w.kept for w in windows) == 600
    batch = make_batch(windows[:8], excluded, torch.device("cpu"))
    assert not batch.replaced[:, 0].any()  # BOS (every window starts with it) stays clean
    assert not batch.replaced[batch.attention_mask == 0].any()  # padding too


def test_clean_ce_is_the_models_own_loss_without_the_bos_prediction(lm):
    model, windows, excluded = lm
    full = [w for w in windows if len(w.input_ids) == 32][:6]  # no padding
    assert len(full) == 6 and all(
        np.isin(w.input_ids[1:], excluded, invert=True).all() for w in full
    )
    m = evaluate_splice(
        model, LAYER, identity_sae(), full, excluded=excluded, mean_ablation=False
    ).compute()
    batch = make_batch(full, excluded, torch.device("cpu"))
    labels = batch.input_ids.clone()
    labels[:, :2] = -100  # labels[:, 1] is predicted at BOS, which is not scored
    with torch.no_grad():
        loss = model(input_ids=batch.input_ids, labels=labels).loss
    assert m["n_tokens"] == 6 * 30 and m["ce_clean"] == pytest.approx(float(loss), rel=1e-5)


def test_bos_stays_clean_and_later_positions_change(lm):
    model, windows, excluded = lm
    batch = make_batch(windows[:8], excluded, torch.device("cpu"))
    clean = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def zero(h):
        return _replace_rows(h, batch.replaced, torch.zeros_like)

    with torch.no_grad(), replaced_output(decoder_blocks(model)[LAYER], zero):
        ablated = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(ablated[:, 0], clean[:, 0])  # causal: position 0 sees only BOS
    assert not torch.allclose(ablated[:, 1], clean[:, 1])


def test_the_hook_replaces_what_harvest_records(lm):
    # Harvest records hidden_states[L + 1]; the hook must see (and replace) exactly that.
    model, windows, excluded = lm
    batch = make_batch(windows[:4], excluded, torch.device("cpu"))
    seen = []

    def capture(hidden):
        seen.append(hidden.clone())
        return hidden

    with torch.no_grad():
        reference = model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states[LAYER + 1]
        with replaced_output(decoder_blocks(model)[LAYER], capture):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert len(seen) == 1 and torch.equal(seen[0], reference)


def test_no_hook_outlives_the_evaluation(lm):
    model, windows, excluded = lm
    batch = make_batch(windows[:8], excluded, torch.device("cpu"))

    def logits():
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def hooks():  # transformers installs hooks of its own (to record hidden states): compare
        return {name: list(m._forward_hooks) for name, m in model.named_modules()}

    before, hooks_before = logits(), hooks()
    run(lm, constant_sae(torch.zeros(D)))
    broken = identity_sae()
    broken.forward = lambda x: (_ for _ in ()).throw(RuntimeError("SAE failed"))
    with pytest.raises(RuntimeError, match="SAE failed"):
        run(lm, broken, mean_ablation=False)
    assert hooks() == hooks_before
    assert torch.equal(logits(), before)


def test_evaluation_split_in_two_and_merged_equals_one_pass(lm):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=D, n_latents=64, k=8))
    model, windows, excluded = lm
    whole = run(lm, sae, batch_size=4)
    cut = 4 * (len(windows) // 8)  # on a batch boundary: the same forward passes
    first = evaluate_splice(model, LAYER, sae, windows[:cut], excluded=excluded, batch_size=4)
    second = evaluate_splice(model, LAYER, sae, windows[cut:], excluded=excluded, batch_size=4)
    # Mean ablation uses the mean of the windows evaluated, which differs between the halves:
    # compare the sums that do not depend on it.
    merged = first.merge(second)
    assert merged.n == whole.n
    keep = [i for i, name in enumerate(SpliceStats.SUMS) if "mean" not in name]
    torch.testing.assert_close(merged.sums[keep], whole.sums[keep], rtol=1e-12, atol=0)


def test_accumulator_merge_is_one_pass():
    g = torch.Generator().manual_seed(0)
    n, vocab = 300, 50
    targets = torch.randint(vocab, (n,), generator=g)
    runs = [torch.randn(n, vocab, generator=g) * 3 for _ in SpliceStats.RUNS]
    one = SpliceStats()
    one.update(targets, *runs)
    a, b = SpliceStats(), SpliceStats()
    a.update(targets[:120], *(r[:120] for r in runs))
    b.update(targets[120:], *(r[120:] for r in runs))
    merged = a.merge(b).compute()
    for key, value in one.compute().items():
        assert merged[key] == pytest.approx(value, rel=1e-12), key
    # The definitions, from the logits directly.
    log_p = [r.double().log_softmax(-1) for r in runs]
    ce = [float(-lp[torch.arange(n), targets].mean()) for lp in log_p]
    kl = float((log_p[0].exp() * (log_p[0] - log_p[1])).sum(-1).mean())
    m = one.compute()
    assert m["ce_clean"] == pytest.approx(ce[0], rel=1e-6)
    assert m["kl_spliced"] == pytest.approx(kl, rel=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx((ce[2] - ce[1]) / (ce[2] - ce[0]), rel=1e-5)


def test_accumulator_chunks_do_not_change_the_sums(monkeypatch):
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(20, (50,), generator=g)
    runs = [torch.randn(50, 20, generator=g) for _ in SpliceStats.RUNS]
    whole, chunked = SpliceStats(), SpliceStats()
    whole.update(targets, *runs)
    monkeypatch.setattr("raysae.splice._CHUNK_ELEMENTS", 7 * 20)  # chunks of 7 tokens
    chunked.update(targets, *runs)
    torch.testing.assert_close(chunked.sums, whole.sums, rtol=1e-12, atol=1e-12)
    assert chunked.n == whole.n == 50


def test_accumulator_refuses_mismatched_input():
    stats = SpliceStats(mean_ablation=False)
    logits = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="mean-ablated"):
        stats.update(torch.zeros(3), logits, logits, logits, logits)
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(SpliceStats(mean_ablation=True))
    with pytest.raises(ValueError, match="logits"):
        stats.update(torch.zeros(2), logits, logits, logits)


# ---------------------------------------------------------------- `raysae eval --splice-tokens`

HARVEST_SETTINGS = {
    "corpus": "stdlib",
    "context_length": 32,
    "prepend_bos": True,
    "exclude_special_tokens": True,
    "model_dtype": "float32",
}


@pytest.fixture(scope="module")
def harvested(tiny_model_dir, tmp_path_factory):
    """A dataset whose manifest says: tiny_model_dir, layer 1, 32-token windows of stdlib text
    (the activations are stand-ins: the splice evaluation reads only the manifest)."""
    uri = str(tmp_path_factory.mktemp("acts") / "layer_1")
    acts = torch.randn(512, D, generator=torch.Generator().manual_seed(0))
    data.write_dataset(
        uri,
        acts,
        model=tiny_model_dir,
        hook=hook_name(LAYER),
        layer=LAYER,
        harvest=HARVEST_SETTINGS,
    )
    return uri


@pytest.fixture(scope="module")
def identity_checkpoint(tmp_path_factory):
    return str(save_sae(identity_sae(), tmp_path_factory.mktemp("ckpt") / "sae"))


def test_eval_splices_with_model_and_layer_from_the_manifest(
    harvested, identity_checkpoint, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                identity_checkpoint,
                "--data",
                harvested,
                "--rows",
                "all",  # a checkpoint without its run: which rows it trained on is unknown
                "--tokens",
                "512",
                "--kmeans-k",
                "4",
                "--splice-tokens",
                "300",
                "--splice-batch-size",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    splice = json.loads(out.read_text())["splice"]
    assert (splice["model"], splice["layer"], splice["context_length"]) == (tiny_model_dir, 1, 32)
    assert splice["hook"] == "blocks.1.hook_resid_post" and splice["bos"] == "clean"
    assert 0 < splice["n_tokens"] < 300
    assert splice["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert abs(splice["kl_spliced"]) < 1e-9 and splice["kl_zero_ablated"] > 0
    assert "CE loss recovered: 1.0000 against zero ablation" in printed.out
    assert f"splice: model {tiny_model_dir} from the manifest of {harvested}" in printed.err
    assert "splice: batch" in printed.err  # progress


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer", "3"], "layer 3: model {model} has 3 blocks; choose --layer in 0..2"),
        (["--model", "/no/such/model"], "model /no/such/model: no such file or directory; pass "),
        (["--d-in", "16"], "the SAE has d_in=16 but model {model} has hidden_size=32"),
        (["--data-toy"], "the splice evaluation needs --model and --layer: --data toy:"),
        (["--no-splice"], "--model configure the splice evaluation; add --splice-tokens N"),
    ],
)
def test_bad_splice_input_is_named_before_any_evaluation(
    harvested, identity_checkpoint, tiny_model_dir, tmp_path, capsys, extra, message
):
    checkpoint, data, splice = identity_checkpoint, harvested, ["--splice-tokens", "100"]
    if extra == ["--d-in", "16"]:
        checkpoint, extra = str(save_sae(identity_sae(16), tmp_path / "sae16")), []
    elif extra == ["--data-toy"]:
        (tmp_path / "run.yaml").write_text(
            "sae: {d_in: 32, n_latents: 64}\ndata: {toy: {n_features: 8}}\n"
        )
        data, extra = f"toy:{tmp_path / 'run.yaml'}", []
    elif extra == ["--no-splice"]:
        splice, extra = [], ["--model", tiny_model_dir]
    assert main(["eval", checkpoint, "--data", data, *splice, *extra]) == 2
    assert message.format(model=tiny_model_dir) in capsys.readouterr().err


def test_settings_come_from_the_manifest_unless_given(harvested, tmp_path):
    cfg, _ = resolve_config(harvested, n_tokens=10)
    assert (cfg.corpus, cfg.context_length, cfg.layer) == ("stdlib", 32, 1)
    cfg, notes = resolve_config(harvested, n_tokens=10, layer=0, context_length=16)
    assert (cfg.layer, cfg.context_length) == (0, 16)
    assert any("harvested at layer 1" in line for line in notes)
    uri = str(tmp_path / "jsonl")
    data.write_dataset(
        uri,
        torch.zeros(4, D),
        model="m",
        hook="h",
        layer=2,
        harvest={"corpus": "docs.jsonl", "text_column": "body"},
    )
    assert resolve_config(uri, n_tokens=10)[0].text_column == "body"
    # A corpus given explicitly takes none of the manifest's corpus settings.
    cfg = resolve_config(uri, n_tokens=10, corpus="stdlib")[0]
    assert (cfg.corpus, cfg.text_column, cfg.model, cfg.layer) == ("stdlib", "text", "m", 2)


@pytest.mark.slow
def test_identity_sae_in_smollm2_recovers_everything(smollm2_gguf):
    cfg = SpliceConfig(model=smollm2_gguf, layer=6, n_tokens=512, context_length=64, batch_size=4)
    splice = run_splice(identity_sae(576), cfg)
    assert splice["n_tokens"] > 400
    assert splice["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert abs(splice["kl_spliced"]) < 1e-6
    assert splice["ce_zero_ablated"] > splice["ce_mean_ablated"] > splice["ce_clean"]
