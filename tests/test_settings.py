"""raysae.settings: the CLI's option help comes from a table kept in sync with the settings'
field docstrings, and building the parser parses no source (python/cpython#106905 made that
crash at random); one dotted-override function; Locations made absolute; options of some fields."""

import argparse
import ast
import inspect
import re
import subprocess
import sys
import threading

import pytest

from raysae import settings
from raysae.__main__ import COMMANDS, build_parser, main
from raysae.config import RunConfig, load_run_config
from raysae.field_docs import FIELD_DOCS
from raysae.harvest import HarvestConfig
from raysae.settings import ConfigError, from_dict
from raysae.splice_config import SpliceConfig
from raysae.sweep_spec import SweepSpec, expand


def test_field_docs_table_matches_the_docstrings():
    assert settings.current_table() == FIELD_DOCS, (
        "raysae/field_docs.py is out of date with the settings' docstrings: "
        "run `python -m raysae.settings` and commit the result"
    )


def test_every_field_of_a_cli_settings_class_is_documented():
    for cls in settings.documented_classes():
        missing = [f for f in cls.__dataclass_fields__ if f not in settings.field_help(cls)]
        assert not missing, f"{cls.__qualname__}: fields without a docstring: {missing}"


def test_field_help_includes_inherited_fields():
    docs = settings.field_help(HarvestConfig)
    assert docs["n_tokens"] == "Rows to record per layer (exact)."
    assert docs["context_length"] == "Tokens per forward-pass window, BOS included."  # TextWindows


