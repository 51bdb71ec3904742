"""PKCS#11 library registry and the per-token session pool: who may call the HSM, and when.

Owns: `Library` (one loaded module: its `pkcs11.lib`, call lock and generation) and `SessionPool`
(one login plus PIN-less worker sessions for one token). Must not import anything in hsmbridge
above `hsmbridge.backend.errors`, `hsmbridge.backend.pkcs11_errors`, `hsmbridge.config`,
`hsmbridge.deadline` and `hsmbridge.nowait`.

Concurrency design:
* python-pkcs11 calls `C_Initialize(NULL)`, so SoftHSM runs with its internal mutexes off, and it
  releases the GIL around every C call: two threads in SoftHSM at once crash it (SIGSEGV, heap
  corruption) even on separate sessions. When `profile.serialize_calls` is true every PKCS#11
  call of a library runs under that library's one `RLock`. We hold it for a whole
  `with pool.session()` block (a few calls) rather than per call: the block also drains
  find-generators and reads cached Key objects, and a block is microseconds long. Measured on 2
  vCPUs a global lock gives ~0.9-1.2x single-thread throughput for GCM/keygen/find, better than
  the p11-kit proxy's ~0.7x; threads never buy SoftHSM throughput, processes do.
* Whatever `serialize_calls` says, re-login and re-initialisation take the lock.
* A request's waits (for a free session, for the library lock) end at its deadline
  (`hsmbridge.deadline`) with DeadlineExceededError: behind a call stuck in the HSM, work whose
  client has given up is refused instead of run late. Re-login and housekeeping wait as before.
* A request run on the event loop (`hsmbridge.nowait`, only for profiles with `inline_calls`)
  waits for nothing: it takes the library lock only if it is free, uses only an idle session
  of the current login, and leaves every failure's recovery (probe, eviction, re-login,
  re-initialisation) to its rerun on a worker thread: each of those takes the lock.
* Lock order: library lock, then a pool's condition. Nothing takes the library lock while holding
  a pool's condition, and nobody waits for a free session while holding the library lock.
* Login is per process (§2.2): one long-lived login session per token, shared by every backend of
  that token in this process (refcounted), never closed before the last user leaves, because
  closing it logs every session out; a second PIN login raises UserAlreadyLoggedIn and leaks a
  session. Worker sessions are opened without a PIN and inherit the login.
* `lib.reinitialize()` (C_Finalize + C_Initialize) invalidates every session of the library, so
  it bumps `Library.generation`; each pool notices the change at its next `session()` and
  rebuilds itself (re-find token, re-login) lazily.
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from pkcs11 import TokenFlag

from hsmbridge import deadline, nowait
from hsmbridge.backend.errors import (
    BackendError,
    BadCiphertextError,
    DeadlineExceededError,
    DeviceLostError,
    HsmInternalError,
    HsmUnreachableError,
    KeyMissingError,
    LoginError,
    MisconfiguredError,
)
from hsmbridge.backend.pkcs11_errors import (
    LoginLostError,
    StaleHandleError,
    evicts_session,
    translate,
)
from hsmbridge.config import HsmProfile
from hsmbridge.model import ConnectionErrorCode

log = logging.getLogger(__name__)

# While a token is missing, re-initialise the library at most this often to look for it again.
REINIT_INTERVAL_S = 1.0
# Re-initialisations to refresh a stale view of other processes' objects: at most one this often.
REFRESH_INTERVAL_S = 1.0
# A token not seen (maybe another process is rewriting its information) is looked for again,
# with pauses doubling from the first to the last, for this long before it counts as unreachable;
# the library is re-initialised (at most this often) once it stayed out of sight this long.
TOKEN_LOOKUP_S = 2.0
TOKEN_LOOKUP_REINIT_AFTER_S = 0.2
TOKEN_LOOKUP_FIRST_PAUSE_S = 0.002
TOKEN_LOOKUP_MAX_PAUSE_S = 0.05


class Library:
    """One loaded PKCS#11 module (python-pkcs11 memoises `pkcs11.lib` per path anyway)."""

    def __init__(self, path: str, raw: Any) -> None:
        self.path = path
        self.raw: Any = raw
        self.lock = threading.RLock()
        self.generation = 0
        self.device_error_streak = 0
        self.last_reinitialized = float("-inf")  # time.monotonic() of the last attempt
        self.pools: dict[str, SessionPool] = {}  # by `_pool_key`; guarded by `lock`

    def guard(self, serialize: bool) -> threading.RLock | nullcontext[None]:
        return self.lock if serialize else nullcontext()

    def reinitialize(self, seen_generation: int) -> None:
        """C_Finalize + C_Initialize, once per failure however many threads saw it."""
        with self.lock:
            if self.generation != seen_generation:
                return  # another thread already did it
            self.generation += 1
            self.device_error_streak = 0
            self.last_reinitialized = time.monotonic()
            try:
                self.raw.reinitialize()
            except Exception as exc:
                log.warning("re-initialising %s failed: %s", self.path, type(exc).__name__)
                raise DeviceLostError(f"cannot re-initialise PKCS#11 module {self.path}") from exc
            log.warning(
                "re-initialised PKCS#11 module %s (generation %d)", self.path, self.generation
            )

    def refresh_after(self, missed_at: float) -> None:
        """Make this process's view of the tokens at least as new as `missed_at` (monotonic):
        re-initialise, unless a re-initialisation started since then (its view already holds
        whatever existed at `missed_at`), so threads that missed together share one. At most one
        every REFRESH_INTERVAL_S: a key that is really gone (and requests for it) must not turn
        into a stream of C_Finalize calls; a later miss waits for the interval, within its
        request's deadline, rather than go without a fresh view."""
        while True:
            with self.lock:
                if self.last_reinitialized >= missed_at:
                    return
                wait = self.last_reinitialized + REFRESH_INTERVAL_S - time.monotonic()
                if wait <= 0:
                    self.reinitialize(self.generation)
                    return
            left = deadline.remaining()
            if left is not None and left <= wait:
                raise DeadlineExceededError("the request's deadline passed before a token refresh")
            time.sleep(wait)  # outside the lock: other calls go on meanwhile

    def reinitialize_at_most_every(self, interval_s: float) -> None:
        """Re-initialise again unless that was tried within `interval_s` (see REINIT_INTERVAL_S)."""
        with self.lock:
            if time.monotonic() - self.last_reinitialized >= interval_s:
                self.reinitialize(self.generation)


