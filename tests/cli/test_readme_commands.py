"""Every concrete ``capret-eval`` command of the README and the docs pages parses into a typed config (flags, choices, modes), so the
documented reproduction commands cannot drift from the real command line."""

from __future__ import annotations

import re
import shlex

from repo_paths import REPO_ROOT

from capret.cli.eval import parse_args


def _commands() -> list[str]:
    documents = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    text = "\n".join(document.read_text(encoding="utf-8") for document in documents)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("capret-eval ") and "|" not in line and "METHOD" not in line:
                out.append(line)
    return out


def test_readme_capret_eval_commands_parse() -> None:
    commands = _commands()
    methods = set()
    for command in commands:
        mode, config = parse_args(shlex.split(command)[1:])
        if mode == "cir":
            methods.add(config.method)
            assert config.split in ("val", "test", "test1")
    # the composed-retrieval pages show a command for every method
    assert {"combiner", "searle", "searle-oti", "pic2word", "lincir", "cirevl", "text-only"} <= methods
