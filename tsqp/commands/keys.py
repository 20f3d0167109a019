"""`tsqp keys`: CurveZMQ key pairs for tcp:// (owner-only files)."""
from __future__ import annotations

from pathlib import Path

from ..wire.keys import DEFAULT_KEYS_DIR, allow, generate


def keys_command(args) -> None:
    """`tsqp keys`: a server pair, a client pair, and the client's public key on the server's allow-list."""
    d = Path(args.dir or DEFAULT_KEYS_DIR).expanduser()
    names = [args.name] if args.name else ["server", "client"]
    for name in names:
        pub, sec = generate(d, name, args.force)
        print(f"wrote {pub} (public) and {sec} (secret, owner-only)")
        if name != "server":
            print(f"allowed {allow(d, pub, args.force)} (the server accepts this client)")
    print(f"server: tsqp serve --endpoint tcp://127.0.0.1:PORT --keys {d}\n"
          f"runner: tsqp run --endpoint tcp://HOST:PORT --keys {d}  (another host: copy server.key and "
          f"client.key_secret there, and client.key into the server's {d / 'allowed'})")
