"""Evidence providers: one small interface over the ways a guest asks its hardware for a quote.

    Provider.name                      "tdx" | "sev-snp" | "sgx" | "simulated"
    Provider.quote(report_data) -> raw quote bytes, REPORTDATA = those 64 bytes
    Provider.extend_rtmr3(digest) -> bool: the 48-byte digest went into RTMR3 (False where it cannot)

- TDX and SEV-SNP: the kernel's configfs-tsm (Linux >= 6.7): make /sys/kernel/config/tsm/report/<entry>/, write
  up to 64 bytes to `inblob`, read the quote from `outblob`; `provider` names the driver (tdx_guest, sev_guest)
  and `generation` counts writes, so a concurrent writer between our write and read is detected. RTMR3 is
  extended through /sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384 (Linux >= 6.16), and only
  when it reads as zeros at start: then a verifier can replay our log alone to it.
- SGX: Gramine's pseudo-files /dev/attestation/{attestation_type, user_report_data, quote}.
- simulated: no hardware; a quote in TDX v4's shape signed by an Ed25519 key made for this process. It proves
  nothing about the machine, and every verifier refuses it unless the client allows simulated evidence.

The roots (configfs, /dev/attestation, the measurements directory) are parameters, so tests drive the file
protocol with a directory tree of their own.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...attestation import format as F

TSM_REPORTS = Path("/sys/kernel/config/tsm/report")
TDX_MEASUREMENTS = Path("/sys/devices/virtual/misc/tdx_guest/measurements")
GRAMINE_ATTESTATION = Path("/dev/attestation")
TSM_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}
MAX_QUOTE_BYTES = 1 << 20
RTMR_BYTES = 48
CHOICES = ("auto", "tdx", "sev-snp", "sgx", "simulated", "off")


class AttestationError(RuntimeError):
    """The hardware's interface is missing or misbehaved; the message names the file."""


def read_bytes(path: Path, limit: int = MAX_QUOTE_BYTES) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise AttestationError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise AttestationError(f"{path} holds more than {limit} bytes")
    return data


