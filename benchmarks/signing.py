"""Pre-signed KMS requests: botocore's own SigV4 signer, serialised to raw HTTP/1.1 bytes.

Signatures stay valid for 5 minutes (hsmbridge's clock-skew window, MAX_SKEW in
hsmbridge/http/sigv4.py), so pools are signed just before each phase and a phase must be shorter
than that. Bodies differ per request (plaintext, encryption context, description), so a
pool of N requests carries N distinct signatures, as N real clients would send.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from benchmarks.common import LOOPBACK

Body = Callable[[int], dict[str, Any]]


@dataclass(frozen=True)
class Target:
    """A KMS endpoint on loopback and the credentials to sign for it."""

    name: str  # "hsmbridge" or "moto"
    port: int
    access_key: str
    secret_key: str
    region: str = "us-east-1"


def sign(target: Target, operation: str, body: dict[str, Any]) -> bytes:
    url = f"http://{LOOPBACK}:{target.port}/"
    data = json.dumps(body, separators=(",", ":")).encode()
    request = AWSRequest(
        method="POST",
        url=url,
        data=data,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
    )
    creds = Credentials(target.access_key, target.secret_key)
    SigV4Auth(creds, "kms", target.region).add_auth(request)
    lines = ["POST / HTTP/1.1", f"Host: {LOOPBACK}:{target.port}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    lines += [f"Content-Length: {len(data)}", "Connection: keep-alive", "", ""]
    return "\r\n".join(lines).encode() + data


def pool(target: Target, operation: str, body: Body, n: int) -> list[bytes]:
    return [sign(target, operation, body(i)) for i in range(n)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt_body(key_id: str) -> Body:
    return lambda _i: {"KeyId": key_id, "Plaintext": b64(os.urandom(32))}


def decrypt_body(blobs: list[bytes]) -> Body:
    return lambda i: {"CiphertextBlob": b64(blobs[i % len(blobs)])}


def data_key_body(key_id: str) -> Body:
    # The encryption context makes each body (and so each signature) distinct.
    return lambda i: {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": {"n": str(i)}}


def create_key_body(store_id: str | None) -> Body:
    if store_id is None:  # moto: an ordinary AWS_KMS key, the peer's equivalent
        return lambda i: {"Description": f"bench {i}"}
    return lambda i: {
        "Origin": "AWS_CLOUDHSM",
        "CustomKeyStoreId": store_id,
        "Description": f"bench {i}",
    }
