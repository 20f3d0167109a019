"""The client side of attestation: it runs on the remote user's machine, never inside the enclave."""
