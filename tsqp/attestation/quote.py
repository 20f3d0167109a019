"""Quote layouts: parse the fields a policy checks out of a TDX v4/v5, SGX v3 or simulated quote.

Pure: bytes in, a QuoteBody out. Parsing checks nothing cryptographic for DCAP quotes (dcap-qvl does
that in tsqp/client/verify.py); a simulated quote's Ed25519 signature is checked by check_simulated_quote.

    offset  size  field (TDX v4; v5 inserts a 6-byte body header at 48, so body fields move by +6)
    0       2     version (u16 LE)          2   2  attestation key type
    4       4     tee_type: 0x81 TDX, 0 SGX, b"SIM\\0" simulated
    48      16    TEE_TCB_SVN     64  48  MRSEAM      112 48  MRSIGNERSEAM   160 8  SEAMATTRIBUTES
    168     8     TDATTRIBUTES (bit 0 = debug)        176 8   XFAM
    184     48    MRTD            232 48  MRCONFIGID  280 48  MROWNER        328 48 MROWNERCONFIG
    376/424/472/520  48 each      RTMR0..RTMR3
    568     64    REPORTDATA      632 (end of the TD 1.0 body)
    simulated: 632 32  Ed25519 public key, 664 64 signature over bytes [0, 632)      728 end

    SGX v3: 48 16 CPUSVN, 96 16 ATTRIBUTES (flags bit 1 = debug), 112 32 MRENCLAVE, 176 32 MRSIGNER,
            304 2 ISVPRODID, 306 2 ISVSVN, 368 64 REPORTDATA, 432 (end of the enclave report body)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HEADER_SIZE = 48
TDX_BODY_END = 632           # header + TD 1.0 report body
TDX15_EXTRA = 16 + 48        # TD 1.5 body: TEE_TCB_SVN2, MRSERVICETD
SGX_BODY_END = 432           # header + enclave report body
TEE_TDX = 0x81
TEE_SGX = 0
SIMULATED_TEE = b"SIM\0"
SIMULATED_SIZE = TDX_BODY_END + 32 + 64
MAX_QUOTE_SIZE = 64 * 1024   # real quotes are ~5 KiB with their certificate chain
TD_DEBUG = 1 << 0            # TDATTRIBUTES bit 0
SGX_DEBUG = 1 << 1           # SGX ATTRIBUTES.FLAGS bit 1


class QuoteError(ValueError):
    """A quote whose layout is wrong; `field` names what."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class QuoteBody:
    tee: str                 # "tdx" | "sgx" | "simulated"
    version: int
    report_data: bytes       # 64
    debug: bool
    signed_length: int       # bytes [0, signed_length) are what the quote's signature covers
    mrtd: bytes = b""        # TDX and simulated: 48 each
    rtmr0: bytes = b""
    rtmr1: bytes = b""
    rtmr2: bytes = b""
    rtmr3: bytes = b""
    td_attributes: bytes = b""   # 8
    xfam: bytes = b""
    mrseam: bytes = b""
    mrenclave: bytes = b""   # SGX: 32 each
    mrsigner: bytes = b""
    isv_prod_id: int = 0
    isv_svn: int = 0
    attributes: bytes = b""  # SGX: 16
    public_key: bytes = b""  # simulated: Ed25519, 32
    signature: bytes = b""   # simulated: 64

    def measurements(self) -> dict[str, str]:
        """The fields a policy pins, hex, in a stable order."""
        if self.tee == "sgx":
            return {"mrenclave": self.mrenclave.hex(), "mrsigner": self.mrsigner.hex(),
                    "isv_prod_id": str(self.isv_prod_id), "isv_svn": str(self.isv_svn)}
        return {"mrtd": self.mrtd.hex(), "rtmr0": self.rtmr0.hex(), "rtmr1": self.rtmr1.hex(),
                "rtmr2": self.rtmr2.hex(), "rtmr3": self.rtmr3.hex()}


def _need(raw: bytes, end: int, what: str) -> None:
    if len(raw) < end:
        raise QuoteError("quote", f"{what} needs {end} bytes, the quote has {len(raw)}")


def _td_body(raw: bytes, tee: str, version: int, base: int, body_end: int) -> QuoteBody:
    """A TD report body whose TEE_TCB_SVN starts at `base` (48 for v4, 54 for v5)."""
    o = base - HEADER_SIZE   # the v4 offsets in the table above, shifted
    td_attributes = raw[168 + o:176 + o]
    return QuoteBody(tee=tee, version=version, report_data=raw[568 + o:632 + o],
                     debug=bool(td_attributes[0] & TD_DEBUG), signed_length=body_end,
                     mrtd=raw[184 + o:232 + o], rtmr0=raw[376 + o:424 + o], rtmr1=raw[424 + o:472 + o],
                     rtmr2=raw[472 + o:520 + o], rtmr3=raw[520 + o:568 + o], td_attributes=td_attributes,
                     xfam=raw[176 + o:184 + o], mrseam=raw[64 + o:112 + o])


