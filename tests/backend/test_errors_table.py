"""The python-pkcs11 exception -> backend error table (pure: no token is touched)."""

from __future__ import annotations

import pytest
from pkcs11 import exceptions as p11e

from hsmbridge.backend import errors as be
from hsmbridge.backend.pkcs11_errors import (
    DEVICE_ERROR_STREAK_LIMIT,
    HsmBusyError,
    LoginLostError,
    SessionLostError,
    StaleHandleError,
    evicts_session,
    is_retryable,
    needs_relogin,
    translate,
)
from hsmbridge.config import builtin_profile, load_profile
from hsmbridge.model import ConnectionErrorCode

SOFTHSM = load_profile(builtin_profile("softhsm2"))
CLOUDHSM = load_profile(builtin_profile("cloudhsm"))


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (p11e.PinIncorrect, ConnectionErrorCode.INVALID_CREDENTIALS),
        (p11e.PinLocked, ConnectionErrorCode.USER_LOCKED_OUT),
        (p11e.UserAlreadyLoggedIn, ConnectionErrorCode.USER_LOGGED_IN),
        (p11e.AnotherUserAlreadyLoggedIn, ConnectionErrorCode.USER_LOGGED_IN),
        (p11e.UserPinNotInitialized, ConnectionErrorCode.USER_NOT_FOUND),
    ],
)
def test_login_failures(exc: type[Exception], reason: be.ConnectionErrorCode) -> None:
    err = translate(exc(), during_decrypt=False, profile=SOFTHSM)
    assert isinstance(err, be.LoginError)
    assert err.reason is reason
    assert not is_retryable(err)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (p11e.FunctionFailed, HsmBusyError),
        (p11e.OperationActive, HsmBusyError),
        (p11e.DeviceError, HsmBusyError),
        (p11e.SessionHandleInvalid, SessionLostError),
        (p11e.SessionClosed, SessionLostError),
        (p11e.ObjectHandleInvalid, StaleHandleError),
        (p11e.KeyHandleInvalid, StaleHandleError),
        (p11e.UserNotLoggedIn, LoginLostError),
    ],
)
def test_transient(exc: type[Exception], kind: type[be.TransientHsmError]) -> None:
    err = translate(exc(), during_decrypt=False, profile=CLOUDHSM)
    assert type(err) is kind
    assert isinstance(err, be.TransientHsmError)
    assert is_retryable(err)
    assert needs_relogin(err) == (kind is LoginLostError)
    assert evicts_session(err) == (kind is not StaleHandleError)


@pytest.mark.parametrize("exc", [p11e.DeviceRemoved, p11e.TokenNotPresent, p11e.TokenNotRecognised])
def test_device_lost(exc: type[Exception]) -> None:
    assert type(translate(exc(), during_decrypt=False, profile=SOFTHSM)) is be.DeviceLostError


def test_cryptoki_not_initialized_has_no_class_but_is_device_lost() -> None:
    exc = p11e.PKCS11Error("Initialisation error (not initialized). Should never see this.")
    assert type(translate(exc, during_decrypt=False, profile=SOFTHSM)) is be.DeviceLostError


def test_repeated_device_error_is_device_lost() -> None:
    streak = DEVICE_ERROR_STREAK_LIMIT
    err = translate(p11e.DeviceError(), during_decrypt=False, profile=CLOUDHSM,
                    device_error_streak=streak)  # fmt: skip
    assert type(err) is be.DeviceLostError
    below = translate(p11e.DeviceError(), during_decrypt=False, profile=CLOUDHSM,
                      device_error_streak=streak - 1)  # fmt: skip
    assert type(below) is HsmBusyError


def test_general_error_is_bad_ciphertext_only_during_decrypt_on_softhsm() -> None:
    exc = p11e.GeneralError()
    assert type(translate(exc, during_decrypt=True, profile=SOFTHSM)) is be.BadCiphertextError
    assert type(translate(exc, during_decrypt=False, profile=SOFTHSM)) is be.HsmInternalError
    # CloudHSM does not list the quirk: there a GeneralError is never "bad ciphertext".
    assert type(translate(exc, during_decrypt=True, profile=CLOUDHSM)) is be.HsmInternalError


