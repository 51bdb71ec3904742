"""The python-pkcs11 implementation of `HsmConnector` and `HsmBackend`.

Owns: token login per cluster (`Pkcs11Connector`), key generation with the template of
`hsmbridge.backend.templates`, label -> key lookup with a per-session handle cache, AES-GCM per
the profile's IV policy, random bytes, and retrying transient HSM errors. Sessions, locking and
recovery belong to `hsmbridge.backend.sessions`; error translation to
`hsmbridge.backend.pkcs11_errors`. No `pkcs11` type leaves this module.

Must not import anything in hsmbridge above `hsmbridge.backend`, `hsmbridge.config` and
`hsmbridge.nowait`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from hsmbridge import nowait
from hsmbridge.backend.errors import (
    BackendError,
    BadCiphertextError,
    DeadlineExceededError,
    DeviceLostError,
    DuplicateLabelError,
    HsmInternalError,
    HsmUnreachableError,
    KeyMissingError,
    NonCompliantKeyError,
    TransientHsmError,
)
from hsmbridge.backend.interface import HsmHealth, HsmKeyInfo, Sealed
from hsmbridge.backend.password_change import change_password
from hsmbridge.backend.sessions import SessionPool, Worker, acquire_pool
from hsmbridge.backend.templates import BASE_TEMPLATE, READ_BACK, key_template, violations
from hsmbridge.config import ClusterBinding, IvPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

GCM_IV_BYTES = 12
GCM_TAG_BITS = 128
_RETRY_ATTEMPTS = 3
_FIRST_BACKOFF_S = 0.005
_STALE_VIEW_REFRESHES = 2
_SECRET_KEYS = {Attribute.CLASS: ObjectClass.SECRET_KEY}
_READ_ATTRS = [Attribute[name] for name in READ_BACK.values()]


@dataclass(frozen=True)
class BackendStats:
    """Counters for /metrics: sessions of this backend's token, and label-cache effectiveness."""

    sessions_open: int
    handle_cache_hits: int
    handle_cache_misses: int
    retries: int


class Pkcs11Connector:
    """Logs in to the token bound to a cluster; one login per token per process is shared."""

    def __init__(self, clusters: Mapping[str, ClusterBinding]) -> None:
        self._clusters = dict(clusters)

    def connect(self, cluster_id: str, password: str) -> Pkcs11Backend:
        """Raises LoginError (with a reason), HsmUnreachableError or MisconfiguredError."""
        binding = self._clusters.get(cluster_id)
        if binding is None:
            raise HsmUnreachableError(f"no HSM is configured for cluster {cluster_id!r}")
        pool = acquire_pool(binding.profile, binding.profile.login_pin(password))
        return Pkcs11Backend(binding, pool)

    def change_password(self, cluster_id: str, old: str, new: str) -> None:
        binding = self._clusters.get(cluster_id)
        if binding is None:
            raise HsmUnreachableError(f"no HSM is configured for cluster {cluster_id!r}")
        change_password(binding, old, new)


