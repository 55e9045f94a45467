"""SAELens's on-disk SAE format, read and written with safetensors + JSON (no sae_lens import).

An SAELens SAE is a folder with `cfg.json` and `sae_weights.safetensors`; `SAE.load_from_disk`
reads one (its format as of SAELens 6.54.12, the version this module targets and tests
against). `write_saelens` writes a raysae SAE in that format; `load_saelens` (and so
`raysae.checkpoint.load_sae`, and `raysae eval`) reads one back as a raysae SAE. Neither needs
sae_lens installed: the files are plain tensors and JSON.

Architectures (raysae → SAELens inference class):

    relu       standard   ReLU(W_enc (x − b_dec) + b_enc)
    topk       topk       ReLU(TopK_k(·)), rescale_acts_by_decoder_norm: false
    jumprelu   jumprelu   z · 1[z > θ], θ = exp(log_threshold) written as `threshold`
    gated      gated      raysae's b_enc is SAELens's b_gate; r_mag and b_mag as they are
    batchtopk  jumprelu   raysae's BatchTopK infers with one learned threshold θ,
                          z · 1[z > max(θ, 0)], which is a JumpReLU whose threshold is θ for
                          every latent. SAELens saves its own BatchTopK SAEs the same way
                          (BatchTopKTrainingSAE.process_state_dict_for_saving_inference), and
                          TopK would be a different function: it keeps k latents per token,
                          where BatchTopK keeps a varying number (k on average).
    matryoshka_batchtopk  jumprelu   at inference a BatchTopK (the nested prefixes only shape
                          training), so it is written as batchtopk is; SAELens saves its own
                          matryoshka_batchtopk SAEs the same way (its class inherits
                          BatchTopK's saving). metadata.raysae keeps the groups, so reading
                          it back gives a matryoshka_batchtopk again.

Decisions:

- Input scaling is folded before writing (`fold_input_scale_`: b_dec, b_enc, b_mag and the
  thresholds divided by the input scale), so the SAELens SAE takes raw activations and
  `normalize_activations` is "none". A folded model's latents are the unfolded ones / scale.
- Shapes: SAELens's W_enc is (d_in, d_sae), raysae's (n_latents, d_in): transposed. W_dec is
  (d_sae, d_in) in both. raysae always subtracts b_dec before encoding:
  `apply_b_dec_to_input: true`. raysae's decoder rows are unit norm and its TopK selects on
  the raw pre-activations: `rescale_acts_by_decoder_norm: false`.
- `metadata.sae_lens_version` is always written: without it SAELens takes the config for a
  pre-6.0 one and rewrites it (`handle_config_defaulting`). `sae_lens_training_version` is
  null (the SAE was not trained by SAELens) unless the metadata given says otherwise: an
  SAELens SAE read and written again keeps its metadata as it was.
- Where the training data is known, its manifest fills SAELens's metadata (`metadata_for`):
  `model_name` (as harvested: a hub id, a path or a pkg:// GGUF), `hook_name` (the
  manifest's TransformerLens name `blocks.L.hook_resid_post`: raysae hooks the output of
  transformers decoder block L, `hidden_states[L + 1]`, which is TransformerLens's
  resid_post of block L; see raysae.lm), `context_size` (context_length), `prepend_bos`,
  `exclude_special_tokens` and `dataset_path` (the corpus; left out for the stdlib
  docstrings, which no dataset loader can fetch). Unknown fields are left out, not guessed;
  `hf_hook_name` is left out because the module path (`model.layers.L` for Llama-family
  models) depends on the model class, which an export does not load. Everything raysae
  knows besides goes under `metadata.raysae` (architecture, dataset URI, layer, revision,
  held-out metrics), which SAELens keeps as it is.

Reading (SAELens → raysae), for standard, topk, jumprelu and gated SAEs:

- Exact (bit-identical tensors, and `write_saelens` of the result writes them back
  bit-identically) for float32 SAEs with `apply_b_dec_to_input: true`, and for topk
  `rescale_acts_by_decoder_norm: false`, as raysae writes them. A JumpReLU's threshold t is
  held as a float64 log_threshold = log(t), whose exp rounds back to t exactly in float32.
- Converted, equal up to float rounding, otherwise: `apply_b_dec_to_input: false` becomes
  b_enc + W_enc b_dec (gated: b_gate and b_mag likewise, the magnitude path's shift scaled by
  exp(r_mag)); topk `rescale_acts_by_decoder_norm: true` folds the decoder norms n_i into the
  encoder (W_enc_i·n_i, b_enc_i·n_i, W_dec_i/n_i), which gives SAELens's latents exactly in
  real arithmetic; float16 / bfloat16 / float64 tensors are cast to float32; a JumpReLU
  threshold below 0 acts as 0 in SAELens (ReLU first) and is read as 0.
- Refused, with the fix in the message: other architectures (transcoders, abstopk, ...),
  configs written before SAELens 6, and `normalize_activations` other than "none" (SAELens
  expects the caller to have scaled or normalised the input; raysae takes raw activations).
- A jumprelu written by raysae from a batchtopk (`metadata.raysae.architecture`) with one
  threshold for every latent is read back as raysae's batchtopk; SAELens's own BatchTopK
  SAEs (saved as such a jumprelu) are read as jumprelu, the same function.
- Saved in raysae's format (`save_sae`, `raysae export --format raysae`), an SAELens JumpReLU
  keeps its float64 log_threshold in the file, but `load_sae` reads it into raysae's float32
  parameter: the thresholds come back within float32 rounding, no longer bit-identical.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raysae.config import SAEConfig
from raysae.saes import SparseAutoencoder, build_sae

CFG = "cfg.json"
"""SAELens's config file name (sae_lens.constants.SAE_CFG_FILENAME)."""
WEIGHTS = "sae_weights.safetensors"
"""SAELens's weights file name (sae_lens.constants.SAE_WEIGHTS_FILENAME)."""
SAELENS_VERSION = "6.54.12"
"""The SAELens version whose format is written, recorded as metadata.sae_lens_version."""

