"""Trust-anchor checks for CloudHSM key stores.

Owns: parsing the customer's trust anchor (`customerCA.crt`), checking that the cluster
certificate from DescribeClusters was issued by it, and the "related cluster" test (equal
cluster certificates). Every rejection is an `IncorrectTrustAnchorException` whose message says
what to fix.

NOTE: how KMS checks the anchor is unverified [U]; we require a current CA certificate that
directly signed the cluster certificate, which is what CloudHSM's InitializeCluster produces.

Must not import: hsmbridge.metadata, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hsmbridge.errors import IncorrectTrustAnchorException

_HINT = "supply the customerCA.crt that signed the cluster CSR at InitializeCluster"


def _load_one(pem: str, what: str) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("utf-8"))
    except ValueError:
        raise IncorrectTrustAnchorException(
            f"the {what} is not a valid PEM-encoded X.509 certificate; {_HINT}"
        ) from None
    if len(certs) != 1:
        raise IncorrectTrustAnchorException(
            f"the {what} must contain exactly one PEM certificate, found {len(certs)}; {_HINT}"
        )
    return certs[0]


def load_trust_anchor(pem: str, now: datetime.datetime | None = None) -> x509.Certificate:
    """Parse a trust anchor: exactly one PEM certificate, a CA, valid at `now` (default: now)."""
    cert = _load_one(pem, "trust anchor certificate")
    subject = cert.subject.rfc4514_string() or "<empty subject>"
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise IncorrectTrustAnchorException(
            f"the trust anchor certificate ({subject}) is not a CA certificate "
            f"(BasicConstraints CA:TRUE is required); {_HINT}"
        )
    moment = now or datetime.datetime.now(datetime.UTC)
    if moment > cert.not_valid_after_utc:
        raise IncorrectTrustAnchorException(
            f"the trust anchor certificate ({subject}) expired on "
            f"{cert.not_valid_after_utc.isoformat()}; renew the CA certificate and supply it"
        )
    if moment < cert.not_valid_before_utc:
        raise IncorrectTrustAnchorException(
            f"the trust anchor certificate ({subject}) is not valid until "
            f"{cert.not_valid_before_utc.isoformat()}; check its validity period and clocks"
        )
    return cert


def verify_cluster_certificate(anchor_pem: str, cluster_cert_pem: str) -> None:
    """Raise unless the cluster certificate was issued and signed by the trust anchor."""
    anchor = load_trust_anchor(anchor_pem)
    cluster = _load_one(cluster_cert_pem, "cluster certificate")
    if cluster.issuer != anchor.subject:
        raise IncorrectTrustAnchorException(
            f"the cluster certificate was issued by {cluster.issuer.rfc4514_string()!r}, not by "
            f"the trust anchor {anchor.subject.rfc4514_string()!r}; {_HINT}"
        )
    try:
        # Checks the signature with the issuer's key; handles RSA (PKCS#1 v1.5), EC and EdDSA.
        cluster.verify_directly_issued_by(anchor)
    except InvalidSignature:
        raise IncorrectTrustAnchorException(
            "the cluster certificate names the trust anchor as issuer but its signature does not "
            f"verify with the trust anchor's public key; {_HINT}"
        ) from None
    except (ValueError, TypeError) as exc:
        # ValueError: issuer mismatch or unsupported signature algorithm; TypeError: key type.
        raise IncorrectTrustAnchorException(
            f"the cluster certificate cannot be verified with the trust anchor ({exc}); {_HINT}"
        ) from None


def same_cluster_identity(cert_a_pem: str, cert_b_pem: str) -> bool:
    """True when two ClusterCertificate values are the same certificate.

    Compared as DER so that line endings or trailing whitespace in stored PEM do not matter; an
    unparseable value is never related to anything.
    """
    try:
        a = x509.load_pem_x509_certificate(cert_a_pem.encode("utf-8"))
        b = x509.load_pem_x509_certificate(cert_b_pem.encode("utf-8"))
    except ValueError:
        return False
    der = serialization.Encoding.DER
    return a.public_bytes(der) == b.public_bytes(der)