@pytest.mark.parametrize("exc", [p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange])
def test_encrypted_data_invalid(exc: type[Exception]) -> None:
    err = translate(exc(), during_decrypt=True, profile=CLOUDHSM)
    assert type(err) is be.BadCiphertextError
    assert not is_retryable(err)
    assert type(translate(exc(), during_decrypt=False, profile=CLOUDHSM)) is be.HsmInternalError


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (p11e.NoSuchKey, be.KeyMissingError),
        (p11e.MultipleObjectsReturned, be.DuplicateLabelError),
        (p11e.NoSuchToken, be.HsmUnreachableError),
        (p11e.TemplateInconsistent, be.MisconfiguredError),
        (p11e.AttributeTypeInvalid, be.MisconfiguredError),
        (p11e.MechanismInvalid, be.MisconfiguredError),
        (p11e.ArgumentsBad, be.HsmInternalError),
        (p11e.MechanismParamInvalid, be.HsmInternalError),
        (p11e.SignatureInvalid, be.HsmInternalError),  # not in the table: falls back to internal
    ],
)
def test_other_classes(exc: type[Exception], kind: type[be.BackendError]) -> None:
    err = translate(exc(), during_decrypt=False, profile=SOFTHSM)
    assert type(err) is kind
    assert not is_retryable(err)


def test_unmapped_code_is_internal_and_names_the_code() -> None:
    err = translate(p11e.PKCS11Error("Unmapped error code 0x1b"), during_decrypt=True,
                    profile=SOFTHSM)  # fmt: skip
    assert type(err) is be.HsmInternalError
    assert "0x1b" in str(err)
    assert "CKR_ACTION_PROHIBITED" in str(err)
    vendor = translate(p11e.PKCS11Error("Unmapped error code 0x80000123"), during_decrypt=False,
                       profile=SOFTHSM)  # fmt: skip
    assert type(vendor) is be.HsmInternalError
    assert "0x80000123" in str(vendor)


def test_non_pkcs11_exceptions_and_backend_errors() -> None:
    assert type(translate(ValueError("x"), during_decrypt=False, profile=SOFTHSM)) is (
        be.HsmInternalError
    )
    original = be.KeyMissingError("gone")
    assert translate(original, during_decrypt=True, profile=SOFTHSM) is original


# Retrying is right only where the HSM may answer differently next time (throttled, busy, session
# or login lost, a stale handle); retrying anything else turns one failure into several.
RETRYABLE = frozenset(
    {
        p11e.FunctionFailed, p11e.OperationActive, p11e.DeviceError, p11e.SessionCount,
        p11e.DeviceMemory, p11e.SessionHandleInvalid, p11e.SessionClosed,
        p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid, p11e.UserNotLoggedIn,
    }
)  # fmt: skip
# "The tag did not verify" is only ever said while decrypting, and only for these classes.
BAD_CIPHERTEXT_ON_SOFTHSM = frozenset(
    {p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange, p11e.GeneralError}
)
# Only the PIN and user classes say anything about the credentials.
LOGIN_FAILURES = frozenset(
    {
        p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinExpired, p11e.PinLocked,
        p11e.UserAlreadyLoggedIn, p11e.AnotherUserAlreadyLoggedIn, p11e.UserTooManyTypes,
        p11e.UserPinNotInitialized,
    }
)  # fmt: skip


def test_every_python_pkcs11_class_translates_deliberately() -> None:
    """Every class python-pkcs11 has, against rules written out here rather than read from the
    table: retried exactly when transient, bad ciphertext only while decrypting, a login failure
    only for the PIN/user classes, and a message that names the class."""
    classes = [
        c
        for c in vars(p11e).values()
        if isinstance(c, type) and issubclass(c, Exception) and c is not p11e.PKCS11Error
    ]  # the bare PKCS11Error carries a CKR code in its text: see the unmapped-code tests
    assert len(classes) > 60
    wrong = []
    for cls in classes:
        for during_decrypt in (False, True):
            err = translate(cls(), during_decrypt=during_decrypt, profile=SOFTHSM)
            bad_ciphertext = during_decrypt and cls in BAD_CIPHERTEXT_ON_SOFTHSM
            checks = {
                "retryable": is_retryable(err) == (cls in RETRYABLE and not bad_ciphertext),
                "bad ciphertext": isinstance(err, be.BadCiphertextError) == bad_ciphertext,
                "login": isinstance(err, be.LoginError) == (cls in LOGIN_FAILURES),
                "names the class": cls.__name__ in str(err),
            }
            wrong += [(cls.__name__, during_decrypt, rule) for rule, ok in checks.items() if not ok]
    assert wrong == []
