"""Trust-anchor parsing and cluster-certificate verification."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from hsmbridge.errors import IncorrectTrustAnchorException
from hsmbridge.keystore.demo import make_demo_pki
from hsmbridge.keystore.trust import (
    load_trust_anchor,
    same_cluster_identity,
    verify_cluster_certificate,
)

CID = "cluster-abcdefghijk"
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, public_key, signing_key, *, ca, not_before=None, not_after=None):
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    cert = builder.sign(signing_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _ca(subject="Test CA", key=None, **kwargs):
    key = key or ec.generate_private_key(ec.SECP256R1())
    return _cert(subject, subject, key.public_key(), key, ca=True, **kwargs), key


def _leaf(issuer, issuer_key, subject=CID):
    key = ec.generate_private_key(ec.SECP256R1())
    return _cert(subject, issuer, key.public_key(), issuer_key, ca=False)


@pytest.fixture(scope="module")
def pki():
    return make_demo_pki(CID)


def test_demo_chain_verifies(pki):
    anchor = load_trust_anchor(pki.ca_cert_pem)
    assert anchor.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    verify_cluster_certificate(pki.ca_cert_pem, pki.cluster_cert_pem)


def test_rsa_chain_verifies():
    ca_pem, ca_key = _ca(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    verify_cluster_certificate(ca_pem, _leaf("Test CA", ca_key))


def test_wrong_ca_is_rejected_naming_both_issuers(pki):
    other_ca, _ = _ca("Some Other CA")
    with pytest.raises(IncorrectTrustAnchorException) as info:
        verify_cluster_certificate(other_ca, pki.cluster_cert_pem)
    assert "hsmbridge demo customer CA" in info.value.message
    assert "Some Other CA" in info.value.message


def test_same_name_but_different_key_fails_signature(pki):
    # Two demo PKIs share the CA name, so only the signature check can tell them apart.
    other = make_demo_pki(CID)
    with pytest.raises(IncorrectTrustAnchorException, match="signature does not verify"):
        verify_cluster_certificate(other.ca_cert_pem, pki.cluster_cert_pem)


def test_non_ca_certificate_is_rejected():
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("Not A CA", "Not A CA", key.public_key(), key, ca=False)
    with pytest.raises(IncorrectTrustAnchorException, match="not a CA certificate"):
        load_trust_anchor(leaf)


def test_certificate_without_basic_constraints_is_rejected():
    key = ec.generate_private_key(ec.SECP256R1())
    bare = _cert("Bare", "Bare", key.public_key(), key, ca=None)
    with pytest.raises(IncorrectTrustAnchorException, match="CA:TRUE is required"):
        load_trust_anchor(bare)


@pytest.mark.parametrize("garbage", ["", "hello", "-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_garbage_pem_is_rejected(garbage):
    with pytest.raises(IncorrectTrustAnchorException, match="not a valid PEM"):
        load_trust_anchor(garbage)


def test_two_certificates_are_rejected(pki):
    with pytest.raises(IncorrectTrustAnchorException, match="exactly one PEM certificate, found 2"):
        load_trust_anchor(pki.ca_cert_pem + pki.cluster_cert_pem)


def test_expired_ca_is_rejected():
    expired, key = _ca(not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    with pytest.raises(IncorrectTrustAnchorException, match="expired on"):
        load_trust_anchor(expired)
    # and therefore a chain under it is rejected too
    with pytest.raises(IncorrectTrustAnchorException, match="expired on"):
        verify_cluster_certificate(expired, _leaf("Test CA", key))


def test_not_yet_valid_ca_is_rejected():
    future, _ = _ca(not_before=NOW + DAY, not_after=NOW + 30 * DAY)
    with pytest.raises(IncorrectTrustAnchorException, match="not valid until"):
        load_trust_anchor(future)


def test_garbage_cluster_certificate_is_rejected(pki):
    with pytest.raises(IncorrectTrustAnchorException, match="cluster certificate"):
        verify_cluster_certificate(pki.ca_cert_pem, "not a certificate")


def test_message_is_actionable(pki):
    with pytest.raises(IncorrectTrustAnchorException) as info:
        load_trust_anchor("nonsense")
    assert info.value.code == "IncorrectTrustAnchorException"
    assert "customerCA.crt" in info.value.message


def test_same_cluster_identity(pki):
    other = make_demo_pki(CID)
    assert same_cluster_identity(pki.cluster_cert_pem, pki.cluster_cert_pem)
    # stored copies may differ in line endings and trailing whitespace
    crlf = pki.cluster_cert_pem.replace("\n", "\r\n") + "\n\n"
    assert same_cluster_identity(pki.cluster_cert_pem, crlf)
    assert not same_cluster_identity(pki.cluster_cert_pem, other.cluster_cert_pem)
    assert not same_cluster_identity("garbage", "garbage")
