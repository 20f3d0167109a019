"""The client's reference values: a plain JSON policy file, parsed strictly (unknown keys refused).

A field absent from the policy is not checked; a policy that pins no root measurement of its TEE is refused,
since it would accept any enclave at all: MRTD for TDX (RTMR0-2 are extended by the firmware MRTD measures, so
a firmware of the attacker's writes any RTMR it likes), MRENCLAVE or MRSIGNER for SGX (ISVPRODID and ISVSVN
are whatever the enclave's signer chose). JSON with a key given twice is refused (which one would count?).
The values come from the client (or an operator it trusts to publish them), never from the server verified.

    {"format": "tsqp-policy/1", "tee": "tdx",
     "mrtd": hex48, "rtmr0": hex48, "rtmr1": hex48, "rtmr2": hex48,            (tdx, simulated)
     "mrenclave": hex32, "mrsigner": hex32, "isv_prod_id": int, "min_isv_svn": int,   (sgx)
     "allowed_tcb_statuses": ["UpToDate"], "allow_debug": false,
     "code_sha256": hex32, "tsqp_version": str, "weights_fingerprint": hex, "checkpoint_sha256": hex32,
     "settings": {...}, "server_fingerprint": str}
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from ..attestation import format as fmt

POLICY_FORMAT = "tsqp-policy/1"
TEES = ("tdx", "sgx", "simulated")
TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked")
MEASUREMENTS = {"tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2"), "simulated": ("mrtd", "rtmr0", "rtmr1", "rtmr2"),
                "sgx": ("mrenclave", "mrsigner", "isv_prod_id", "min_isv_svn")}
ROOTS = {"tdx": ("mrtd",), "sgx": ("mrenclave", "mrsigner")}   # what the hardware measures, not the software
HEX_SIZES = {"mrtd": 48, "rtmr0": 48, "rtmr1": 48, "rtmr2": 48, "mrenclave": 32, "mrsigner": 32,
             "code_sha256": 32, "checkpoint_sha256": 32}
MAX_POLICY_BYTES = 64 * 1024
HEX = re.compile(r"[0-9a-fA-F]*")


class PolicyError(ValueError):
    """A policy file that is not what the format says; `field` names the first wrong key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"policy {field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Policy:
    tee: str
    mrtd: str | None = None
    rtmr0: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    mrenclave: str | None = None
    mrsigner: str | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    allowed_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    allow_debug: bool = False
    code_sha256: str | None = None
    tsqp_version: str | None = None
    weights_fingerprint: str | None = None
    checkpoint_sha256: str | None = None
    settings: dict = field(default_factory=dict)
    server_fingerprint: str | None = None

    def to_dict(self) -> dict:
        doc = {"format": POLICY_FORMAT, **asdict(self)}
        doc["allowed_tcb_statuses"] = list(self.allowed_tcb_statuses)
        return {k: v for k, v in doc.items() if v is not None and not (k == "settings" and not v)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


_TYPES = {"tee": str, "isv_prod_id": int, "min_isv_svn": int, "allowed_tcb_statuses": list, "allow_debug": bool,
          "tsqp_version": str, "weights_fingerprint": str, "settings": dict, "server_fingerprint": str,
          **{k: str for k in HEX_SIZES}}


def _check_value(key: str, value):
    kind = _TYPES[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PolicyError(key, f"must be {kind.__name__}, got {type(value).__name__}")
    if key in HEX_SIZES:
        if not HEX.fullmatch(value):       # bytes.fromhex would also take spaces
            raise PolicyError(key, "is not hex (digits 0-9a-f only)")
        raw = bytes.fromhex(value)
        if len(raw) != HEX_SIZES[key]:
            raise PolicyError(key, f"must be {HEX_SIZES[key]} bytes of hex, got {len(raw)}")
        return raw.hex()   # lower case, so comparisons are byte comparisons
    if key == "weights_fingerprint":
        return value.lower()
    if kind is int and not 0 <= value < 1 << 16:
        raise PolicyError(key, f"must be a u16, got {value}")
    if key == "allowed_tcb_statuses":
        unknown = [s for s in value if s not in TCB_STATUSES]
        if not value or unknown:
            raise PolicyError(key, f"must name some of {', '.join(TCB_STATUSES)}; unknown: {unknown}")
        return tuple(value)
    return value


def parse_policy(doc: bytes | str | dict) -> Policy:
    """Strictly parse a policy document; PolicyError names the first wrong key."""
    if isinstance(doc, (bytes, str)):
        if len(doc) > MAX_POLICY_BYTES:
            raise PolicyError("file", f"is over the {MAX_POLICY_BYTES}-byte cap")
        try:
            doc = json.loads(doc, object_pairs_hook=lambda pairs: fmt.unique_keys(pairs, PolicyError))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PolicyError("file", f"is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PolicyError("file", f"must be a JSON object, got {type(doc).__name__}")
    doc = dict(doc)
    if doc.pop("format", POLICY_FORMAT) != POLICY_FORMAT:
        raise PolicyError("format", f"expected {POLICY_FORMAT!r}")
    unknown = sorted(set(doc) - set(_TYPES))
    if unknown:
        raise PolicyError(unknown[0], f"is not a policy key (known: {', '.join(sorted(_TYPES))})")
    if "tee" not in doc:
        raise PolicyError("tee", f"is missing (one of {', '.join(TEES)})")
    values = {k: _check_value(k, v) for k, v in doc.items()}
    if values["tee"] not in TEES:
        raise PolicyError("tee", f"expected one of {', '.join(TEES)}, found {values['tee']!r}")
    foreign = [k for tee, keys in MEASUREMENTS.items() if tee != values["tee"] for k in keys
               if k in values and k not in MEASUREMENTS[values["tee"]]]
    if foreign:
        raise PolicyError(foreign[0], f"is not a measurement of a {values['tee']} quote")
    return check_pinned(Policy(**values))


def check_pinned(policy: Policy) -> Policy:
    """The policy, once it pins what its TEE's hardware measures (PolicyError otherwise); a client that sends
    prompts on a verdict requires it, whether the policy came from a file or was built in code."""
    roots = ROOTS.get(policy.tee, ())
    if roots and all(getattr(policy, k) is None for k in roots):
        raise PolicyError("tee", f"pins no {' or '.join(roots)}, what the {policy.tee} hardware measures: "
                                 f"without it the policy would accept any enclave")
    return policy
