"""The runner's attestation set-up that `tsqp run` and `tsqp api` share: --attest to a provider, and the
event log from what this process holds once its first session is open (the checkpoint it read, the quantized
weights' fingerprint --protect checks against, the settings, what the compute server stated)."""
from __future__ import annotations

from ..trusted.attest import identity
from ..trusted.attest.attestor import Attestor, new_answer_key
from ..trusted.attest.providers import Provider, open_provider
from ..trusted.attest.tls import TlsIdentity


def provider_of(args) -> Provider | None:
    """--attest's provider, opened before anything loads, so that a missing TEE fails at once."""
    return open_provider(getattr(args, "attest", "off"))


def describe(choice: str, provider: Provider | None) -> str:
    """The banner's line."""
    if provider is None:
        why = "no TEE found (auto)" if choice == "auto" else "--attest off"
        return f"Attestation: off ({why}): clients cannot verify this runner"
    rtmr = "RTMR3 extended with the event log" if provider.rtmr3_extended else "event log bound in REPORTDATA only"
    if provider.name == "simulated":
        return (f"Attestation: SIMULATED (no TEE: a key of this process signs the evidence, which proves nothing; "
                f"verifiers refuse it unless allowed); {rtmr}")
    return f"Attestation: {provider.name}{' (auto)' if choice == 'auto' else ''}, {rtmr}"


def session_facts(args, offload) -> dict:
    """What the open session says about the model: our fingerprint (--protect) and the server's statement."""
    remote = getattr(offload, "inner", offload)
    info = getattr(remote, "info", None) or {}
    ours = getattr(offload, "fingerprint", None)                   # ProtectedOffload: the runner's quantized weights
    stated = info.get("fingerprint")
    if ours is not None and args.local:
        stated = remote.compute.fingerprint
    return {"weights_fingerprint": ours, "server_fingerprint": stated, "server_model": info.get("model")}


def attestor_for(args, provider: Provider, offload, model_id: str, hosts: list[str] | None) -> Attestor:
    """The attestor of this process; hosts: the names its TLS certificate carries (None: no TLS, `tsqp run`)."""
    key, public_hex = new_answer_key()
    facts = session_facts(args, offload)
    events = identity.event_log(model=model_id, checkpoint=identity.checkpoint_sha256(args.model),
                                weights_fingerprint=facts["weights_fingerprint"],
                                settings=identity.settings_of(args, provider.name),
                                server_fingerprint=facts["server_fingerprint"], server_model=facts["server_model"],
                                answer_key_hex=public_hex)
    attestor = Attestor(provider, events, key, TlsIdentity() if hosts is not None else None)
    if hosts is not None:
        attestor.certify(hosts)
    return attestor


def run_evidence(args, provider: Provider, offload, output: dict) -> dict:
    """`tsqp run --json`'s attestation: evidence whose nonce is SHA-256 of the run's canonical output
    ({"prompt_ids", "generated_ids"} or {"prompt_ids", "argmax"}), so it vouches for this very result; the
    certificate it carries (a key made for this run, in memory) is what REPORTDATA binds. Check it with
    `tsqp attest verify FILE --nonce <output_sha256>` on the evidence saved from here."""
    import hashlib

    from ..attestation.format import canonical_json
    from .api.app import model_id_of
    digest = hashlib.sha256(canonical_json(output)).digest()
    attestor = attestor_for(args, provider, offload, args.model_name if getattr(args, "model_name", None)
                            else model_id_of(args.model), ["localhost"])
    return {"output": output, "output_sha256": digest.hex(), "evidence": attestor.evidence(digest).to_dict()}
