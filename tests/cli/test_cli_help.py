"""`hsmbridge … --help` reads like `aws kms … help`: a description for people (not the module's
internals), every option with a help text and a placeholder such as `ID`, never `CUSTOMKEYSTOREID`.
No HSM needed: only the argument parsers are exercised."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from hsmbridge.main import build_parser, main

NOT_HERE: set[tuple[str, ...]] = set()  # every command, `serve` (hsmbridge/http) included


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if (*path, name) not in NOT_HERE:
                    yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def test_every_command_is_covered() -> None:
    assert {("init",), ("serve",), ("audit",), ("audit", "find"), ("doctor",)} <= set(COMMANDS)
    assert ("audit", "delete-orphans") in COMMANDS
    assert {("keystore", "create"), ("key", "create"), ("key", "list")} <= set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "hsmbridge")
def test_help_has_text_and_placeholders_for_every_option(path, capsys) -> None:
    parser = COMMANDS[path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{' '.join(path)} {name}: no help text"
        if action.option_strings and action.nargs != 0 and action.choices is None:
            # argparse's default placeholder is the dest upper-cased: CUSTOMKEYSTOREID
            assert action.metavar, f"{' '.join(path)} {name}: no placeholder"
            assert isinstance(action.metavar, str)
            assert action.metavar.replace("_", "").isalpha()
            assert action.metavar.isupper()
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "Owns:" not in out
    assert "CUSTOMKEYSTOREID" not in out


def test_init_help_describes_the_command_not_the_module(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    out = capsys.readouterr().out
    assert "Owns:" not in out
    assert "--data-dir DIR" in out
    assert "hsmbridge.toml" in out  # what it writes stays documented


def test_doctor_help_lists_its_checks_and_where_the_password_comes_from(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    out = capsys.readouterr().out
    assert "Owns:" not in out
    for shown in ("--config FILE", "--cluster ID", "--password-file FILE", "--trust-anchor FILE"):
        assert shown in out, shown
    for check in ("module", "login", "key-template", "aes-gcm", "tampered-tag", "concurrency"):
        assert f"  {check} " in out, check
    for check in ("cluster-quorum", "trust-anchor", "cleanup"):
        assert f"  {check} " in out, check
    assert "never from the command line" in out
    assert "--password " not in out  # the refused option is not offered


def test_kms_options_use_aws_style_placeholders(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["keystore", "connect", "--help"])
    out = capsys.readouterr().out
    assert "--custom-key-store-id ID" in out
    assert "--config FILE" in out


def test_serve_help_describes_the_command_and_its_placeholders(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "Owns:" not in out
    for shown in ("--config FILE", "--workers N", "--tls-cert FILE", "--tls-key FILE"):
        assert shown in out, shown
    assert "--insecure-http" in out
    assert "HTTPS" in out  # the description, not only the options
