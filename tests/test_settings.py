"""The CLI's option help comes from a table kept in sync with the settings' field docstrings,
and building the parser parses no source (python/cpython#106905 made that crash at random)."""

import argparse
import ast
import inspect
import threading

import pytest

from raysae import settings
from raysae.__main__ import COMMANDS, build_parser, main
from raysae.field_docs import FIELD_DOCS
from raysae.harvest import HarvestConfig


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
    """The reported crash: building the parser while other threads allocate and parse."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            ast.parse("x = [i * 2 for i in range(10)]\n" * 20)
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
