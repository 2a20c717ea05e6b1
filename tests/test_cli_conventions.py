"""One set of conventions across every `lmforge` subcommand (lmforge/cli_parser.py)."""

from __future__ import annotations

import argparse

import pytest

from lmforge.cli import build_parser, main

# commands that run PyTorch models, and so take --threads
TORCH_COMMANDS = {"generate", "chat", "export", "pretrain", "finetune", "scaling sweep", "serve", "demo"}
# option dest -> the spellings it must have wherever it appears
SPELLINGS = {"model": {"--model"}, "tokenizer": {"-t", "--tokenizer"}, "output": {"-o", "--output"},
             "config": {"-c", "--config"}, "quiet": {"-q", "--quiet"}, "overrides": {"--set"}}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                nested = _commands(sub, full)
                found |= nested or {full: sub}
    return found


COMMANDS = _commands(build_parser())


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_shared_options_are_spelled_alike(name):
    for action in _options(COMMANDS[name]):
        want = SPELLINGS.get(action.dest)
        if want is not None:
            assert want <= set(action.option_strings), (name, action.option_strings)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_says_its_default(name):
    parser = COMMANDS[name]
    formatter = parser._get_formatter()
    for action in _options(parser):
        if action.required or isinstance(action, argparse._StoreConstAction | argparse._AppendAction):
            continue
        flags = "/".join(action.option_strings)
        assert action.help, f"{name} {flags} has no help (argparse then hides its default)"
        rendered = formatter._get_help_string(action)
        assert "default" in rendered, f"{name} {'/'.join(action.option_strings)}: {rendered!r}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_config_commands_take_overrides_and_torch_commands_take_threads(name):
    dests = {a.dest for a in _options(COMMANDS[name])}
    if "config" in dests:
        assert "overrides" in dests, name
    if name in TORCH_COMMANDS:
        assert "threads" in dests, name


def test_bare_command_lists_the_commands_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("generate", "pretrain", "export", "serve", "tokenize"):
        assert command in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("lmforge ")


def test_errors_name_the_flag_not_the_field(capsys, tmp_path):
    assert main(["generate", "--model", "smollm2", "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens" in err and "max_tokens" not in err
    assert main(["generate", "--model", "smollm2", "--prompt", "hi", "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_dotted_overrides_work_for_every_config_command(tmp_path, capsys):
    # an unknown key is named in the error: the dotted form reached the config loader
    for argv in (["prepare", "web", "-o", str(tmp_path / "p"), "--no_such.key=1"],
                 ["crawl", "http://127.0.0.1:9/", "-o", str(tmp_path / "c"), "--no_such_key=1"],
                 ["pretrain", "--no_such.key=1"]):
        assert main(argv) == 2, argv
        assert "no_such" in capsys.readouterr().err, argv
