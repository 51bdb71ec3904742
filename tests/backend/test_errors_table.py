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


def test_every_python_pkcs11_class_translates_to_a_backend_error() -> None:
    classes = [c for c in vars(p11e).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) > 60
    for cls in classes:
        for during_decrypt in (False, True):
            err = translate(cls(), during_decrypt=during_decrypt, profile=SOFTHSM)
            assert isinstance(err, be.BackendError), cls
