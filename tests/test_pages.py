"""The report and sweep pages in a real headless browser (Debian's `chromium`).

Chromium is driven with its own flags: `--dump-dom` prints the DOM after the page's scripts ran
(`--virtual-time-budget` lets the on-demand <script> loads of the latent browser finish first),
`--screenshot` renders a PNG, and `--enable-logging=stderr` prints every console message as a
`CONSOLE` line, so a page that logs an error or throws fails the test. Pages are opened from
disk (file://), as a researcher opens them. A missing chromium fails these tests (.ci/run
installs it): a page nobody rendered is not a page that works.
"""

import dataclasses
import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch

from raysae import data
from raysae.__main__ import main
from raysae.checkpoint import save_sae
from raysae.config import SAEConfig
from raysae.harvest import HarvestConfig, PartHarvester
from raysae.lm import hook_name, load_tokenizer
from raysae.pages import read_js
from raysae.saes import build_sae
from raysae.text import corpus_windows

pytestmark = pytest.mark.timeout(300)


def chromium(url: str, *flags: str) -> tuple[str, str]:
    """(the DOM after the scripts ran, console lines) of headless chromium opening `url`, in
    a profile of its own (a second chromium on a shared profile hands its URL to the first and
    exits); `flags` (e.g. --screenshot=PATH) replace --dump-dom."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does)")
    with tempfile.TemporaryDirectory() as profile:
        return _run_chromium(exe, profile, url, flags)


def _run_chromium(exe: str, profile: str, url: str, flags) -> tuple[str, str]:
    done = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",  # tests run as root in CI containers
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            *(flags or ["--dump-dom"]),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and (flags or done.stdout.strip()), done.stderr[-3000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    return done.stdout, console


@pytest.fixture(scope="module")
def harvested(tiny_model_dir, tmp_path_factory):
    """A dataset as `raysae harvest` writes it (harvest's own forward pass and windows, rows
    shuffled, settings in the manifest), made in this process: layer 1 of the tiny Llama over
    1200 tokens of stdlib text in windows of 16."""
    root = tmp_path_factory.mktemp("harvested")
    cfg = HarvestConfig(
        model=tiny_model_dir,
        layers=(1,),
        output=str(root),
        n_tokens=1200,
        context_length=16,
        dtype="float32",
    )
    windows, excluded = corpus_windows(cfg, load_tokenizer(tiny_model_dir), cfg.n_tokens)
    harvester = PartHarvester(
        cfg=cfg, uris={}, excluded=excluded, write_id="t", n_blocks=2, use_gpu=False
    )
    rows = harvester._forward(
        [w.input_ids for w in windows],
        np.asarray([w.doc_id for w in windows]),
        [w.pos for w in windows],
    )
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(rows.token_id)))
    uri = str(root / "layer_1")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "overwrite"}
    data.write_dataset(
        uri,
        rows.acts[1][perm],
        dtype="float32",
        token_id=rows.token_id[perm],
        doc_id=rows.doc_id[perm],
        pos=rows.pos[perm],
        rows_per_part=300,
        model=tiny_model_dir,
        hook=hook_name(1),
        layer=1,
        harvest=json.loads(json.dumps(settings, default=str)),
    )
    return uri


@pytest.fixture(scope="module")
def report(harvested, tmp_path_factory):
    """`raysae eval --report` of a TopK SAE on the held-out part, by position, spliced into the
    LM at context 32 (twice the harvest's)."""
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    save_sae(build_sae(SAEConfig(d_in=32, n_latents=96, k=4)), root / "sae")
    argv = ["eval", str(root / "sae"), "--data", harvested, "--eval-parts", "1"]
    argv += ["--kmeans-k", "8", "--by-position", "--report", str(root / "report")]
    argv += ["--splice-tokens", "300", "--context-length", "32"]
    assert main(argv) == 0
    return root / "report"


def test_report_holds_every_section(report):
    metrics = json.loads((report / "metrics.json").read_text())
    rows = metrics["by_position"]["buckets"]
    assert metrics["by_position"]["context_length"] == 16 and rows[-1]["hi"] == 16
    assert sum(r["n_tokens"] for r in rows) == metrics["n_tokens"] == 300
    spliced = metrics["splice"]["by_position"]
    assert spliced[-1]["lo"] >= 16 and spliced[-1]["hi"] == 32  # past the harvest's context
    assert all("ce_loss_increase" in r and "kl_spliced" in r for r in spliced)
    page = (report / "index.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # nothing from the network
    for text in ("Metrics beside the baselines", "kmeans_K=8", "By token position", "Latent"):
        assert text in page
    assert page.count("<svg") >= 4  # frequency, geometry, two position charts


def test_browser_finds_a_latent_by_id_and_shows_its_contexts(report):
    shards = {s.name: read_js(s) for s in (report / "latents").glob("shard-*.js")}
    assert len(shards) == 1  # 96 latents: one shard
    latents = shards["shard-00000.js"][1]["latents"]
    latent, detail = next((int(i), d) for i, d in latents.items() if len(d["top"]) >= 3)
    top = detail["top"][0]
    dom, console = chromium(f"file://{report}/index.html#latent={latent}")
    assert console == []
    assert f"<h3>Latent {latent}</h3>" in dom
    contexts = dom[dom.index('id="top-contexts"') : dom.index('id="random-contexts"')]
    assert contexts.count('class="ctx"') == len(detail["top"])
    tokens, firing = top[2], top[3]
    assert f"<mark>{_escaped(tokens[firing])}</mark>" in contexts  # the firing token, marked
    assert f"{top[0]:.3}" in contexts  # its activation
    assert "logit lens" in dom and dom.count('class="chip"') == len(detail["lens"])


def test_browser_finds_latents_by_token(report):
    index = read_js(report / "latents" / "tokens.js")[0]
    token, hits = max(index.items(), key=lambda kv: len(kv[1]))
    dom, console = chromium(f"file://{report}/index.html#token={token}")
    assert console == []
    found = re.findall(r'href="#latent=(\d+)"', dom[dom.index('id="token-hits"') :])
    assert [int(i) for i in found] == [h[0] for h in hits]


def test_report_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    _, console = chromium(
        f"file://{report}/index.html#latent=0", f"--screenshot={shot}", "--window-size=1000,1400"
    )
    assert console == []
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    ink = (pixels < 200).any(-1).mean()  # not background
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert ink > 0.03 and colours > 100, (ink, colours)
    shutil.copy(shot, report / "screenshot.png")


def _escaped(token: str) -> str:
    import html

    return html.escape(token.replace("\n", "\u21b5"), quote=False)


def test_sweep_page_sorts_and_links_reports(report, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    rows = [
        {
            "architecture": "topk",
            "n_latents": 96,
            "k": k,
            "l0": float(k),
            "fvu": f,
            "pareto": True,
            "status": "finished",
            "checkpoint": str(tmp_path / f"t{k}" / "sae"),
        }
        for k, f in ((2, 0.5), (8, 0.2), (4, 0.35))
    ]
    pd.DataFrame(rows).to_parquet(sweep / "results.parquet")
    # The k=8 SAE has a report next to its checkpoint: the page links it.
    (tmp_path / "t8").mkdir()
    shutil.copytree(report, tmp_path / "t8" / "report")
    assert main(["pages", str(sweep)]) == 0
    dom, console = chromium(f"file://{sweep}/index.html#sort=fvu")
    assert console == []
    assert "k=8" in dom and "k=2" in dom  # the Pareto points are labelled
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", dom)
    cells = [re.findall(r'data-v="([^"]*)"', row) for row in re.findall(r"<tr>(.*?)</tr>", dom)]
    order = [float(row[heads.index("fvu")]) for row in cells if row]
    assert order == [0.2, 0.35, 0.5]  # sorted by the fvu column on opening
    links = re.findall(r"href=\"([^\"]+)\">report</a>", dom)
    assert (
        len(links) == 1
        and (sweep / links[0]).resolve() == tmp_path / "t8" / "report" / "index.html"
    )


def test_meta_sae_page_links_into_the_base_report_s_browser(report, tmp_path):
    # `raysae meta --report`: each meta-latent's base latents link to `report#latent=ID`, and
    # following such a link (its href, resolved from the meta page's folder) opens that latent.
    out = tmp_path / "meta"
    argv = ["meta", str(report.parent / "sae"), str(out), "--n-latents", "8", "--k", "2"]
    assert main([*argv, "--epochs", "5", "--batch-size", "32", "--report", str(report)]) == 0
    page = (out / "index.html").read_text()
    links = re.findall(r"href='([^']*)#latent=(\d+)'", page)
    result = json.loads((out / "meta.json").read_text())
    listed = [i for m in result["meta_latents"] for i in m["top_base_latents"]]
    assert links and sorted(int(i) for _, i in links) == sorted(listed)
    href, latent = links[0]
    assert (out / href).resolve() == (report / "index.html").resolve()
    dom, console = chromium(f"file://{(out / href).resolve()}#latent={latent}")
    assert console == [] and f"<h3>Latent {latent}</h3>" in dom
    assert main([*argv[:2], str(tmp_path / "m2"), "--report", str(tmp_path)]) == 2  # no report


def _close(a, b, where: str = "") -> None:
    """a and b equal as JSON values, floats to 1e-6 relative (sums in another order)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9, nan_ok=True), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_scoring_on_ray_data_gives_the_local_report(harvested, ray_cluster, tmp_path):
    """`--scoring ray`: each held-out part folded on a Ray actor (2 of them), the states merged
    in the driver: the same metrics, baselines, positions and latent browser (top and random
    contexts, counts, histograms) as the pass in this process."""
    torch.manual_seed(0)
    save_sae(build_sae(SAEConfig(d_in=32, n_latents=96, k=4)), tmp_path / "sae")
    for where in ("local", "ray"):
        argv = ["eval", str(tmp_path / "sae"), "--data", harvested, "--eval-parts", "2"]
        argv += ["--kmeans-k", "8", "--by-position", "--report", str(tmp_path / where)]
        argv += ["--scoring", where, "--out", str(tmp_path / f"{where}.json")]
        if where == "ray":
            argv += ["--actors", "2", "--cpus-per-actor", "0.5"]
        assert main(argv) == 0
    local, ray = (json.loads((tmp_path / f"{w}.json").read_text()) for w in ("local", "ray"))
    assert (local["scoring"], ray["scoring"]) == ("in this process", "on Ray Data")
    assert local["n_tokens"] == ray["n_tokens"] == 600  # two parts of 300 rows
    for key in ("sae", "baselines", "by_position", "decoder_geometry"):
        _close(local[key], ray[key], key)
    shards = [read_js(tmp_path / w / "latents" / "shard-00000.js")[1] for w in ("local", "ray")]
    _close(*shards, "shard")
    assert sum(len(d["random"]) for d in shards[0]["latents"].values()) > 96  # samples compared
    _close(*(read_js(tmp_path / w / "latents" / "tokens.js") for w in ("local", "ray")))