_LIBRARIES: dict[str, Library] = {}
_LIBRARIES_LOCK = threading.Lock()


def _failed_search_echo(exc: BaseException | None, tb: Any) -> bool:
    """Is this python-pkcs11 finalising a search whose C_FindObjectsInit failed?"""
    if not isinstance(exc, pkcs11.exceptions.OperationNotInitialized):
        return False
    frames = traceback.extract_tb(tb) if tb is not None else []
    return any("SearchIter._finalize" in frame.name for frame in frames)


def _quiet_failed_search_finalizer() -> None:
    """Keep python-pkcs11's cleanup of a failed search out of stderr.

    When C_FindObjectsInit fails (CloudHSM answers CKR_FUNCTION_FAILED when it throttles), the
    search object python-pkcs11 made stays marked active, and when it is collected its finaliser
    calls C_FindObjectsFinal on a search that never started: CKR_OPERATION_NOT_INITIALIZED,
    printed twice as a traceback on stderr (Cython prints it through sys.excepthook, then reports
    it to sys.unraisablehook). The failure itself was raised and handled where it happened; only
    this echo of it is dropped, at debug level. Anything else goes to the hooks installed before.
    """
    previous_unraisable = sys.unraisablehook
    previous_except = sys.excepthook

    def unraisable_hook(unraisable: Any) -> None:
        if _failed_search_echo(unraisable.exc_value, unraisable.exc_traceback):
            log.debug("ignored the finaliser of a failed PKCS#11 search")
            return
        previous_unraisable(unraisable)

    def except_hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if _failed_search_echo(value, tb):
            return
        previous_except(kind, value, tb)

    sys.unraisablehook = unraisable_hook
    sys.excepthook = except_hook