def write_bytes(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb", buffering=0) as f:
            f.write(data)
    except OSError as e:
        raise AttestationError(f"cannot write {path}: {e.strerror}") from None


class Provider:
    name = "none"
    rtmr3_extended = False       # True once every event of the log went into RTMR3 (a verifier replays it)

    def quote(self, report_data: bytes) -> bytes:
        raise NotImplementedError

    def extend_rtmr3(self, digest: bytes) -> bool:
        return False


class ConfigfsTsm(Provider):
    """TDX or SEV-SNP through configfs-tsm; one report entry of our own, removed on close."""

    def __init__(self, reports: Path = TSM_REPORTS, measurements: Path = TDX_MEASUREMENTS, entry: str | None = None):
        """entry: a report entry made beforehand (by the operator, or a test's tree); default: a fresh one."""
        self.entry = reports / (entry or f"tsqp-{os.getpid()}-{secrets.token_hex(4)}")
        self.own_entry = entry is None
        try:
            self.entry.mkdir(exist_ok=not self.own_entry)
        except OSError as e:
            raise AttestationError(f"cannot create the configfs-tsm entry {self.entry}: {e.strerror}") from None
        driver = read_bytes(self.entry / "provider", 64).decode(errors="replace").strip()
        if driver not in TSM_PROVIDERS:
            self.close()
            raise AttestationError(f"{self.entry / 'provider'} says {driver!r}; expected one of "
                                   f"{', '.join(TSM_PROVIDERS)}")
        self.name = TSM_PROVIDERS[driver]
        self.rtmr3 = measurements / "rtmr3:sha384" if self.name == "tdx" else None
        self.rtmr3_extended = self.rtmr3 is not None and self._rtmr3_fresh()

    def _rtmr3_fresh(self) -> bool:
        """RTMR3 is ours to extend only if it exists, is writable and nobody extended it yet."""
        if not self.rtmr3.exists() or not os.access(self.rtmr3, os.W_OK):
            return False
        return read_bytes(self.rtmr3, RTMR_BYTES) == bytes(RTMR_BYTES)

    def extend_rtmr3(self, digest: bytes) -> bool:
        if not self.rtmr3_extended:
            return False
        if len(digest) != RTMR_BYTES:
            raise ValueError(f"an RTMR3 extend takes {RTMR_BYTES} bytes, got {len(digest)}")
        write_bytes(self.rtmr3, digest)
        return True

    def quote(self, report_data: bytes) -> bytes:
        check_report_data(report_data)
        before = self._generation()
        write_bytes(self.entry / "inblob", report_data)
        raw = read_bytes(self.entry / "outblob")
        if self._generation() != before + 1:
            raise AttestationError(f"{self.entry}: another writer changed the report meanwhile (generation "
                                   f"{before} -> {self._generation()}); retry")
        if not raw:
            raise AttestationError(f"{self.entry / 'outblob'} is empty")
        return raw

    def _generation(self) -> int:
        text = read_bytes(self.entry / "generation", 32).decode(errors="replace").strip()
        if not text.isdigit():
            raise AttestationError(f"{self.entry / 'generation'} says {text!r}; expected a count")
        return int(text)

    def close(self) -> None:
        if not self.own_entry:
            return
        try:
            self.entry.rmdir()
        except OSError:          # already gone: nothing to free
            pass


class Gramine(Provider):
    """SGX inside Gramine with `sgx.remote_attestation = "dcap"`: MRENCLAVE covers the code through the
    manifest's trusted files; RTMR3 does not exist, the log is bound through REPORTDATA only."""
    name = "sgx"

    def __init__(self, root: Path = GRAMINE_ATTESTATION):
        self.root = root
        kind = read_bytes(root / "attestation_type", 64).decode(errors="replace").strip()
        if kind != "dcap":
            raise AttestationError(f"{root / 'attestation_type'} says {kind!r}; the manifest needs "
                                   f'sgx.remote_attestation = "dcap"')

    def quote(self, report_data: bytes) -> bytes:
        check_report_data(report_data)
        write_bytes(self.root / "user_report_data", report_data)
        raw = read_bytes(self.root / "quote")
        if not raw:
            raise AttestationError(f"{self.root / 'quote'} is empty")
        return raw


class Simulated(Provider):
    """For machines without a TEE: the quote's shape, none of its guarantee. RTMR3 is kept in this process."""
    name = "simulated"
    rtmr3_extended = True

    def __init__(self):
        self.key = Ed25519PrivateKey.generate()
        self.rtmr3 = bytes(RTMR_BYTES)

    def extend_rtmr3(self, digest: bytes) -> bool:
        if len(digest) != RTMR_BYTES:
            raise ValueError(f"an RTMR3 extend takes {RTMR_BYTES} bytes, got {len(digest)}")
        self.rtmr3 = hashlib.sha384(self.rtmr3 + digest).digest()
        return True

    def quote(self, report_data: bytes) -> bytes:
        check_report_data(report_data)
        return F.make_simulated_quote(report_data, self.rtmr3, self.key)


def check_report_data(report_data: bytes) -> None:
    if not isinstance(report_data, bytes) or len(report_data) != 64:
        raise ValueError(f"REPORTDATA is 64 bytes, got {len(report_data) if isinstance(report_data, bytes) else report_data!r}")


@dataclass(frozen=True)
class Roots:
    """Where the hardware's interfaces live (tests point these at a tree of their own); entry: a configfs-tsm
    report entry made beforehand, else a fresh one of ours."""
    reports: Path = TSM_REPORTS
    gramine: Path = GRAMINE_ATTESTATION
    measurements: Path = TDX_MEASUREMENTS
    entry: str | None = None


def detect(roots: Roots = Roots()) -> Provider | None:
    """What this machine offers (for --attest auto), or None: configfs-tsm first, then Gramine."""
    if roots.reports.is_dir():
        return ConfigfsTsm(roots.reports, roots.measurements, roots.entry)
    if (roots.gramine / "quote").exists():
        return Gramine(roots.gramine)
    return None


def open_provider(choice: str, roots: Roots = Roots()) -> Provider | None:
    """--attest CHOICE -> a provider, or None for off (and for auto where the machine offers none). A TEE
    asked for by name but absent is an error naming what was looked for."""
    if choice not in CHOICES:
        raise ValueError(f"--attest must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "off":
        return None
    if choice == "simulated":
        return Simulated()
    if choice == "auto":
        return detect(roots)
    if choice in ("tdx", "sev-snp"):
        if not roots.reports.is_dir():
            raise AttestationError(f"--attest {choice}: {roots.reports} is missing (a {choice} guest with Linux >= "
                                   f"6.7 and configfs mounted offers it)")
        provider = ConfigfsTsm(roots.reports, roots.measurements, roots.entry)
        if provider.name != choice:
            provider.close()
            raise AttestationError(f"--attest {choice}: this machine's configfs-tsm provider is {provider.name}")
        return provider
    if not (roots.gramine / "quote").exists():
        raise AttestationError(f"--attest sgx: {roots.gramine / 'quote'} is missing (run inside Gramine with "
                               f'sgx.remote_attestation = "dcap")')
    return Gramine(roots.gramine)
