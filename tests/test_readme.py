"""Every command in the ```bash blocks of README.md and docs/*.md parses, so the documents and the code cannot
drift apart.

Commands are read from the documents themselves (line continuations joined, comments dropped): ``capret-train`` runs
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
DOCUMENTS = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]

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


def readme_commands() -> list[tuple[str, list[str], str, str]]:
    """``(program, argv, command, document)`` for every capret command of README.md and the docs pages."""
    found = []
    for document in DOCUMENTS:
        for command in shell_commands(document.read_text(encoding="utf-8")):
            parsed = capret_argv(command)
            if parsed is not None:
                found.append((*parsed, command, document.relative_to(REPO_ROOT).as_posix()))
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
    ("program", "argv", "command", "document"),
    COMMANDS,
    ids=[f"{d}: {shlex.join(shlex.split(c, comments=True))}" for _, _, c, d in COMMANDS],
)
def test_readme_command_parses(program: str, argv: list[str], command: str, document: str) -> None:
    failure = parse_failure(program, argv)
    assert failure is None, f"{document}: command does not parse:\n  {command}\n{failure}"


def test_every_console_script_is_documented_and_extracted() -> None:
    """Guards the extractor: if it silently found nothing, the test above would pass vacuously."""
    assert PROGRAMS <= {program for program, _, _, document in COMMANDS if document == "README.md"}
    assert len(COMMANDS) >= 15
    assert {document for *_, document in COMMANDS} > {"README.md"}


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
    return [
        block
        for document in DOCUMENTS
        for block in re.findall(
            r"^```python[ \t]*\n(.*?)^```", document.read_text(encoding="utf-8"), flags=re.S | re.M
        )
    ]


def test_readme_stays_short() -> None:
    """The README is read in ten minutes; measured narratives and references live in docs/."""
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail to a docs/ page"


def test_docs_pages_are_in_the_site() -> None:
    """Every docs page is in mkdocs.yml's nav (a page outside it is unreachable from the site)."""
    import yaml

    nav = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def pages(entries: list) -> set[str]:
        found: set[str] = set()
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            found |= pages(value) if isinstance(value, list) else {value}
        return found

    on_disk = {p.relative_to(REPO_ROOT / "docs").as_posix() for p in (REPO_ROOT / "docs").glob("*.md")}
    assert on_disk <= pages(nav), f"docs pages missing from mkdocs.yml nav: {sorted(on_disk - pages(nav))}"


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


def test_relative_links_point_at_files() -> None:
    """A relative link or picture in README.md or docs/ names a file that exists (mkdocs checks docs/ too)."""
    missing = []
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", document.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (document.parent / target).exists():
                missing.append(f"{document.relative_to(REPO_ROOT)} -> {target}")
    assert not missing, "broken links: " + ", ".join(missing)
