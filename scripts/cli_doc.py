"""Write docs/cli.md from the `tsqp` parser itself, so the reference cannot drift from the flags.

    python3 scripts/cli_doc.py            # rewrite docs/cli.md
    python3 scripts/cli_doc.py --check    # exit 1 if docs/cli.md differs from the parser (tests/test_cli_doc.py)

Defaults are rendered as the parser has them with none of the environment variables the CLI reads set, so the
page is the same on every machine.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "cli.md"
READ_FROM_ENV = ("LLAMA_", "TSQP_")

HEADER = """# `tsqp` command reference

Generated from the parser by `python3 scripts/cli_doc.py` (a test checks that this file matches it): edit the
flags' help in `tsqp/cli.py`, not this page. How the commands fit together: [running.md](running.md). Flags
override the environment (`LLAMA_MODEL_PATH`, `LLAMA_IPC_PATH`, `LLAMA_DTYPE`, `LLAMA_GPU_DEVICE`,
`TSQP_API_KEY`, `TSQP_KEYS_DIR`); a flag that cannot apply to the rest of the command line is refused with a
message naming it (`tsqp/commands/flags.py`).
"""


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def flag_cell(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
    if action.nargs == 0:
        return names
    value = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                               else action.dest.upper())
    return f"{names} `{value}`" + (" ..." if action.nargs in ("+", "*") else "")


def default_cell(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    return f"`{action.default}`"


def command_section(name: str, sub: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = [f"## `tsqp {name}`", "", cell(summary) + ".", ""]
    groups = [g for g in sub._action_groups if any(a.dest != "help" for a in g._group_actions)]
    for group in groups:
        if group.title not in ("options", "optional arguments"):
            lines += [f"*{cell(group.title)}*", ""]
        lines += ["| flag | default | what |", "|---|---|---|"]
        lines += [f"| {flag_cell(a)} | {default_cell(a)} | {cell(a.help or '')} |"
                  for a in group._group_actions if a.dest != "help"]
        lines.append("")
    return lines


def render() -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(READ_FROM_ENV)}
    with mock.patch.dict(os.environ, clean, clear=True):
        sys.path.insert(0, str(ROOT))
        from tsqp import cli
        ap = cli.parser()
    subparsers = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in subparsers._choices_actions}
    lines = [HEADER]
    for name, sub in subparsers.choices.items():
        lines += command_section(name, sub, summaries.get(name, ""))
    # the default endpoint's directory names the user (tsqp-<uid>): the same page for every user
    return "\n".join(lines).rstrip().replace(f"/tmp/tsqp-{os.getuid()}/", "/tmp/tsqp-<uid>/") + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    text = render()
    if ap.parse_args().check:
        if PAGE.read_text() != text:
            print(f"{PAGE} differs from the parser: run python3 scripts/cli_doc.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
