"""docs/cli.md is the parser's own reference: regenerated and compared, so a flag changed without the page fails."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_cli_reference_matches_the_parser():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_doc.py"), "--check"], capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                                    "LLAMA_MODEL_PATH": "/elsewhere", "TSQP_API_KEY": "k"})
    assert r.returncode == 0, r.stderr


def test_the_reference_lists_every_flag_of_every_command():
    sys.path.insert(0, str(ROOT))
    from tsqp import cli
    page = (ROOT / "docs" / "cli.md").read_text()
    sub = next(a for a in cli.parser()._actions if isinstance(a, cli.argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"## `tsqp {name}`" in page
        section = page.split(f"## `tsqp {name}`")[1].split("\n## ")[0]
        missing = [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")
                   and f"`{o}`" not in section]
        assert missing == [], (name, missing)