TO_SAELENS = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}
"""raysae architecture → the SAELens inference architecture that computes the same function."""
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
"""SAELens architecture → the raysae architecture it is read as."""

_ONE_THRESHOLD = ("batchtopk", "matryoshka_batchtopk")
"""raysae architectures that infer with one threshold for every latent (SAELens jumprelu)."""

_LATENT_BIAS = {"relu": "b_enc", "topk": "b_enc", "jumprelu": "b_enc", "gated": "b_gate"}
_TENSORS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
}
"""The tensors of each SAELens inference architecture's sae_weights.safetensors."""


class SAELensFormatError(ValueError):
    """A folder is not an SAELens SAE raysae can read, or an SAE cannot be written as one."""


def is_saelens_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an SAELens SAE (cfg.json and sae_weights.safetensors)."""
    directory = Path(directory)
    return (directory / CFG).is_file() and (directory / WEIGHTS).is_file()


# ---------------------------------------------------------------- raysae → SAELens


def saelens_architecture(architecture: str) -> str:
    """The SAELens architecture of a raysae one; a clear error for one SAELens lacks."""
    try:
        return TO_SAELENS[architecture]
    except KeyError:
        raise SAELensFormatError(
            f"raysae architecture {architecture!r} has no SAELens {SAELENS_VERSION} "
            f"equivalent; SAELens can hold {', '.join(TO_SAELENS)}. Export it with "
            "--format raysae instead"
        ) from None


def to_saelens(
    model: SparseAutoencoder, metadata: Optional[dict] = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json contents, tensors) of `model` in SAELens's format, its input scale folded in
    (on a copy: `model` is left as it is). `metadata` goes into cfg.json's metadata."""
    architecture = model.cfg.architecture
    target = saelens_architecture(architecture)
    folded = copy.deepcopy(model).cpu()
    folded.fold_input_scale_()
    with torch.no_grad():
        tensors = {
            "W_enc": folded.W_enc.T,
            _LATENT_BIAS.get(architecture, "b_enc"): folded.b_enc,
            "W_dec": folded.W_dec,
            "b_dec": folded.b_dec,
        }
        if architecture == "jumprelu":
            tensors["threshold"] = folded.threshold
        elif architecture in _ONE_THRESHOLD:
            theta = folded.threshold.clamp_min(0.0)  # raysae's inference threshold
            tensors["threshold"] = theta.expand(model.cfg.n_latents)
        elif architecture == "gated":
            tensors["r_mag"], tensors["b_mag"] = folded.r_mag, folded.b_mag
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    cfg: dict[str, Any] = {
        "architecture": target,
        "d_in": model.cfg.d_in,
        "d_sae": model.cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if target == "topk":
        cfg.update(k=model.cfg.k, rescale_acts_by_decoder_norm=False)
    metadata = {"sae_lens_training_version": None, **(metadata or {})}
    metadata["sae_lens_version"] = SAELENS_VERSION  # the format written here
    if architecture in _ONE_THRESHOLD:  # what reading it back needs to restore the SAE
        ours = metadata.get("raysae")
        ours = dict(ours) if isinstance(ours, dict) else {}
        metadata["raysae"] = {**ours, "architecture": architecture, "k": model.cfg.k}
        if architecture == "matryoshka_batchtopk":
            bounds = model.cfg.group_bounds
            metadata["raysae"]["matryoshka_groups"] = [b - a for a, b in zip((0, *bounds), bounds)]
            metadata["raysae"]["matryoshka_weights"] = list(model.weights)
    cfg["metadata"] = metadata
    return cfg, tensors


def write_saelens(
    model: SparseAutoencoder, directory: str | os.PathLike, metadata: Optional[dict] = None
) -> Path:
    """Write `model` as an SAELens SAE into `directory` (created if needed): weights first,
    then cfg.json, each renamed into place, so a folder with a cfg.json is complete."""
    cfg, tensors = to_saelens(model, metadata)
    return write_saelens_files(cfg, tensors, directory)


def write_saelens_files(
    cfg: dict[str, Any], tensors: dict[str, Tensor], directory: str | os.PathLike
) -> Path:
    """Write a cfg.json and its tensors as an SAELens folder (see write_saelens)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, p))
    text = json.dumps(cfg, indent=2)
    _atomic_write(directory / CFG, lambda p: Path(p).write_text(text))
    return directory


def metadata_for(manifest: Any = None, raysae: Optional[dict] = None) -> dict[str, Any]:
    """SAELens metadata fields from a raysae dataset manifest (raysae.data.Manifest), for the
    fields it knows (see the module docstring), plus `raysae` under metadata.raysae."""
    meta: dict[str, Any] = {}
    extra = dict(raysae or {})
    if manifest is not None and manifest.layer is not None:  # harvested from a model
        harvest = manifest.harvest or {}
        meta["model_name"] = manifest.model
        meta["hook_name"] = manifest.hook
        for ours, theirs in (
            ("context_length", "context_size"),
            ("prepend_bos", "prepend_bos"),
            ("exclude_special_tokens", "exclude_special_tokens"),
        ):
            if ours in harvest:
                meta[theirs] = harvest[ours]
        corpus = harvest.get("corpus")
        if corpus is not None and corpus != "stdlib":
            meta["dataset_path"] = corpus
        extra.update(layer=manifest.layer, model_revision=manifest.revision)
        for key in ("corpus", "corpus_config", "corpus_split"):
            if key in harvest:
                extra[key] = harvest[key]
    elif manifest is not None:  # toy or synthetic data: no model, no hook
        extra["data_model"] = manifest.model
    if extra:
        meta["raysae"] = extra
    return meta


# ---------------------------------------------------------------- SAELens → raysae


def read_saelens_files(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json contents, tensors) of an SAELens folder, as stored."""
    directory = Path(directory)
    for name in (CFG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} is missing: {directory} is not an SAELens SAE "
                f"(it needs {CFG} and {WEIGHTS})"
            )
    try:
        cfg = json.loads((directory / CFG).read_text())
    except json.JSONDecodeError as e:
        raise SAELensFormatError(f"{directory / CFG} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise SAELensFormatError(f"{directory / CFG}: expected a JSON object")
    return cfg, load_file(str(directory / WEIGHTS))


def _checked(cfg: dict[str, Any], tensors: dict[str, Tensor], where: str):
    """(architecture, d_in, d_sae, metadata) of an SAELens 6 cfg.json whose tensors match it;
    SAELensFormatError naming what is wrong otherwise."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = meta.get("sae_lens_version") or cfg.get("sae_lens_version")
    if not version or _major(version) < 6:
        raise SAELensFormatError(
            f"{where}: cfg.json has no SAELens 6 version (metadata.sae_lens_version is "
            f"{version!r}), so it was written before SAELens 6.0; load it with SAELens 6 "
            "(sae_lens.SAE.load_from_disk) and save it again with sae.save_model, then read it"
        )
    architecture = cfg.get("architecture")
    if architecture not in FROM_SAELENS:
        raise SAELensFormatError(
            f"{where}: SAELens architecture {architecture!r} has no raysae equivalent; "
            f"raysae reads {', '.join(FROM_SAELENS)}"
        )
    normalize = cfg.get("normalize_activations", "none")
    if normalize != "none":
        raise SAELensFormatError(
            f"{where}: normalize_activations is {normalize!r}; raysae's SAEs take raw "
            "activations. Fold the normalisation into the weights in SAELens first "
            "(sae.fold_activation_norm_scaling_factor(factor) for expected_average_only_in, "
            "sae.fold_activation_whitening(...) for covariance_whitening) and save it again; "
            "layer_norm and constant_norm_rescale act per token and cannot be folded"
        )
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise SAELensFormatError(f"{where}: cfg.json needs integer d_in and d_sae") from None
    names = _TENSORS[architecture]
    missing, unexpected = set(names) - set(tensors), set(tensors) - set(names)
    if missing or unexpected:
        raise SAELensFormatError(
            f"{where}: the tensors do not match SAELens architecture {architecture!r} "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name in names:
        expected = shapes.get(name, (d_sae,))
        if tuple(tensors[name].shape) != expected:
            raise SAELensFormatError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {expected} "
                f"for d_in={d_in}, d_sae={d_sae}"
            )
    return architecture, d_in, d_sae, meta


def from_saelens(
    cfg: dict[str, Any], tensors: dict[str, Tensor], where: str = "SAELens SAE"
) -> SparseAutoencoder:
    """The raysae SAE computing what SAELens computes for this cfg.json and its tensors (see
    the module docstring for what is exact, converted and refused); `where` names the source
    in errors."""
    architecture, d_in, d_sae, meta = _checked(cfg, tensors, where)
    t = {k: v.to(torch.float32) for k, v in tensors.items()}
    W_enc = t["W_enc"].T.contiguous()  # raysae's (n_latents, d_in)
    W_dec, b_dec = t["W_dec"], t["b_dec"]
    b_enc = t["b_gate" if architecture == "gated" else "b_enc"]
    b_mag = t.get("b_mag")
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.double().norm(dim=-1)
        W_enc = (W_enc.double() * norms[:, None]).float()
        b_enc = (b_enc.double() * norms).float()
        W_dec = (W_dec.double() / norms[:, None]).float()
    if not cfg.get("apply_b_dec_to_input", True):
        shift = W_enc.double() @ b_dec.double()  # W_enc (x − b_dec) + b_enc + W_enc b_dec
        b_enc = (b_enc.double() + shift).float()
        if b_mag is not None:
            b_mag = (b_mag.double() + t["r_mag"].double().exp() * shift).float()
    raysae_arch = FROM_SAELENS[architecture]
    threshold = t.get("threshold")
    raysae_meta = meta.get("raysae") if isinstance(meta.get("raysae"), dict) else {}
    extra = {}
    if (
        raysae_meta.get("architecture") in _ONE_THRESHOLD
        and threshold is not None
        and bool((threshold == threshold[0]).all())
    ):
        raysae_arch = raysae_meta["architecture"]
        if raysae_arch == "matryoshka_batchtopk":
            extra = {
                name: tuple(raysae_meta[name])
                for name in ("matryoshka_groups", "matryoshka_weights")
                if name in raysae_meta
            }
    if raysae_arch == "topk":
        k = _k(cfg.get("k"), d_sae, where)
    elif raysae_arch in _ONE_THRESHOLD:  # k only steers training; keep the one it was trained with
        k = _k(raysae_meta.get("k"), d_sae, where) if "k" in raysae_meta else 1
    else:
        k = 1  # unused by the architecture
    # normalize_inputs off: the SAE takes raw activations, there is nothing to scale.
    model = build_sae(
        SAEConfig(
            d_in=d_in,
            n_latents=d_sae,
            architecture=raysae_arch,
            k=k,
            normalize_inputs=False,
            **extra,
        )
    )
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
            getattr(model, name).copy_(value)
        model.input_scale.fill_(1.0)
        if raysae_arch == "gated":
            model.r_mag.copy_(t["r_mag"])
            model.b_mag.copy_(b_mag)
        elif raysae_arch in _ONE_THRESHOLD:
            model.threshold.copy_(threshold[0])
        elif raysae_arch == "jumprelu":
            # float64 so that exp(log_threshold) rounds back to the stored float32 threshold
            # exactly; SAELens zeroes z <= 0 before its threshold, so below 0 acts as 0.
            model.log_threshold = nn.Parameter(threshold.double().clamp_min(0.0).log())
    return model.eval()  # an inference SAE (BatchTopK: thresholded, not batch-wise top k)


def load_saelens(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """The SAELens SAE in `directory` as a raysae SAE (see `from_saelens`), on `device`."""
    cfg, tensors = read_saelens_files(directory)
    return from_saelens(cfg, tensors, where=str(directory)).to(device)


def _k(k: Any, d_sae: int, where: str) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= d_sae:
        raise SAELensFormatError(
            f"{where}: a topk SAE needs an integer k in 1..d_sae={d_sae}, got {k!r}"
        )
    return k


def _major(version: Any) -> int:
    """The major version of a version string ("6.54.12" → 6); -1 when there is none."""
    head = str(version).lstrip("v").split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