def _tdx(raw: bytes, version: int) -> QuoteBody:
    if version == 4:
        _need(raw, TDX_BODY_END, "a TDX v4 report body")
        return _td_body(raw, "tdx", 4, HEADER_SIZE, TDX_BODY_END)
    _need(raw, HEADER_SIZE + 6, "a TDX v5 body header")
    body_type, body_size = struct.unpack_from("<HI", raw, HEADER_SIZE)
    sizes = {2: TDX_BODY_END - HEADER_SIZE, 3: TDX_BODY_END - HEADER_SIZE + TDX15_EXTRA}
    if sizes.get(body_type) != body_size:
        raise QuoteError("quote.body_type", f"TDX v5 body type {body_type} of {body_size} bytes is not a "
                                            f"TD 1.0 (2, 584) or TD 1.5 (3, 648) report")
    end = HEADER_SIZE + 6 + body_size
    _need(raw, end, "a TDX v5 report body")
    return _td_body(raw, "tdx", 5, HEADER_SIZE + 6, end)


def _sgx(raw: bytes, version: int) -> QuoteBody:
    _need(raw, SGX_BODY_END, "an SGX v3 report body")
    attributes = raw[96:112]
    prod_id, svn = struct.unpack_from("<HH", raw, 304)
    return QuoteBody(tee="sgx", version=version, report_data=raw[368:432],
                     debug=bool(attributes[0] & SGX_DEBUG), signed_length=SGX_BODY_END,
                     mrenclave=raw[112:144], mrsigner=raw[176:208], isv_prod_id=prod_id, isv_svn=svn,
                     attributes=attributes)


def _simulated(raw: bytes, version: int) -> QuoteBody:
    if len(raw) != SIMULATED_SIZE:
        raise QuoteError("quote", f"a simulated quote is {SIMULATED_SIZE} bytes, this one {len(raw)}")
    body = _td_body(raw, "simulated", version, HEADER_SIZE, TDX_BODY_END)
    return QuoteBody(**{**body.__dict__, "public_key": raw[632:664], "signature": raw[664:728]})


def parse_quote(raw: bytes) -> QuoteBody:
    """The policy-relevant fields of a TDX v4/v5, SGX v3 or simulated quote; QuoteError names what is wrong."""
    if not isinstance(raw, (bytes, bytearray)):
        raise QuoteError("quote", f"expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_QUOTE_SIZE:
        raise QuoteError("quote", f"{len(raw)} bytes is over the {MAX_QUOTE_SIZE}-byte cap")
    _need(raw, HEADER_SIZE, "the header")
    version = struct.unpack_from("<H", raw, 0)[0]
    tee_raw = raw[4:8]
    tee_type = struct.unpack_from("<I", tee_raw)[0]
    if tee_raw == SIMULATED_TEE and version == 4:
        return _simulated(raw, version)
    if tee_type == TEE_TDX and version in (4, 5):
        return _tdx(raw, version)
    if tee_type == TEE_SGX and version == 3:
        return _sgx(raw, version)
    raise QuoteError("quote.header", f"version {version} with tee_type {tee_raw.hex()} is not TDX v4/v5, "
                                     f"SGX v3 or simulated")


def make_simulated_quote(report_data: bytes, rtmr3: bytes, signing_key: Ed25519PrivateKey,
                         mrtd: bytes = bytes(48)) -> bytes:
    """A TDX-v4-shaped quote whose tee_type says SIM, signed with the process's own Ed25519 key.

    Nothing in it is rooted in hardware: a verifier accepts it only when told to allow simulated evidence.
    """
    if len(report_data) != 64:
        raise QuoteError("report_data", f"must be 64 bytes, got {len(report_data)}")
    if len(rtmr3) != 48 or len(mrtd) != 48:
        raise QuoteError("rtmr3" if len(rtmr3) != 48 else "mrtd", "must be 48 bytes")
    quote = bytearray(TDX_BODY_END)
    struct.pack_into("<HH4s", quote, 0, 4, 2, SIMULATED_TEE)
    quote[184:232] = mrtd
    quote[520:568] = rtmr3
    quote[568:632] = report_data
    public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return bytes(quote) + public + signing_key.sign(bytes(quote))


def check_simulated_quote(raw: bytes) -> QuoteBody:
    """Parse a simulated quote and check its Ed25519 signature over header and body."""
    body = parse_quote(raw)
    if body.tee != "simulated":
        raise QuoteError("quote.header", f"a {body.tee} quote is not simulated")
    try:
        Ed25519PublicKey.from_public_bytes(body.public_key).verify(body.signature, raw[:body.signed_length])
    except InvalidSignature:
        raise QuoteError("quote.signature", "the simulated quote's Ed25519 signature does not verify") from None
    return body
