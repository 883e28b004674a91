"""`raysl --help` and every command's --help: each option says what it does, and a
command's module is imported only when that command needs it."""

import argparse

import pytest

from raysl import cli


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for the parser and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


FULL = dict(_commands(cli.build_parser()))
LEAVES = [path for path, p in FULL.items() if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]


def test_the_tree_holds_every_command():
    names = {" ".join(path) for path in LEAVES}
    assert {"demo", "pretrain", "tune", "eval", "shards build", "curate dedup", "bench data", "bench e2e"} <= names
    assert len(LEAVES) == sum(len(e.commands) if isinstance(e, cli.Group) else 1 for e in cli.TREE)


@pytest.mark.parametrize("path", list(FULL), ids=lambda p: " ".join(p) or "raysl")
def test_every_option_has_help(path):
    parser = FULL[path]
    missing = [a.option_strings[-1] if a.option_strings else a.dest for a in _options(parser) if not a.help]
    assert not missing, f"raysl {' '.join(path)}: no help for {', '.join(missing)}"
    hidden = [a.dest for a in _options(parser) if a.help == argparse.SUPPRESS]
    assert not hidden, f"raysl {' '.join(path)}: help suppressed for {', '.join(hidden)}"
    if path in LEAVES:
        own = [a for a in _options(parser) if a.dest not in ("verbose", "address")]
        assert own, f"raysl {' '.join(path)}: its add_arguments added nothing"


@pytest.mark.parametrize("path", list(FULL), ids=lambda p: " ".join(p) or "raysl")
def test_help_exits_0_and_shows_every_option(path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: raysl {' '.join(path)}".rstrip())
    assert out == FULL[path].format_help()  # main's parser adds a command's options when asked: all of them


def test_top_level_help_imports_no_command_module(monkeypatch, capsys):
    imported = []
    monkeypatch.setattr(cli.importlib, "import_module", lambda name, *a: imported.append(name))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "pretrain" in capsys.readouterr().out
    assert imported == []