def load_library(path: str) -> Library:
    """The process-wide `Library` for a module path; HsmUnreachableError if it will not load."""
    with _LIBRARIES_LOCK:
        library = _LIBRARIES.get(path)
        if library is not None:
            return library
        if not _LIBRARIES:
            _quiet_failed_search_finalizer()
        if not os.path.isfile(path):
            raise HsmUnreachableError(
                f"PKCS#11 module {path} does not exist; install the HSM client or fix module_path"
            )
        try:
            raw = pkcs11.lib(path)
        except Exception as exc:  # dlopen failure surfaces as RuntimeError/OSError/PKCS11Error
            raise HsmUnreachableError(
                f"cannot load PKCS#11 module {path} ({type(exc).__name__}: {exc})"
            ) from exc
        library = _LIBRARIES[path] = Library(path, raw)
        return library


@dataclass(eq=False)
class Worker:
    """One PIN-less RW session handed out by `SessionPool.session()`, with its own key cache.

    `raw` is a `pkcs11.Session`; `keys` maps label -> `pkcs11.SecretKey` found via this session
    (Key objects are bound to the session that found them, §2.4).
    """

    raw: Any
    epoch: int
    keys: dict[str, Any] = field(default_factory=dict)
    warmed: bool = False  # `keys` was filled from one enumeration of the token


class _TokenNotSeenError(Exception):
    """One look at the slots did not find the token. `torn`: a read came back torn, after which
    this process's view of the token stays unreadable until the library is re-initialised."""

    def __init__(self, message: str, *, torn: bool) -> None:
        super().__init__(message)
        self.torn = torn


def _find_token(library: Library, token_label: str | None) -> Any:
    """The configured token. One not seen is looked for again for up to TOKEN_LOOKUP_S (never
    past the request's deadline), re-initialising the library when that goes on.

    SoftHSM2 rereads a token's own file (label, flags, serial) at C_GetTokenInfo, and a process
    that logs in or out rewrites that file. Measured with another process logging in and out in a
    loop: about half the reads of the token information fail with CKR_GENERAL_ERROR, and some
    come back torn (a blank label; on a busy machine also one that matches nothing). After a torn
    read every later read in that process fails, long after the logins stopped, until
    C_Finalize + C_Initialize. All of that is a busy token, not a lost one: taking it for lost
    failed logins and requests at once, and re-initialised and logged in again without a pause,
    which rewrote the file under the other processes in turn. A token really gone is reported
    TOKEN_LOOKUP_S later than before; losing a token is rare, and its requests are retried anyway.
    """
    began = time.monotonic()
    give_up = began + TOKEN_LOOKUP_S
    left = deadline.remaining()
    if left is not None:
        give_up = min(give_up, began + left)
    pause = TOKEN_LOOKUP_FIRST_PAUSE_S
    while True:
        try:
            return _find_token_once(library, token_label)
        except _TokenNotSeenError as exc:
            now = time.monotonic()
            if now + pause > give_up:
                raise HsmUnreachableError(str(exc)) from None
            if exc.torn or now - began >= TOKEN_LOOKUP_REINIT_AFTER_S:
                library.reinitialize_at_most_every(TOKEN_LOOKUP_REINIT_AFTER_S)
        time.sleep(pause)
        pause = min(pause * 2, TOKEN_LOOKUP_MAX_PAUSE_S)


def _find_token_once(library: Library, token_label: str | None) -> Any:
    unreadable: list[str] = []
    matches: list[Any] = []
    torn = False
    try:
        for slot in library.raw.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except (pkcs11.TokenNotPresent, pkcs11.TokenNotRecognised):
                continue
            except pkcs11.PKCS11Error as exc:
                unreadable.append(type(exc).__name__)
                continue
            initialised = bool(token.flags & TokenFlag.TOKEN_INITIALIZED)
            if initialised and not token.label:
                torn = True  # no initialised token has a blank label: see `_find_token`
                continue
            # SoftHSM always shows one extra, uninitialised token (§1); never pick that one.
            if token_label is None and initialised:
                return token
            if token_label is not None and token.label == token_label:
                matches.append(token)
    except pkcs11.PKCS11Error as exc:
        raise HsmUnreachableError(
            f"cannot list tokens of {library.path} ({type(exc).__name__})"
        ) from exc
    if len(matches) > 1:
        raise MisconfiguredError(
            f"{len(matches)} tokens are labelled {token_label!r} in PKCS#11 module "
            f"{library.path}; give each token its own label"
        )
    if matches:
        return matches[0]
    where = f"labelled {token_label!r}" if token_label else "initialised"
    why = f" (token information unreadable: {', '.join(unreadable)})" if unreadable else ""
    raise _TokenNotSeenError(
        f"no {where} token in PKCS#11 module {library.path}{why}; check the slot/token "
        "configuration",
        torn=torn,
    )


