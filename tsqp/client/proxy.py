"""`tsqp attest proxy`: a local plain-HTTP endpoint for clients that cannot attest (curl, other SDKs). It
forwards each request to the runner over the attested transport (client/attested.py): a connection whose
peer fails the policy carries nothing, and the local client gets 502 with the refusal. A request whose Host is not
the loopback is refused (403): a web page whose name was rebound to 127.0.0.1 could otherwise use the proxy."""
from __future__ import annotations

import ipaddress

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .attested import AttestationRefused

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
MAX_BODY_BYTES = 16 * 2**20


def loopback_host(host: str) -> bool:
    """A Host header naming this machine's loopback (127.0.0.0/8, [::1], localhost), port or not. Anything else
    is a page whose name was rebound to 127.0.0.1, using the proxy from the user's browser."""
    if host.startswith("["):                  # [::1]:8080
        name = host[1:].partition("]")[0]
    else:                                     # 127.0.0.1:8080, localhost
        name = host.partition(":")[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def forwarding_app(client: httpx.Client, target: str) -> Starlette:
    """target: the runner's base URL (https://host:port); paths and queries are forwarded as they come."""
    base = httpx.URL(target)

    async def forward(request: Request) -> Response:
        if not loopback_host(request.headers.get("host", "")):
            return JSONResponse({"error": {"message": f"tsqp attest proxy: Host {request.headers.get('host')!r} is not "
                                                      f"this host's loopback (a DNS-rebound web page?)"}},
                                status_code=403)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": {"message": f"the body exceeds {MAX_BODY_BYTES} bytes"}}, status_code=413)
        url = base.copy_with(raw_path=request.url.path.encode() + (b"?" + request.url.query.encode()
                                                                    if request.url.query else b""))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream = client.build_request(request.method, url, headers=headers, content=body)
        try:
            response = await run_in_threadpool(client.send, upstream, stream=True)
        except AttestationRefused as e:
            return JSONResponse({"error": {"message": f"tsqp attest proxy: {e}", "type": "attestation_refused",
                                           "param": e.verdict.field}}, status_code=502)
        except httpx.HTTPError as e:
            return JSONResponse({"error": {"message": f"tsqp attest proxy: {target}: {e}"}}, status_code=502)
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(response.iter_raw(), status_code=response.status_code, headers=kept,
                                 background=BackgroundTask(response.close))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])
