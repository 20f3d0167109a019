"""`tsqp attest proxy`: a local plain-HTTP endpoint for clients that cannot attest (curl, other SDKs). It
forwards each request to the runner over the attested transport (client/attested.py): a connection whose
peer fails the policy carries nothing, and the local client gets 502 with the refusal."""
from __future__ import annotations

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


def forwarding_app(client: httpx.Client, target: str) -> Starlette:
    """target: the runner's base URL (https://host:port); paths and queries are forwarded as they come."""
    base = httpx.URL(target)

    async def forward(request: Request) -> Response:
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
