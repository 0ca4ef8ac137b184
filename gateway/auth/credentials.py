"""The credentials service the gateway calls: API keys and their token families (`api_keys`), worker
enrollment and rotation (`workers`), and signed worker requests (`signed`), over one `auth` bucket.
Each part is one concept; `Credentials` only puts them together and opens the bucket."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from gateway.auth.api_keys import ApiKeys
from gateway.auth.families import AuthSettings, Clock, TokenFamilies
from gateway.auth.master_key import session_signing_key
from gateway.auth.replay import NonceWindow
from gateway.auth.signed import SignedRequests
from gateway.kv import Bucket
from sdk.events import now_ms


class Credentials(ApiKeys, SignedRequests):
    def __init__(
        self, bucket: Bucket, master_key: bytes, *, settings: AuthSettings = AuthSettings(), clock: Clock = now_ms
    ) -> None:
        TokenFamilies.__init__(self, bucket, master_key, settings=settings, clock=clock)
        self.nonces = NonceWindow(settings.replay_window_s)
        #: Signs direct-session tokens (`gateway.direct`).
        self.session_signer: Ed25519PrivateKey = session_signing_key(master_key)

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        master_key: bytes,
        *,
        settings: AuthSettings = AuthSettings(),
        clock: Clock = now_ms,
    ) -> Credentials:
        """The service on the `auth` bucket (created by `sdk.log.ensure_streams`), revocations and worker
        records loaded and followed."""
        credentials = cls(await cls._bucket_for(js), master_key, settings=settings, clock=clock)
        await credentials._revocations.start()
        await credentials._worker_records.start()
        return credentials

    async def __aenter__(self) -> Credentials:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