def test_building_the_parser_parses_no_source(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("source parsed on the command path")

    monkeypatch.setattr(ast, "parse", refuse)
    monkeypatch.setattr(inspect, "getsource", refuse)
    monkeypatch.setattr(inspect, "findsource", refuse)
    parser = build_parser()  # every subcommand's options
    for name in COMMANDS:
        sub = parser._subparsers._group_actions[0].choices[name]
        assert sub.format_help()
    harvest_help = parser._subparsers._group_actions[0].choices["harvest"].format_help()
    assert "Rows to record per layer (exact)" in harvest_help
    with pytest.raises(SystemExit) as exit_:
        main(["harvest", "--help"])
    assert exit_.value.code == 0


def test_parser_builds_from_many_threads_while_others_parse():
    """The reported crash: building the parser while other threads allocate and parse. The
    parsing threads themselves may hit CPython's defect (python/cpython#106905: a SystemError
    from ast.parse in a threaded process); they count it and go on. The builders, which parse
    no source, must never fail."""
    errors: list[BaseException] = []
    defect_hits: list[SystemError] = []
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            try:
                ast.parse("x = [i * 2 for i in range(10)]\n" * 20)
            except SystemError as e:  # the CPython defect, in this thread, not the CLI's
                defect_hits.append(e)
            _ = [bytearray(256) for _ in range(200)]

    def build():
        try:
            for _ in range(25):
                help_text = build_parser().format_help()
                assert "sweep" in help_text
                build_parser(["harvest"]).parse_args(
                    ["harvest", "--model", "m", "--layers", "1", "--output", "o"]
                )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    churners = [threading.Thread(target=churn) for _ in range(2)]
    builders = [threading.Thread(target=build) for _ in range(4)]
    for t in churners + builders:
        t.start()
    for t in builders:
        t.join()
    stop.set()
    for t in churners:
        t.join()
    assert not errors, errors[0]
    print(f"ast.parse hit the CPython defect {len(defect_hits)} time(s) in the other threads")


def test_only_the_named_subcommand_gets_options():
    parser = build_parser(["sweep"])
    choices = parser._subparsers._group_actions[0].choices
    assert "--resume" in choices["sweep"].format_help()
    assert "--n-tokens" not in choices["harvest"].format_help()
    assert isinstance(parser.parse_args(["sweep", "s.yaml"]), argparse.Namespace)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


# ---------------------------------------------------------------- one override function

RUN = "sae: {d_in: 8, n_latents: 16, k: 4}\ndata: {toy: {}}\ntrain: {total_tokens: 5000, batch_size: 100}\n"


@pytest.mark.parametrize(
    "key, error",
    [
        ("sae.k.x", "'k' is not a config section"),
        ("sae.kk", "'kk' is not a field of sae"),
        ("data.toy.n_featurez", "'n_featurez' is not a field of data.toy"),
        ("lrr", "'lrr' is not a field of RunConfig"),
        ("sae..k", "expected dot-separated field names"),
    ],
)
def test_set_space_keys_and_overrides_share_one_override_function(tmp_path, capsys, key, error):
    run = tmp_path / "run.yaml"
    run.write_text(RUN)
    with pytest.raises(ConfigError, match=re.escape(f"override {key!r}: {error}")):
        load_run_config(str(run), {key: 1})
    assert main(["train", str(run), "--out", str(tmp_path / "out"), "--set", f"{key}=1"]) == 2
    assert f"--set {key!r}: {error}" in capsys.readouterr().err
    base = load_run_config(str(run))
    with pytest.raises(ConfigError, match=re.escape(f"space key {key!r}: {error}")):
        expand(SweepSpec(name="s", output="out", base=base, space={key: [1]}))
    assert not (tmp_path / "out").exists()


def test_set_dotted_makes_missing_sections_and_walks_free_form_mappings():
    data = {"sae": {"d_in": 8, "n_latents": 16, "k": 4}, "data": {"toy": None}}
    settings.set_dotted(RunConfig, data, "train.lr", 1e-3)
    settings.set_dotted(RunConfig, data, "data.toy.n_features", 32)
    settings.set_dotted(RunConfig, data, "scaling.resources_per_worker.trainer_slot", 1)
    cfg = from_dict(RunConfig, data)
    assert cfg.train.lr == 1e-3 and cfg.data.toy.n_features == 32
    assert cfg.scaling.resources_per_worker == {"trainer_slot": 1.0}


def test_locations_are_made_absolute_in_nested_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = SweepSpec(
        name="s",
        output="s3://bucket/sweeps",
        base=from_dict(
            RunConfig, {"sae": {"d_in": 8, "n_latents": 16, "k": 4}, "data": {"uri": "d/layer_1"}}
        ),
        harvest=HarvestConfig(model="rel/model", layers=(1,), output="d"),
    )
    absolute = settings.with_absolute_paths(spec)
    assert absolute.output == "s3://bucket/sweeps"
    assert absolute.base.data.uri == str(tmp_path / "d" / "layer_1")
    assert absolute.harvest.output == str(tmp_path / "d")
    assert absolute.harvest.model == "rel/model"  # a hub id or a path: not a Location
    assert settings.with_absolute_paths(absolute) == absolute


# ---------------------------------------------------------------- options of some fields


def test_options_of_some_fields_renamed_and_unset():
    options = settings.Options(
        SpliceConfig,
        fields=("n_tokens", "model", "batch_size"),
        rename={"n_tokens": "tokens"},
        unset=True,
    )
    parser = options.add(argparse.ArgumentParser())
    assert options.values(parser.parse_args([])) == {
        "n_tokens": None,
        "model": None,
        "batch_size": None,
    }
    given = options.values(parser.parse_args(["--tokens", "5", "--batch-size", "2"]))
    assert given == {"n_tokens": 5, "model": None, "batch_size": 2}
    assert options.flag("n_tokens") == "--tokens"
    help_text = " ".join(parser.format_help().split())
    assert (
        "--model MODEL Causal LM" in help_text
        and "Windows per forward pass. (default: 8)" in help_text
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--layer", "1"])  # not one of the fields


def main_in_fresh_python(command: list[str], *, imports: str = "", absent: tuple[str, ...]):
    """Run `raysae COMMAND` in a new interpreter (after `import IMPORTS`, if any) and check that
    none of the `absent` modules was imported; returns the completed process."""
    code = (
        "import sys\n"
        + (f"import {imports}\n" if imports else "")
        + "from raysae.__main__ import main\n"
        "try:\n"
        f"    main({command!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = sorted(set({list(absent)!r}) & set(sys.modules))\n"
        "assert not heavy, f'imported: {heavy}'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def test_settings_specs_and_evaluation_import_no_ray():
    done = main_in_fresh_python(
        ["eval", "--help"],
        imports="raysae.evaluate, raysae.splice, raysae.sweep_spec",
        absent=("ray",),
    )
    assert "--splice-tokens" in done.stdout


@pytest.mark.parametrize(
    "command", [["--help"], ["sweep", "--help"], ["eval", "--help"], ["export", "--help"]]
)
def test_help_imports_neither_torch_nor_ray(command):
    """Every `raysae` call builds a parser first: describing options must stay cheap."""
    done = main_in_fresh_python(command, absent=("torch", "ray", "pyarrow"))
    assert "usage: raysae" in done.stdout