def acquire_pool(profile: HsmProfile, pin: str) -> SessionPool:
    """The process's pool for the profile's token, logging in if nobody has yet.

    WARNING: `pin` is a secret; it is kept only inside the pool, for re-login, and never logged.
    """
    library = load_library(profile.module_path)
    with library.lock:
        token = _find_token(library, profile.token_label)
        key = _pool_key(profile, token)
        pool = library.pools.get(key)
        if pool is None:
            pool = SessionPool(library, profile, pin, key)
            pool.login(token)
            library.pools[key] = pool
        elif not hmac.compare_digest(pool.pin.encode(), pin.encode()):
            # A second C_Login cannot check the password without logging this token out for
            # everyone else in the process (§2.2), so we compare with the one that logged in.
            raise LoginError(
                ConnectionErrorCode.INVALID_CREDENTIALS,
                f"password does not match the logged-in session for token {token.label!r}",
            )
        pool.users += 1
        return pool


def _pool_key(profile: HsmProfile, token: Any) -> str:
    # By label when the profile names one: a token information read that came back torn (see
    # `_find_token`) may carry a wrong serial, and a second pool would log in a second time.
    if profile.token_label:
        return f"label:{profile.token_label}"
    return f"serial:{bytes(token.serial).hex()}"


class SessionPool:
    """One token's login session plus up to `profile.max_sessions` worker sessions."""

    def __init__(self, library: Library, profile: HsmProfile, pin: str, key: str) -> None:
        self.library = library
        self.key = key
        self.profile = profile
        self.pin = pin
        self.users = 0
        self.serial = b""
        self._login: Any = None
        self._generation = library.generation
        self._epoch = 0  # bumped on re-login/re-initialisation: older workers are discarded
        self._cond = threading.Condition()
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._opening = 0
        self._closed = False

    # --- login ----------------------------------------------------------------------------------

    def login(self, token: Any) -> None:
        """Open the one PIN session. Caller holds the library lock.

        Where the profile says other processes' changes can be misread (SoftHSM2), C_Login also
        reads the token's own file, which another process logging in may be rewriting: measured,
        it then fails with CKR_GENERAL_ERROR or CKR_USER_PIN_NOT_INITIALIZED (a user "not found"
        who is there), like the token information (`_find_token`). Those two are retried, after
        re-initialising, for up to TOKEN_LOOKUP_S; a wrong PIN never is (it would spend one of
        the attempts the HSM allows before it locks the user)."""
        self.serial = bytes(token.serial)
        give_up = time.monotonic() + TOKEN_LOOKUP_S
        while True:
            try:
                self._login = token.open(rw=True, user_pin=self.pin)
                break
            except (pkcs11.GeneralError, pkcs11.UserPinNotInitialized) as exc:
                if not self.profile.stale_cross_process_view or time.monotonic() >= give_up:
                    raise translate(exc, during_decrypt=False, profile=self.profile) from exc
            except Exception as exc:
                raise translate(exc, during_decrypt=False, profile=self.profile) from exc
            self.library.reinitialize_at_most_every(TOKEN_LOOKUP_REINIT_AFTER_S)
            time.sleep(TOKEN_LOOKUP_MAX_PAUSE_S)
            token = _find_token(self.library, self.profile.token_label)
        self._generation = self.library.generation

    def _relogin(self) -> None:
        """Replace a login that vanished. Caller holds the library lock."""
        old, self._login = self._login, None
        self._drop_workers()
        if old is not None:
            try:
                old.close()  # C_Logout fails when already logged out; the handle then leaks (rare)
            except Exception as exc:
                log.info("closing the lost login session failed: %s", type(exc).__name__)
        self.login(_find_token(self.library, self.profile.token_label))
        log.warning("re-logged in to token %s of %s", self.serial.hex(), self.library.path)

    def _rebuild_if_reinitialised(self) -> None:
        """After C_Finalize every handle is dead: forget them all (no close) and log in again."""
        if self._generation == self.library.generation:
            return
        with self.library.lock:
            if self._generation == self.library.generation:
                return
            self._login = None
            self._drop_workers(close=False)
            try:
                token = _find_token(self.library, self.profile.token_label)
            except HsmUnreachableError:
                # SoftHSM reads its token directory at C_Initialize only: a token that was gone
                # then stays invisible until the next one, so keep re-initialising (throttled)
                # until it is back. Callers see HsmUnreachableError, a retryable 5xx.
                self.library.reinitialize_at_most_every(REINIT_INTERVAL_S)
                raise
            self.login(token)
            log.warning(
                "logged in again to token %s of %s after re-initialisation",
                self.serial.hex(),
                self.library.path,
            )

    def _drop_workers(self, *, close: bool = True) -> None:
        with self._cond:
            self._epoch += 1
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            if close:
                self._close_quietly(worker.raw)

    # --- handing out workers --------------------------------------------------------------------

    @contextmanager
    def session(self, *, during_decrypt: bool = False) -> Iterator[Worker]:
        """A worker session for one short block of PKCS#11 calls.

        Every exception leaving the block is translated exactly once into a BackendError; the
        session is evicted, the login restored or the library re-initialised as the error says.
        Consume every python-pkcs11 iterator inside the block (§2.4).
        """
        inline = nowait.inline()
        if inline:
            if not self.profile.inline_calls:
                raise nowait.WouldBlock(f"{self.profile.name} calls are not made inline")
            if self._generation != self.library.generation:
                raise nowait.WouldBlock("the library was re-initialised: log in again")
        self._rebuild_if_reinitialised()
        worker = self._acquire_idle() if inline else self._acquire()
        try:
            with self._serialized():
                yield worker
        except nowait.WouldBlock:
            self._release(worker)
            raise
        except Exception as exc:
            err = self._classify(exc, during_decrypt)
            if inline and not isinstance(err, BadCiphertextError):
                # Every other failure is recovered (probe, evict, re-login) under the library
                # lock: the rerun on a worker thread meets it again and recovers there.
                self._release(worker)
                raise nowait.WouldBlock(f"recovering from {type(err).__name__}") from exc
            if isinstance(err, KeyMissingError | HsmInternalError) and not self.token_present():
                # SoftHSM with its token directory gone answers "no such object" to finds and
                # GeneralError to writes, as if the key were deleted; only the token probe tells
                # the two apart, and a lost device must be retried (5xx), not reported missing.
                err = DeviceLostError(f"token {self.serial.hex()} is not present ({err})")
            self._recover(worker, err)
            if err is exc:
                raise
            raise err from exc
        self.library.device_error_streak = 0
        self._release(worker)

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        """The library lock when the profile serialises calls, waited for no longer than the
        request's deadline: a call stuck in the HSM must not queue work nobody waits for."""
        if not self.profile.serialize_calls:
            yield
            return
        lock = self.library.lock
        if nowait.inline():
            if not lock.acquire(blocking=False):
                raise nowait.WouldBlock("the PKCS#11 library lock is held")
            try:
                yield
            finally:
                lock.release()
            return
        left = deadline.remaining()
        if not (lock.acquire() if left is None else left > 0 and lock.acquire(timeout=left)):
            raise DeadlineExceededError(
                "the request's deadline passed while it waited for the PKCS#11 library"
            )
        try:
            yield
        finally:
            lock.release()

    def _acquire_idle(self) -> Worker:
        """An idle worker of the current login, for an inline call; opening one takes the lock."""
        with self._cond:
            if not self._closed:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.epoch == self._epoch:
                        self._busy.add(worker)
                        return worker
        raise nowait.WouldBlock("no idle HSM session")

    def _acquire(self) -> Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise HsmUnreachableError("the HSM connection is closed")
                while self._idle:
                    worker = self._idle.pop()
                    if worker.epoch == self._epoch:
                        self._busy.add(worker)
                        return worker
                if len(self._busy) + self._opening < self.profile.max_sessions:
                    self._opening += 1
                    epoch = self._epoch
                    break
                if not deadline.wait(self._cond):
                    raise DeadlineExceededError(
                        "the request's deadline passed while it waited for an HSM session"
                    )
        try:
            with self.library.guard(self.profile.serialize_calls):
                raw = self._login_token_open()
        except Exception as exc:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
            err = self._classify(exc, during_decrypt=False)
            # C_OpenSession is often where a lost token shows first (TokenNotPresent, a
            # DeviceError streak): recover here as `_recover` does for errors inside a block.
            if isinstance(err, DeviceLostError):
                self.library.reinitialize(self._generation)
            elif isinstance(err, LoginLostError):
                with self.library.lock:
                    self._relogin()
            raise err from exc
        worker = Worker(raw, epoch)
        with self._cond:
            self._opening -= 1
            self._busy.add(worker)
        return worker

    def _login_token_open(self) -> Any:
        if self._login is None:
            raise LoginLostError("no login session")
        return self._login.token.open(rw=True)

    def _release(self, worker: Worker) -> None:
        with self._cond:
            self._busy.discard(worker)
            keep = worker.epoch == self._epoch and not self._closed
            if keep:
                self._idle.append(worker)
            self._cond.notify()
        if not keep:
            with self.library.guard(self.profile.serialize_calls):
                self._close_quietly(worker.raw)

    # --- failure handling -----------------------------------------------------------------------

    def _classify(self, exc: BaseException, during_decrypt: bool) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, pkcs11.exceptions.DeviceError):
            self.library.device_error_streak += 1
        return translate(
            exc,
            during_decrypt=during_decrypt,
            profile=self.profile,
            device_error_streak=self.library.device_error_streak,
        )

    def _recover(self, worker: Worker, err: BackendError) -> None:
        if isinstance(err, StaleHandleError):
            worker.keys.clear()
            worker.warmed = False
        if isinstance(err, DeviceLostError):
            self._evict(worker, close=False)
            self.library.reinitialize(self._generation)
        elif isinstance(err, LoginLostError):
            self._evict(worker, close=True)
            with self.library.lock:
                self._relogin()
        elif evicts_session(err):
            self._evict(worker, close=True)
        else:
            self._release(worker)

    def token_present(self) -> bool:
        """Is our token still listed by the library (C_GetSlotList + C_GetTokenInfo)?"""
        with self.library.guard(self.profile.serialize_calls):
            try:
                _find_token(self.library, self.profile.token_label)
            except (HsmUnreachableError, MisconfiguredError):
                return False
        return True

    def _evict(self, worker: Worker, *, close: bool) -> None:
        with self._cond:
            self._busy.discard(worker)
            self._cond.notify()
        if close:
            with self.library.guard(self.profile.serialize_calls):
                self._close_quietly(worker.raw)

    @staticmethod
    def _close_quietly(raw: Any) -> None:
        try:
            raw.close()
        except Exception as exc:  # an evicted session is often already gone; that is the point
            log.debug("closing an evicted session failed: %s", type(exc).__name__)

    # --- housekeeping ---------------------------------------------------------------------------

    def forget(self, label: str) -> None:
        """Drop `label` from every worker's key cache (after a destroy)."""
        with self._cond:
            for worker in [*self._idle, *self._busy]:
                worker.keys.pop(label, None)

    @property
    def sessions_open(self) -> int:
        with self._cond:
            return len(self._idle) + len(self._busy) + (self._login is not None)

    def release(self) -> None:
        """One backend is done; the last one out logs out (login session closed last)."""
        with self.library.lock:
            self.users -= 1
            if self.users > 0 or self._closed:
                return
            with self._cond:
                self._closed = True
                workers = [*self._idle, *self._busy]
                self._idle, self._busy = [], set()
                self._cond.notify_all()
            for worker in workers:
                self._close_quietly(worker.raw)
            if self._login is not None and self._generation == self.library.generation:
                self._close_quietly(self._login)  # C_Logout + C_CloseSession
            self._login = None
            self.library.pools.pop(self.key, None)
