"""Attestation on the trusted side: what this runner is (identity.py: the event log), how the hardware vouches
for it (providers.py: configfs-tsm for TDX and SEV-SNP, Gramine's /dev/attestation for SGX, a simulated one
for machines without a TEE), the TLS key and certificate that bind the channel to that evidence (tls.py), and
the key that signs each answer (answers.py). The evidence format itself is tsqp/attestation/format.py, shared
with the client's verifier."""
