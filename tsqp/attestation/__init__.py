"""Attestation evidence shared by the trusted runner and the client verifier (pure: no I/O)."""
