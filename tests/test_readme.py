"""Every command in README.md's ```bash blocks parses, so the README and the code cannot drift apart.

Commands are read from the README itself (line continuations joined, comments dropped): ``capret-train`` runs
with ``--print-config`` appended (the config file resolves and every ``key=value`` override names a real
field with a valid value); ``capret-eval``, ``capret-extract``, ``capret-caption`` and ``capret <subcommand>``
are parsed by their own parsers (``capret-caption`` also builds its typed config). ``torchrun ... -m
capret.cli.X`` and ``python -m capret.cli.X`` count as the console script of module X. Python blocks: every
``from capret... import`` / ``import capret`` line and every ``capret.<name>`` they call must resolve.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from collections.abc import Callable, Iterator

import pytest
from repo_paths import REPO_ROOT

README = REPO_ROOT / "README.md"

#: module run with ``-m`` -> the console script it backs
MODULES = {
    "capret.cli.train": "capret-train",
    "capret.cli.eval": "capret-eval",
    "capret.cli.extract": "capret-extract",
    "capret.cli.main": "capret",
    "captioning.cli": "capret-caption",
}
PROGRAMS = frozenset(MODULES.values())


def shell_commands(text: str) -> Iterator[str]:
    """The logical command lines of every ```bash block: continuations joined, blank and comment lines dropped."""
    for block in re.findall(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                yield command
        if pending.strip():
            yield pending.strip()


def capret_argv(command: str) -> tuple[str, list[str]] | None:
    """``(program, argv)`` of a capret command line (shell comments removed), or None for other programs."""
    tokens = shlex.split(command, comments=True)
    if not tokens:
        return None
    if tokens[0] in PROGRAMS:
        return tokens[0], tokens[1:]
    if tokens[0] in ("torchrun", "python", "python3") and "-m" in tokens:
        at = tokens.index("-m")
        module = tokens[at + 1] if at + 1 < len(tokens) else ""
        if module in MODULES:
            return MODULES[module], tokens[at + 2 :]
    return None


def readme_commands() -> list[tuple[str, list[str], str]]:
    found = []
    for command in shell_commands(README.read_text()):
        parsed = capret_argv(command)
        if parsed is not None:
            found.append((*parsed, command))
    return found


def _parse_train(argv: list[str]) -> None:
    from capret.cli import train

    code = train.main([*argv, "--print-config"])
    if code != 0:
        raise SystemExit(code)


def _parse_eval(argv: list[str]) -> None:
    from capret.cli import eval as eval_cli

    parse = getattr(eval_cli, "parse_args", None)
    if parse is not None:
        parse(argv)
    else:
        eval_cli.build_parser().parse_args(argv)


def _parse_extract(argv: list[str]) -> None:
    from capret.cli import extract

    extract.build_parser().parse_args(argv)


def _parse_caption(argv: list[str]) -> None:
    from captioning import cli

    cli.config_from_args(cli.build_parser().parse_args(argv))


def _parse_capret(argv: list[str]) -> None:
    from capret.cli import main

    args = main.build_parser().parse_args(argv)
    if getattr(args, "command", None) is None:
        raise SystemExit("no subcommand")


PARSERS: dict[str, Callable[[list[str]], None]] = {
    "capret-train": _parse_train,
    "capret-eval": _parse_eval,
    "capret-extract": _parse_extract,
    "capret-caption": _parse_caption,
    "capret": _parse_capret,
}


def parse_failure(program: str, argv: list[str]) -> str | None:
    """None when ``program argv`` parses; otherwise what went wrong (the CLI's own error output)."""
    from capret.config import ConfigError

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            PARSERS[program](argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return f"exit {exc.code}: {err.getvalue().strip() or exc.code}"
    except ConfigError as exc:
        return f"ConfigError: {exc}"
    return None


COMMANDS = readme_commands()


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """README commands use paths relative to the repository root (configs/...)."""
    monkeypatch.chdir(REPO_ROOT)


@pytest.mark.parametrize(
    ("program", "argv", "command"),
    COMMANDS,
    ids=[shlex.join(shlex.split(c, comments=True)) for _, _, c in COMMANDS],
)
def test_readme_command_parses(program: str, argv: list[str], command: str) -> None:
    failure = parse_failure(program, argv)
    assert failure is None, f"README command does not parse:\n  {command}\n{failure}"


def test_every_console_script_is_documented_and_extracted() -> None:
    """Guards the extractor: if it silently found nothing, the test above would pass vacuously."""
    assert PROGRAMS <= {program for program, _, _ in COMMANDS}
    assert len(COMMANDS) >= 15


def test_extractor_joins_continuations_and_drops_comments() -> None:
    text = (
        "intro\n```bash\n# a comment line\n"
        "capret-train --config configs/x.yaml \\\n    data.root=DF2   # trailing comment\n"
        "pip install -e .\n"
        "torchrun --nproc_per_node 2 -m capret.cli.extract --checkpoint m --images l.txt --out f/\n"
        "```\n```python\ncapret-eval --not-bash\n```\n"
    )
    parsed = [capret_argv(c) for c in shell_commands(text)]
    assert parsed == [
        ("capret-train", ["--config", "configs/x.yaml", "data.root=DF2"]),
        None,
        ("capret-extract", ["--checkpoint", "m", "--images", "l.txt", "--out", "f/"]),
    ]


@pytest.mark.parametrize(
    ("program", "argv"),
    [
        ("capret-train", ["--config", "configs/fashioniq_combiner.yaml", "root=fashion-iq", "stage=1"]),
        ("capret-train", ["--config", "configs/deepfashion2_dualstream.yaml", "trainer.max_steps=many"]),
        ("capret-train", ["--config", "configs/no_such.yaml"]),
        ("capret-eval", ["--metric", "recall", "--query-features", "q.npy"]),
        ("capret-extract", ["--checkpoint", "qs/model", "--out", "features/"]),
        ("capret-caption", ["--dataset", "deepfashion2", "--root", "DF2", "--view", "side"]),
        ("capret", ["quickstart", "--no-such-flag"]),
    ],
)
def test_a_broken_command_is_reported(program: str, argv: list[str]) -> None:
    assert parse_failure(program, argv) is not None


def _python_blocks() -> list[str]:
    return re.findall(r"^```python[ \t]*\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_python_examples_import_paths_resolve() -> None:
    """Old and new import paths the README shows keep working (``import capret``, ``from capret.x import y``)."""
    checked = 0
    for block in _python_blocks():
        for module, names in re.findall(
            r"^from ((?:capret|captioning)[\w.]*) import ([\w, ]+)$", block, re.M
        ):
            loaded = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                assert hasattr(loaded, name), f"README: from {module} import {name} fails"
                checked += 1
        for module in re.findall(r"^import ((?:capret|captioning)[\w.]*)$", block, re.M):
            loaded = importlib.import_module(module)
            checked += 1
            for attr in set(re.findall(rf"\b{re.escape(module)}\.(\w+)\(", block)):
                assert hasattr(loaded, attr), f"README: {module}.{attr} does not exist"
                checked += 1
    assert checked > 0
