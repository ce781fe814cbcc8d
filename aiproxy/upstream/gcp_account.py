# -*- test-case-name: tests.test_vertex -*-
"""
A Google Cloud service account: its key file loaded (C{auth.gcp.service_account_json},
or the C{GCP_SERVICE_ACCOUNT} environment variable) and the signed JWT
assertion of the OAuth2 JWT-bearer grant (signing with C{google-auth}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from google.auth import crypt, jwt

__all__ = [
    "ASSERTION_LIFETIME",
    "ENVIRONMENT_VARIABLE",
    "GRANT_TYPE",
    "SCOPE",
    "ServiceAccount",
    "load_service_account",
]


#: The OAuth2 scope of the tokens: every Google Cloud API.
SCOPE = "https://www.googleapis.com/auth/cloud-platform"

#: The grant type of a token request (RFC 7523).
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"

#: Where the key file's JSON is read when C{auth.gcp.service_account_json}
#: is not set.
ENVIRONMENT_VARIABLE = "GCP_SERVICE_ACCOUNT"

#: Seconds an assertion is valid (Google accepts at most an hour).
ASSERTION_LIFETIME = 3600

_REQUIRED = ("client_email", "private_key", "token_uri")


class ServiceAccount:
    """
    A service account's key, loaded: it signs the assertions of token
    requests. Its C{repr} names the account only.

    @ivar client_email: the account (the assertion's issuer).
    @ivar token_uri: where tokens are requested (the assertion's audience).
    """

    def __init__(self, client_email: str, token_uri: str, signer: crypt.Signer) -> None:
        self.client_email = client_email
        self.token_uri = token_uri
        self._signer = signer

    def __repr__(self) -> str:
        return f"ServiceAccount({self.client_email!r})"

    @classmethod
    def from_json(cls, text: str) -> ServiceAccount:
        """
        Load a service-account key file's JSON.

        @raise ValueError: when it is not one; the message never quotes the
            key.
        """
        try:
            info = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        kind = info.get("type", "service_account")
        if kind != "service_account":
            raise ValueError(f"type is {kind!r}, not 'service_account'")
        missing = [
            name for name in _REQUIRED if not isinstance(info.get(name), str) or not info[name]
        ]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        parts = urlsplit(info["token_uri"])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("token_uri is not an http(s) URL")
        try:
            signer = crypt.RSASigner.from_service_account_info(info)
        except Exception:
            # The library's message may describe the key: say nothing of it.
            raise ValueError("private_key is not a PEM RSA private key") from None
        return cls(info["client_email"], info["token_uri"], signer)

    def assertion(self, now: float) -> str:
        """
        The signed JWT of a token request made at C{now} (POSIX seconds).
        """
        issued = int(now)
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        token: bytes = jwt.encode(self._signer, claims)
        return token.decode("ascii")


def load_service_account(
    gcp: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> ServiceAccount:
    """
    The service account of an C{auth.gcp} config: its
    C{service_account_json}, else the L{ENVIRONMENT_VARIABLE}.

    @param environ: the environment (L{os.environ} by default).
    @raise ValueError: when there is none, or it is not a usable key.
    """
    text = gcp.get("service_account_json")
    source = ""
    if not text:
        text = (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE)
        source = f" (from the {ENVIRONMENT_VARIABLE} environment variable)"
        if not text:
            raise ValueError(f"required, or the {ENVIRONMENT_VARIABLE} environment variable")
    try:
        return ServiceAccount.from_json(text)
    except ValueError as e:
        raise ValueError(f"not a service-account key{source}: {e}") from None
