"""Who is asking, and through which edge: the request context every service operation receives.

Owns: `RequestContext`. An edge builds one per request once it knows the caller (the HTTP server
after SigV4 verification, the CLI from its configured principal, the console from its session)
and passes it down; the service authorizes against it and the audit trail names its principal.
Background work the service does on its own behalf (recovery, the deletion sweeper) runs as
`RequestContext.service_principal(...)`, the way KMS records such work as an AWS service event.
Must not import anything from hsmbridge.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Final

CLI_USER_AGENT: Final = "hsmbridge-cli"
KMS_SERVICE_PRINCIPAL: Final = "kms.amazonaws.com"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The caller of one operation. Immutable: it travels unchanged through every layer."""

    principal_arn: str  # an IAM user, role or account root ARN, or a service principal
    account_id: str  # the caller's account (the service's own for service principals)
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    source_ip: str | None = None
    user_agent: str | None = None
    edge: str = "http"  # http | cli | console | service: which door the request came through
    # The AWS service this principal acts for (`via_service` in the credentials file), e.g.
    # "ec2.us-west-2.amazonaws.com": the kms:ViaService and kms:GrantIsForAWSResource inputs.
    via_service: str | None = None
    grant_tokens: tuple[str, ...] = ()
    # Temporary credentials (STS): the session policy passed to AssumeRole, which limits what
    # the session may do, and the IAM role the session belongs to.
    session_policy: str | None = None
    role_arn: str | None = None
    secure_transport: bool = False  # aws:SecureTransport: the request arrived over TLS

    @classmethod
    def service_principal(cls, account_id: str) -> RequestContext:
        """hsmbridge acting on its own (crash recovery, scheduled deletions)."""
        return cls(
            KMS_SERVICE_PRINCIPAL, account_id, edge="service", via_service="kms.amazonaws.com"
        )

    @property
    def is_service(self) -> bool:
        return self.edge == "service"

    @property
    def via_aws_service(self) -> bool:
        return self.via_service is not None
