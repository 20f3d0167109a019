"""The runner's measured identity: an event log of what this process is, in the order it learns it.

    tsqp.code        {"tsqp_version", "code_sha256"}           the installed package's own .py files
    tsqp.model       {"checkpoint_sha256", "weights_fingerprint", "model"}
    tsqp.settings    {"protect", "verify", "deferred_checks", "policy", "length_bucket", "attest"}
    tsqp.compute     {"server_fingerprint", "server_model"}    what the compute server stated in its hello
    tsqp.answer_key  {"ed25519"}                               the public key that signs each answer

code_sha256 is reproducible with coreutils from the directory holding the package:
    find tsqp -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum
(sha256sum's lines "<hex>  <path>\\n" in byte order of the paths). checkpoint_sha256 is the SHA-256 of a
.gguf file, or the same sha256sum-of-sha256sum over a model directory's files; null for a random preset.
weights_fingerprint is the quantized weights' fingerprint that --protect checks every result against (absent
without --protect: then the runner holds no weights and the server's are not checked); an unknown value is
left out rather than logged as null.
"""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from ...attestation import format as F
from ...attestation.answer import EVENT_ANSWER_KEY

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: Path, files: list[Path]) -> str:
    """sha256sum's output over `files` (paths shown relative to root's parent, in byte order), hashed."""
    named = sorted((p.relative_to(root.parent).as_posix(), p) for p in files)
    listing = "".join(f"{file_sha256(p)}  {name}\n" for name, p in named)
    return hashlib.sha256(listing.encode()).hexdigest()


def code_sha256(package: Path | None = None) -> str:
    """The digest of the tsqp package this process runs (its .py files)."""
    package = package or Path(__file__).resolve().parents[2]
    return tree_sha256(package, [p for p in package.rglob("*.py") if "__pycache__" not in p.parts])


def tsqp_version() -> str:
    try:
        return metadata.version("tsqp")
    except metadata.PackageNotFoundError:
        return "unknown"


def checkpoint_sha256(spec: str) -> str | None:
    if spec.startswith("random:"):
        return None
    path = Path(spec)
    if path.is_file():
        return file_sha256(path)
    return tree_sha256(path, [p for p in path.rglob("*") if p.is_file()])


def settings_of(args, attest: str) -> dict:
    """The security settings a client pins (a policy's "settings", compared key by key)."""
    return {"protect": getattr(args, "protect", None), "verify": bool(args.verify),
            "deferred_checks": bool(args.deferred_checks), "policy": args.policy,
            "length_bucket": int(args.length_bucket), "attest": attest}


def known(**values) -> dict:
    """An event's data without what is unknown (no fingerprint without --protect): a policy pinning it finds
    it absent."""
    return {k: v for k, v in values.items() if v is not None}


def event_log(*, model: str, checkpoint: str | None, weights_fingerprint: str | None, settings: dict,
              server_fingerprint: str | None, server_model: str | None, answer_key_hex: str) -> list[dict]:
    events = [
        {"type": F.EVENT_CODE, "data": {"tsqp_version": tsqp_version(), "code_sha256": code_sha256()}},
        {"type": F.EVENT_MODEL, "data": known(checkpoint_sha256=checkpoint, weights_fingerprint=weights_fingerprint,
                                              model=model)},
        {"type": F.EVENT_SETTINGS, "data": settings},
        {"type": F.EVENT_COMPUTE, "data": known(server_fingerprint=server_fingerprint, server_model=server_model)},
        {"type": EVENT_ANSWER_KEY, "data": {"ed25519": answer_key_hex}},
    ]
    return F.check_event_log(events)