class Pkcs11Backend:
    """A logged-in connection to one token. Thread-safe; see sessions.py for the lock design."""

    def __init__(self, binding: ClusterBinding, pool: SessionPool) -> None:
        self.cluster_id = binding.cluster_id
        self._profile = binding.profile
        self._pool = pool
        self._create_lock = threading.Lock()  # makes check-then-create atomic in this process
        self._stats_lock = threading.Lock()
        self._hits = self._misses = self._retries = 0
        self._closed = False

    # --- plumbing -------------------------------------------------------------------------------

    def _run(self, op: Callable[[Worker], T], *, during_decrypt: bool = False) -> T:
        """Run `op` in a worker session; transient failures retried after the pool recovered."""
        # Fast path: building a tenacity Retrying per call cost ~15% of an in-process Encrypt
        # (benchmark profile), so the retry machinery starts only once a call has failed.
        try:
            return self._once(op, during_decrypt)
        except (TransientHsmError, DeviceLostError):
            self._count("_retries")
        time.sleep(_FIRST_BACKOFF_S)
        return self._retry(op, during_decrypt)

    def _run_finding(self, op: Callable[[Worker], T], *, during_decrypt: bool = False) -> T:
        """`_run` for an op that looks a key up by label. Where the profile says this process's
        view of other processes' objects can be stale (SoftHSM2), a key not found is looked for
        again in a view re-read since the last look began, up to _STALE_VIEW_REFRESHES times:
        the service only asks for keys it knows exist, so "missing" may just mean another
        process made it. Once, under load beside a SIGKILLed instance, the first re-read view
        still lacked a key made seconds before; the second re-read comes REFRESH_INTERVAL_S
        later, only while the request's deadline allows it."""
        for refresh in range(_STALE_VIEW_REFRESHES + 1):
            began = time.monotonic()
            try:
                return self._run(op, during_decrypt=during_decrypt)
            except KeyMissingError as missing:
                if not self._profile.stale_cross_process_view or refresh == _STALE_VIEW_REFRESHES:
                    raise
                try:
                    self._pool.library.refresh_after(began)
                except DeadlineExceededError:
                    if refresh == 0:
                        raise
                    raise missing from None  # it was looked for in one re-read view already
        raise AssertionError("unreachable: the last look re-raises")

    def _refreshed_if_none(self, began: float, op: Callable[[Worker], T], found: T) -> T:
        """`found` (an empty result of `op` run since `began`), or `op` again in a re-read view
        where the profile says the view can be stale: a destroy or search that finds nothing
        must not miss a key another process made."""
        if found or not self._profile.stale_cross_process_view:
            return found
        self._pool.library.refresh_after(began)
        return self._run(op)

    def _once(self, op: Callable[[Worker], T], during_decrypt: bool) -> T:
        if self._closed:
            raise HsmUnreachableError("this HSM connection is closed")
        with self._pool.session(during_decrypt=during_decrypt) as worker:
            return op(worker)

    def _retry(self, op: Callable[[Worker], T], during_decrypt: bool) -> T:
        """Attempts 2.. of `_stop_retrying`'s budget; the fast path's failure was attempt 1."""
        retrying = Retrying(
            stop=_stop_retrying,
            wait=wait_exponential(multiplier=0.005, min=0.005, max=0.05),
            retry=retry_if_exception_type((TransientHsmError, DeviceLostError)),
            before_sleep=lambda _state: self._count("_retries"),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                if self._closed:
                    raise HsmUnreachableError("this HSM connection is closed")
                with self._pool.session(during_decrypt=during_decrypt) as worker:
                    return op(worker)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _count(self, name: str) -> None:
        with self._stats_lock:
            setattr(self, name, getattr(self, name) + 1)

    def _key(self, worker: Worker, label: str) -> Any:
        key = worker.keys.get(label)
        if key is not None:
            self._count("_hits")
            return key
        self._count("_misses")
        # A lookup by label scans the whole token on SoftHSM2 (~280 ms at 20,000 keys).
        nowait.refuse("looking a key up by label")
        if not worker.warmed:
            worker.warmed = True
            self._warm(worker)
            key = worker.keys.get(label)
            if key is not None:
                return key
        # get_key drains its search (no OperationActive left behind); NoSuchKey -> KeyMissingError,
        # MultipleObjectsReturned -> DuplicateLabelError via the error table.
        key = worker.raw.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        worker.keys[label] = key
        return key

    @staticmethod
    def _warm(worker: Worker) -> None:
        """Cache every key of the token in one enumeration, at this session's first miss.

        A lookup by label is a linear scan on SoftHSM2 (~14 us per object) and holds the
        library lock: after a restart at 20,000 keys each key's first use cost ~310 ms, so a
        server under traffic crawled until every key was warm. One enumeration costs about as
        much as eight such lookups. Labels carried by several objects stay uncached, so their
        lookup still reports DuplicateLabelError; keys made later are found by label as before.
        """
        by_label: dict[str, list[Any]] = {}
        for obj in worker.raw.get_objects(_SECRET_KEYS):  # drained here: no OperationActive
            by_label.setdefault(obj.label, []).append(obj)
        for label, objs in by_label.items():
            if label and len(objs) == 1:
                worker.keys.setdefault(label, objs[0])

    # --- keys -----------------------------------------------------------------------------------

    def generate_key(self, label: str, key_id: bytes, *, fresh_label: bool = False) -> HsmKeyInfo:
        """Create the persistent, non-extractable AES-256 key; verify its attributes or destroy it.

        Raises DuplicateLabelError if a key with this label already exists, NonCompliantKeyError
        (after destroying the new object) if it reads back wrong, MisconfiguredError if the token
        rejects the template. With `fresh_label` the first attempt skips the label search (a
        linear scan on SoftHSM2: ~280 ms at 20,000 keys); a retry always searches, since the
        failed attempt may have created the key.
        """
        template = _p11_template(key_template(label, key_id, self._profile.template_omit))
        tried = False

        def op(worker: Worker) -> HsmKeyInfo:
            nonlocal tried
            first, tried = not tried, True
            if not (fresh_label and first):
                found = list(worker.raw.get_objects({**_SECRET_KEYS, Attribute.LABEL: label}))
                # On a retry, a single key with our label is the one our failed attempt created.
                if len(found) > 1 or (found and first):
                    raise DuplicateLabelError(f"a key labelled {label!r} already exists")
                if found:
                    return self._verify_new(worker, found[0], label)
            key = worker.raw.generate_key(
                KeyType.AES, 256, label=label, id=key_id, store=True, template=template
            )
            return self._verify_new(worker, key, label)

        with self._create_lock:
            return self._run(op)

    def _verify_new(self, worker: Worker, key: Any, label: str) -> HsmKeyInfo:
        info = _read_info(key)
        problems = violations(info)
        if problems:
            key.destroy()
            raise NonCompliantKeyError(f"new key {label!r} was destroyed: {'; '.join(problems)}")
        worker.keys[label] = key
        return info

    def find_keys(self, label: str) -> list[HsmKeyInfo]:
        """Every secret key carrying exactly this label (normally zero or one)."""

        def op(worker: Worker) -> list[HsmKeyInfo]:
            found = list(worker.raw.get_objects({**_SECRET_KEYS, Attribute.LABEL: label}))
            return [_read_info(obj) for obj in found]

        began = time.monotonic()
        return self._refreshed_if_none(began, op, self._run(op))

    def list_keys(self) -> Iterator[HsmKeyInfo]:
        """Every secret-key object the user can see, read in one session and one scan."""

        def op(worker: Worker) -> list[HsmKeyInfo]:
            found = list(worker.raw.get_objects(_SECRET_KEYS))
            return [_read_info(obj) for obj in found]

        return iter(self._run(op))

    def destroy_key(self, label: str, handle: int | None = None) -> int:
        """Destroy the key(s) with this label (and, if given, this handle); return how many went."""

        def op(worker: Worker) -> int:
            found = list(worker.raw.get_objects({**_SECRET_KEYS, Attribute.LABEL: label}))
            doomed = [obj for obj in found if handle is None or obj.handle == handle]
            for obj in doomed:
                obj.destroy()
            return len(doomed)

        began = time.monotonic()
        try:
            return self._refreshed_if_none(began, op, self._run(op))
        finally:
            self._pool.forget(label)  # every session's cached handle for it is now dead

    def destroy_incomplete_keys(self) -> int:
        """SoftHSM2 writes a new object's file with default attributes first and applies the
        template and the value in later writes; a process killed in between leaves a secret key
        with an empty label, an empty CKA_ID and a zero-length value. hsmbridge never creates such
        an object and it holds no key material, so exactly that shape is destroyed."""
        if not self._profile.incomplete_key_objects:
            return 0
        if self._profile.stale_cross_process_view:
            # The object is another process's (a killed worker or instance): on SoftHSM2 this
            # process's own writes can hide it from its view, so look in a re-read one. Seen
            # once: an instance SIGKILLed mid-generation left one that the survivor rolling back
            # its intents did not see, and the audit found it afterwards.
            self._pool.library.refresh_after(time.monotonic())
        doomed = [
            info
            for info in self.list_keys()
            if not info.label and not info.key_id and info.value_len == 0
        ]
        for info in doomed:
            self.destroy_key("", handle=info.handle)
            log.warning("destroyed a half-created HSM key object (handle %d)", info.handle)
        return len(doomed)

    # --- crypto ---------------------------------------------------------------------------------

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> Sealed:
        """AES-GCM with a 128-bit tag; the IV comes from the profile's IV policy."""
        hsm_iv = self._profile.iv_policy is IvPolicy.HSM_ZERO_BUFFER

        def op(worker: Worker) -> Sealed:
            key = self._key(worker, label)
            if hsm_iv:
                # CloudHSM writes its own IV into pIv, which must be zeroed; python-pkcs11 passes
                # this buffer itself as pIv, so a fresh mutable one per
                # call. `cast`: GCMParams is typed `bytes` but accepts any buffer.
                buf = bytearray(GCM_IV_BYTES)
                out = key.encrypt(
                    plaintext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(cast(bytes, buf), aad, GCM_TAG_BITS),
                )
                return Sealed(iv=bytes(buf), ciphertext=bytes(out))
            iv = os.urandom(GCM_IV_BYTES)
            out = key.encrypt(
                plaintext,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(iv, aad, GCM_TAG_BITS),
            )
            return Sealed(iv=iv, ciphertext=bytes(out))

        return self._run_finding(op)

    def decrypt(self, label: str, sealed: Sealed, aad: bytes) -> bytes:
        """Raises BadCiphertextError when the tag does not verify, KeyMissingError without key."""
        if len(sealed.iv) != GCM_IV_BYTES or len(sealed.ciphertext) < GCM_TAG_BITS // 8:
            raise BadCiphertextError("ciphertext or IV has the wrong length for AES-GCM")

        def op(worker: Worker) -> bytes:
            key = self._key(worker, label)
            params = GCMParams(bytes(sealed.iv), aad, GCM_TAG_BITS)
            out = key.decrypt(
                sealed.ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return bytes(out)

        return self._run_finding(op, during_decrypt=True)

    def random(self, n_bytes: int) -> bytes:
        if n_bytes < 0:
            raise HsmInternalError(f"cannot draw {n_bytes} random bytes")
        if n_bytes == 0:
            return b""  # generate_random(0) is a ValueError in python-pkcs11 (§2.6)
        return self._run(lambda worker: bytes(worker.raw.generate_random(n_bytes * 8)))

    # --- health and lifecycle -------------------------------------------------------------------

    def ping(self) -> HsmHealth:
        """A real, cheap HSM round trip (16 random bytes); never raises."""
        start = time.perf_counter()
        try:
            # Random draws work without a token on SoftHSM (its RNG is not token-backed), so the
            # round trip also asks for the token: a missing one fails the check.
            self._run(self._draw_and_check_token)
        except Exception as exc:  # ping reports every failure instead of raising
            detail = str(exc) if isinstance(exc, BackendError) else type(exc).__name__
            return HsmHealth(False, _ms_since(start), f"{type(exc).__name__}: {detail}")
        return HsmHealth(True, _ms_since(start), f"{self._profile.name} token answered")

    def _draw_and_check_token(self, worker: Worker) -> None:
        worker.raw.generate_random(128)
        if not self._pool.token_present():
            raise DeviceLostError("the token is not present")

    def close(self) -> None:
        """Log out (login session closed last, once no other backend uses it). Idempotent."""
        with self._create_lock:
            if self._closed:
                return
            self._closed = True
        self._pool.release()

    @property
    def stats(self) -> BackendStats:
        with self._stats_lock:
            return BackendStats(self._pool.sessions_open, self._hits, self._misses, self._retries)


def _stop_retrying(state: RetryCallState) -> bool:
    """Stop after _RETRY_ATTEMPTS in all (the fast path's failed call was the first), but never
    right after a re-initialisation: the third DeviceError in a row is what triggers it, and the
    freshly initialised library deserves one attempt before the caller is told the HSM is
    unavailable."""
    attempt = state.attempt_number + 1  # tenacity numbers from the first *retry*
    if attempt > _RETRY_ATTEMPTS:
        return True
    if attempt < _RETRY_ATTEMPTS:
        return False
    outcome = state.outcome
    return outcome is None or not isinstance(outcome.exception(), DeviceLostError)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _p11_template(template: Mapping[str, object]) -> dict[Any, Any]:
    """Names -> `pkcs11.Attribute`; attributes dropped by the profile become `pkcs11.DEFAULT`,
    which removes them from python-pkcs11's own default template too."""
    out: dict[Any, Any] = {Attribute[name]: pkcs11.DEFAULT for name in BASE_TEMPLATE}
    for name, value in template.items():
        if name == "CLASS":
            out[Attribute.CLASS] = ObjectClass[str(value)]
        elif name == "KEY_TYPE":
            out[Attribute.KEY_TYPE] = KeyType[str(value)]
        else:
            out[Attribute[name]] = value
    return out


def _read_info(obj: Any) -> HsmKeyInfo:
    """Read every attribute the invariants need, in one call when the token allows it."""
    try:
        values = obj.get_attributes(_READ_ATTRS)
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
        values = {}
        for attr in _READ_ATTRS:  # the token rejected the batch: find out which one, one by one
            try:
                values[attr] = obj[attr]
            except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
                values[attr] = None
    fields: dict[str, Any] = {}
    for field_name, attr_name in READ_BACK.items():
        value = values.get(Attribute[attr_name])
        if isinstance(value, KeyType):
            value = value.name
        fields[field_name] = value
    fields["label"] = fields["label"] or ""
    fields["key_id"] = bytes(fields["key_id"] or b"")
    return HsmKeyInfo(handle=int(obj.handle), **fields)
