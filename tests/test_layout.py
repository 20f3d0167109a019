"""The folder tree is the trust boundary: imports go one way, checked on the source itself."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tsqp"
SHARED = ("tsqp.config", "tsqp.weights", "tsqp.ops", "tsqp.stats", "tsqp.quant", "tsqp.ring", "tsqp.gguf_checkpoint",
          "tsqp.checkpoint", "tsqp.files")


def imports_of(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved; function-level imports too)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def modules_under(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for p in paths:
        hits = sorted(m for m in imports_of(p) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[str(p.relative_to(PACKAGE))] = hits
    return bad


def test_the_tree_has_the_three_domains():
    for sub in ("trusted", "untrusted", "wire", "commands"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
    assert modules_under("trusted") and modules_under("untrusted") and modules_under("wire")


def test_trusted_side_imports_neither_the_server_nor_zmq_nor_the_wire():
    assert offending(modules_under("trusted"), ("tsqp.untrusted", "tsqp.wire", "zmq", "tsqp.commands",
                                                "tsqp.local")) == {}


def test_untrusted_side_never_imports_the_trusted_side():
    assert offending(modules_under("untrusted"), ("tsqp.trusted", "tsqp.commands", "tsqp.local")) == {}


def test_wire_knows_neither_side():
    assert offending(modules_under("wire"), ("tsqp.trusted", "tsqp.untrusted", "tsqp.commands")) == {}


def test_shared_modules_import_no_domain():
    paths = [PACKAGE.parent / (name.replace(".", "/") + ".py") for name in SHARED]
    paths = [p for p in paths if p.is_file()]
    assert offending(paths, ("tsqp.trusted", "tsqp.untrusted", "tsqp.wire", "tsqp.commands", "zmq")) == {}


def test_the_checker_sees_a_violation(tmp_path):
    """The checks above would catch a bad import: resolve one relative import the way they do."""
    fake = PACKAGE / "trusted" / "model.py"
    assert "tsqp.config" in imports_of(fake)
    assert offending([fake], ("tsqp.config",)) == {"trusted/model.py": ["tsqp.config", "tsqp.config.ModelConfig"]}
