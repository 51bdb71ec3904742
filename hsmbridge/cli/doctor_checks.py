"""The checks `hsmbridge doctor` runs, in order, and their one-line verdicts.

Owns: `Doctor` (the nine checks, what each depends on, the scratch key's lifetime: destroyed
whatever happens in between) and `Verdict`. Every check goes through the code the service itself
runs: the PKCS#11 library registry and connector of `hsmbridge.backend` (via
`hsmbridge.bootstrap`), the key template's invariants, the cluster inventory the configuration
names, the AZ-quorum rules and the trust-anchor verification of CreateCustomKeyStore. The
command around it (arguments, password, exit code) is `hsmbridge.cli.doctor_cmd`.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TextIO, TypeVar

from hsmbridge import bootstrap, deadline
from hsmbridge.backend import (
    BackendError,
    BadCiphertextError,
    DeadlineExceededError,
    DeviceLostError,
    HsmBackend,
    HsmInternalError,
    HsmUnreachableError,
    LoginError,
    MisconfiguredError,
    NonCompliantKeyError,
    Sealed,
    TransientHsmError,
)
from hsmbridge.backend.sessions import load_library
from hsmbridge.backend.templates import violations
from hsmbridge.config import ClusterBinding, HsmProfile, IvPolicy, LoginFormat, Settings
from hsmbridge.errors import ConfigError, IncorrectTrustAnchorException
from hsmbridge.keystore import quorum
from hsmbridge.keystore.inventory import (
    ACTIVE,
    ClusterInfo,
    InventoryUnavailableError,
    inventory_from_settings,
)
from hsmbridge.keystore.trust import load_trust_anchor, verify_cluster_certificate
from hsmbridge.model import ConnectionErrorCode

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SCRATCH_PREFIX = "hsmbridge-doctor-"
THREADS, CALLS_PER_THREAD = 4, 25
# How long one check may wait for the HSM's side (a session, the library lock) before it fails;
# a call already inside the HSM is not interrupted.
CHECK_BUDGET_S = 60.0
# Pauses before trying the cleanup again while the HSM answers busy.
CLEANUP_PAUSES_S: Final = (0.25, 0.5)
_BUG = "it with the module check's line"
ROUND_TRIP_PLAINTEXT = b"hsmbridge doctor round trip"
ROUND_TRIP_AAD = b"hsmbridge-doctor"

CHECKS: Final[tuple[tuple[str, str], ...]] = (
    ("module", "the PKCS#11 module of the cluster's profile loads"),
    ("login", "the crypto user logs in with the profile's login format"),
    ("key-template", "a scratch key is generated and reads back exactly as the template says"),
    ("aes-gcm", "two AES-GCM round trips with the profile's IV policy; IVs distinct, not zero"),
    ("tampered-tag", "a flipped ciphertext or tag bit is refused as bad ciphertext"),
    (
        "concurrency",
        f"{THREADS} threads x {CALLS_PER_THREAD} encrypt/decrypt round trips at once all succeed",
    ),
    ("cluster-quorum", "the inventory has the cluster ACTIVE with 2 ACTIVE HSMs in 2 AZs"),
    ("trust-anchor", "--trust-anchor signed the inventory's cluster certificate"),
    ("cleanup", "the scratch key is destroyed and no longer found"),
)

# --- verdicts ------------------------------------------------------------------------------------


class Status(enum.StrEnum):
    OK = "ok"
    FAIL = "FAIL"
    SKIP = "skip"


class CheckFailedError(Exception):
    """A check's finding: what was seen and the one action that fixes it."""

    def __init__(self, seen: str, fix: str) -> None:
        super().__init__(seen)
        self.seen = seen
        self.fix = fix


class _SkippedError(Exception):
    """A check that cannot run: an earlier one failed, or its option was not given."""


@dataclass(frozen=True)
class Verdict:
    check: str
    status: Status
    seen: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status.value:<4} {self.check}: {self.seen}"
        return f"{text} — fix: {self.fix}" if self.status is Status.FAIL else text


# --- the checks ----------------------------------------------------------------------------------


class Doctor:
    """Runs the checks in order against one cluster binding; prints a line per check."""

    def __init__(
        self, settings: Settings, binding: ClusterBinding, anchor_pem: str | None, out: TextIO
    ) -> None:
        self.settings = settings
        self.profile: HsmProfile = binding.profile
        self.cluster_id = binding.cluster_id
        self.anchor_pem = anchor_pem
        self.out = out
        self.verdicts: dict[str, Verdict] = {}
        self.hsm: HsmBackend | None = None
        self.label = f"{SCRATCH_PREFIX}{uuid.uuid4()}"
        self.key_id = self.label.removeprefix(SCRATCH_PREFIX).encode("ascii")
        self.key_attempted = False  # generate_key was called: a key may exist
        self.key_made = False  # generate_key returned: the key exists
        self.sealed: list[Sealed] = []
        self.cluster: ClusterInfo | None = None

    def run(self, password: str) -> int:
        where = f"profile {self.profile.name}, config {self.settings.config_path}"
        self.out.write(f"hsmbridge doctor: cluster {self.cluster_id} ({where})\n")
        self.out.flush()
        self._check("module", self._module)
        self._check("login", functools.partial(self._login, password))
        del password  # WARNING: the password lives no longer than the login needs it
        try:
            self._check("key-template", self._key_template)
            self._check("aes-gcm", self._aes_gcm)
            self._check("tampered-tag", self._tampered_tag)
            self._check("concurrency", self._concurrency)
            self._check("cluster-quorum", self._cluster_quorum)
            self._check("trust-anchor", self._trust_anchor)
        finally:
            # Runs even when a check raised something no check catches (KeyboardInterrupt):
            # the scratch key must not outlive the doctor.
            try:
                self._check("cleanup", self._cleanup)
            finally:
                if self.hsm is not None:
                    self.hsm.close()
        return self._summary()

    def _check(self, name: str, body: Callable[[], str]) -> None:
        try:
            with deadline.within(CHECK_BUDGET_S):
                verdict = Verdict(name, Status.OK, body())
        except _SkippedError as why:
            verdict = Verdict(name, Status.SKIP, str(why))
        except CheckFailedError as failed:
            verdict = Verdict(name, Status.FAIL, failed.seen, failed.fix)
        except BackendError as exc:
            verdict = Verdict(name, Status.FAIL, _seen(exc), self._backend_fix(exc))
        except Exception as exc:
            # A bug (or a broken installation): one line, the traceback only under -v.
            log.debug("unexpected error in check %s", name, exc_info=True)
            verdict = Verdict(
                name,
                Status.FAIL,
                f"unexpected {type(exc).__name__} inside hsmbridge",
                f"run `hsmbridge -v doctor ...` for the traceback and report {_BUG}",
            )
        self.verdicts[name] = verdict
        self.out.write(verdict.line() + "\n")
        self.out.flush()

    def _require(self, *checks: str) -> None:
        for name in checks:
            verdict = self.verdicts.get(name)
            if verdict is None or verdict.status is not Status.OK:
                raise _SkippedError(f"needs the {name} check to pass first")

    def _backend(self) -> HsmBackend:
        assert self.hsm is not None  # `_require("login")` came first
        return self.hsm

    # 1 -------------------------------------------------------------------------------------------

    def _module(self) -> str:
        path = self.profile.module_path
        try:
            library = load_library(path)
        except HsmUnreachableError as exc:
            raise CheckFailedError(
                str(exc).split("; ")[0],  # the backend's own hint is the fix below
                f"install the HSM's PKCS#11 client library at {path} (profile "
                f"{self.profile.name}), or set module_path in the [[clusters]] entry of "
                f"{self.cluster_id}",
            ) from None
        return f"{path} loaded{_library_identity(library.raw)}"

    # 2 -------------------------------------------------------------------------------------------

    def _login(self, password: str) -> str:
        self._require("module")
        connector = bootstrap.default_connector(self.settings)
        try:
            self.hsm = connector.connect(self.cluster_id, password)
        except LoginError as exc:
            raise CheckFailedError(
                f"{exc.reason.value}: {exc}", self._login_fix(exc.reason)
            ) from None
        except HsmUnreachableError as exc:
            raise CheckFailedError(_seen(exc), self._no_token_fix()) from None
        user = self.profile.crypto_user
        if self.profile.login_format is LoginFormat.USER_COLON_PASSWORD:
            how = f'PIN "{user}:<password>"'
        else:
            how = "the password as the PIN"
        return f"{user} logged in ({how}, login format {self.profile.login_format.value})"

    def _login_fix(self, reason: ConnectionErrorCode) -> str:
        user = self.profile.crypto_user
        lockout = self.profile.login_lockout_threshold
        counted = (
            f"; each failed login counts toward the lockout after {lockout} in a row"
            if lockout
            else ""
        )
        if reason is ConnectionErrorCode.INVALID_CREDENTIALS:
            return (
                f"put {user}'s current password in the password file (one line); if nobody "
                f"knows it, an officer resets it: {self._officer_reset()}{counted}"
            )
        if reason is ConnectionErrorCode.USER_LOCKED_OUT:
            return f"{user} is locked: an officer resets its password: {self._officer_reset()}"
        if reason is ConnectionErrorCode.USER_NOT_FOUND:
            if self._cloudhsm_like():
                create = f"{self._cloudhsm_cli()} user create --username {user} --role crypto-user"
            else:
                create = self._officer_reset()
            return f"an officer creates the crypto user: {create}"
        if reason is ConnectionErrorCode.USER_LOGGED_IN:
            return (
                f"log {user} out where it is logged in (disconnect the custom key store that "
                "uses it, or stop the other client), then run the doctor again"
            )
        return "check the cluster's HSMs and the client configuration, then run the doctor again"

    def _officer_reset(self) -> str:
        """The officer's command that sets the crypto user's password (and unlocks it)."""
        if self._cloudhsm_like():
            user = self.profile.crypto_user
            return (
                f"{self._cloudhsm_cli()} user change-password --username {user} "
                "--role crypto-user (as an admin)"
            )
        return (
            f"pkcs11-tool --module {self.profile.module_path} --login --login-type so --init-pin "
            "(as the token's security officer)"
        )

    def _cloudhsm_cli(self) -> str:
        command = self.profile.password_change_command
        return command[0] if command else "cloudhsm-cli"

    def _no_token_fix(self) -> str:
        if self._cloudhsm_like():
            return (
                "point the client at the cluster (/opt/cloudhsm/bin/configure-pkcs11 -a "
                "HSM_ENI_IP, with the trust anchor in /opt/cloudhsm/etc/customerCA.crt) and "
                "check that this host reaches the HSMs on TCP 2223-2225"
            )
        label = self.profile.token_label
        return (
            f"create or name the token: no initialised token labelled {label!r} is visible "
            "(check token_label in the [[clusters]] entry and the module's configuration)"
            if label
            else "initialise a token in the module's first slot, or set token_label"
        )

    def _cloudhsm_like(self) -> bool:
        """CloudHSM's tools apply: its crypto users log in as "user:password"."""
        return self.profile.login_format is LoginFormat.USER_COLON_PASSWORD

    # 3 -------------------------------------------------------------------------------------------

    def _key_template(self) -> str:
        self._require("login")
        hsm = self._backend()
        self.key_attempted = True
        hsm.generate_key(self.label, self.key_id, fresh_label=True)
        self.key_made = True
        found = hsm.find_keys(self.label)
        if len(found) != 1:
            raise CheckFailedError(
                f"{len(found)} keys labelled {self.label} found right after generating one",
                "check that the crypto user sees its own new keys at once (the profile's "
                "stale_cross_process_view) and run the doctor again",
            )
        info = found[0]
        problems = violations(info)
        if info.label != self.label or info.key_id != self.key_id:
            problems.append(
                f"LABEL/ID read back as {info.label!r}/{info.key_id!r} (want {self.label!r}/"
                f"{self.key_id!r})"
            )
        if problems:
            raise CheckFailedError(
                f"{self.label} reads back wrong: {'; '.join(problems)}",
                "the HSM does not keep the template: fix the profile (template_omit) or the "
                "HSM's policy until every attribute reads back as required",
            )
        return (
            f"{self.label} generated: AES-256, token, private, sensitive, never extractable, "
            "local, encrypt/decrypt only; every attribute read back as required"
        )

    # 4 -------------------------------------------------------------------------------------------

    def _aes_gcm(self) -> str:
        if not self.key_made:
            raise _SkippedError("needs the scratch key of the key-template check")
        hsm = self._backend()
        policy = self.profile.iv_policy
        for _ in range(2):
            sealed = hsm.encrypt(self.label, ROUND_TRIP_PLAINTEXT, ROUND_TRIP_AAD)
            back = hsm.decrypt(self.label, sealed, ROUND_TRIP_AAD)
            if back != ROUND_TRIP_PLAINTEXT:
                raise CheckFailedError(
                    "decrypting the ciphertext did not give the plaintext back",
                    "do not use this HSM with hsmbridge: report the AES-GCM mismatch to its "
                    "vendor with the library version the module check printed",
                )
            self.sealed.append(sealed)
        first, second = (s.iv for s in self.sealed)
        if any(len(iv) != 12 for iv in (first, second)):
            raise CheckFailedError(
                f"IVs of {len(first)} and {len(second)} bytes (want 12)",
                "fix the profile's iv_policy for this HSM",
            )
        if first == bytes(12) or second == bytes(12):
            if policy is IvPolicy.HSM_ZERO_BUFFER:
                fix = (
                    "the module did not write its IV into the zeroed buffer: use a profile with "
                    'iv_policy = "caller" if this HSM takes the caller\'s IV'
                )
            else:
                fix = "the host's random source returned zeros: check os.urandom on this host"
            raise CheckFailedError(f"an all-zero IV came back (iv_policy {policy.value})", fix)
        if first == second:
            raise CheckFailedError(
                f"both encryptions used the same IV {first.hex()} (iv_policy {policy.value})",
                "never use this HSM as configured: fix iv_policy so that every encryption gets "
                "a fresh IV",
            )
        who = "written by the HSM" if policy is IvPolicy.HSM_ZERO_BUFFER else "drawn by hsmbridge"
        return (
            f"2 encrypt/decrypt round trips ok; 12-byte IVs {who} (iv_policy {policy.value}), "
            "distinct, not zero"
        )

    # 5 -------------------------------------------------------------------------------------------

    def _tampered_tag(self) -> str:
        self._require("aes-gcm")
        hsm = self._backend()
        sealed = self.sealed[0]
        body = bytearray(sealed.ciphertext)
        body[0] ^= 0x01
        tag = bytearray(sealed.ciphertext)
        tag[-1] ^= 0x80
        for what, data in (("ciphertext", body), ("tag", tag)):
            try:
                hsm.decrypt(self.label, Sealed(sealed.iv, bytes(data)), ROUND_TRIP_AAD)
            except BadCiphertextError:
                continue
            except (HsmInternalError, MisconfiguredError) as exc:
                cause = type(exc.__cause__).__name__ if exc.__cause__ else type(exc).__name__
                raise CheckFailedError(
                    f"a flipped {what} bit was refused with {cause}, which hsmbridge does not "
                    f"read as bad ciphertext ({exc})",
                    f'add "{cause}" to decrypt_auth_failure_errors in the {self.profile.name} '
                    "profile",
                ) from None
            raise CheckFailedError(
                f"the HSM decrypted a ciphertext with a flipped {what} bit",
                "do not use this HSM: it does not verify AES-GCM tags; report it to its vendor",
            )
        return (
            "a flipped ciphertext bit and a flipped tag bit were both refused as "
            "BadCiphertextError (InvalidCiphertextException)"
        )

    # 6 -------------------------------------------------------------------------------------------

    def _concurrency(self) -> str:
        self._require("aes-gcm")
        hsm = self._backend()
        barrier = threading.Barrier(THREADS)
        ivs: list[bytes] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work(n: int) -> None:
            try:
                barrier.wait(timeout=CHECK_BUDGET_S)
                for i in range(CALLS_PER_THREAD):
                    plain = f"thread {n} call {i}".encode()
                    sealed = hsm.encrypt(self.label, plain, ROUND_TRIP_AAD)
                    if hsm.decrypt(self.label, sealed, ROUND_TRIP_AAD) != plain:
                        raise CheckFailedError(
                            "a concurrent round trip gave back another plaintext",
                            self._concurrency_fix(),
                        )
                    with lock:
                        ivs.append(sealed.iv)
            except BaseException as exc:  # reported below, one line
                with lock:
                    errors.append(exc)
                barrier.abort()

        began = time.monotonic()
        # Each thread runs in a copy of this context, so the check's deadline bounds its waits.
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(work, n),
                name=f"doctor-{n}",
                daemon=True,
            )
            for n in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, began + CHECK_BUDGET_S - time.monotonic()))
        took = time.monotonic() - began
        calls = THREADS * CALLS_PER_THREAD
        if any(thread.is_alive() for thread in threads):
            raise CheckFailedError(
                f"{calls} concurrent round trips had not finished after {CHECK_BUDGET_S:.0f} s",
                self._concurrency_fix(),
            )
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if real:
            first = real[0]
            seen = first.seen if isinstance(first, CheckFailedError) else _seen(first)
            if isinstance(first, CheckFailedError):
                fix = first.fix
            elif isinstance(first, BackendError):
                fix = self._backend_fix(first)
            else:
                fix = self._concurrency_fix()
            raise CheckFailedError(f"{len(real)} of {THREADS} threads failed; first: {seen}", fix)
        if len(ivs) != calls:
            raise CheckFailedError(
                f"only {len(ivs)} of {calls} concurrent round trips ran (threads did not start "
                "together)",
                "run the doctor again on a less loaded host",
            )
        if len(set(ivs)) != len(ivs):
            raise CheckFailedError(
                f"{len(ivs) - len(set(ivs))} repeated IVs among {len(ivs)} concurrent encryptions",
                "never use this HSM as configured: fix iv_policy so that every encryption gets "
                "a fresh IV",
            )
        serial = "serialized" if self.profile.serialize_calls else "not serialized"
        return (
            f"{THREADS} threads x {CALLS_PER_THREAD} encrypt/decrypt round trips all ok in "
            f"{took:.2f} s, {len(ivs)} distinct IVs (calls {serial}: serialize_calls = "
            f"{str(self.profile.serialize_calls).lower()})"
        )

    def _concurrency_fix(self) -> str:
        if not self.profile.serialize_calls:
            return "set serialize_calls = true in the profile and run the doctor again"
        return f"calls are already serialized: run `hsmbridge -v doctor ...` and report {_BUG}"

    # 7 -------------------------------------------------------------------------------------------

    def _cluster_quorum(self) -> str:
        inv = self.settings.inventory
        source = (
            f"static inventory {inv.path}"
            if inv.provider == "static"
            else f"cloudhsmv2 DescribeClusters in {inv.region or 'the default region'}"
        )
        try:
            cluster = inventory_from_settings(inv).describe(self.cluster_id)
        except (InventoryUnavailableError, ConfigError) as exc:
            if inv.provider == "static":
                fix = f"fix the inventory file {inv.path} (the shape describe-clusters prints)"
            else:
                fix = (
                    "check [inventory] region and endpoint_url, this host's route to the "
                    "cloudhsmv2 API, and AWS credentials allowed cloudhsm:DescribeClusters"
                )
            raise CheckFailedError(f"the cluster inventory could not be read: {exc}", fix) from None
        except Exception as exc:
            import botocore.exceptions

            if not isinstance(exc, botocore.exceptions.BotoCoreError):
                raise
            raise CheckFailedError(
                f"the cloudhsmv2 client could not be made: {exc}",
                "set [inventory] region (or AWS_DEFAULT_REGION) and AWS credentials",
            ) from None
        if cluster is None:
            raise CheckFailedError(
                f"cluster {self.cluster_id} is not in the {source}",
                "check the cluster id (--cluster) against `aws cloudhsmv2 describe-clusters` "
                "and the [inventory] settings",
            )
        self.cluster = cluster
        if cluster.state != ACTIVE:
            raise CheckFailedError(
                f"cluster {self.cluster_id} is {cluster.state} in the {source}",
                "initialize and activate the cluster (InitializeCluster with the signed "
                "certificate, then `cloudhsm-cli cluster activate`) and wait until it is ACTIVE",
            )
        for op in (quorum.Operation.CREATE_KEY, quorum.Operation.CREATE_CUSTOM_KEY_STORE):
            verdict = quorum.check(op, cluster)
            if not verdict.ok:
                raise CheckFailedError(verdict.message, self._quorum_fix(verdict, cluster))
        active = cluster.active_hsms
        listed = ", ".join(f"{h.hsm_id} in {h.availability_zone}" for h in active)
        zones = len({h.availability_zone for h in active})
        return (
            f"cluster {self.cluster_id} is ACTIVE with {len(active)} ACTIVE HSMs ({listed}) in "
            f"{zones} Availability Zones ({source}): CreateCustomKeyStore and CreateKey may "
            "proceed"
        )

    def _quorum_fix(self, verdict: quorum.Verdict, cluster: ClusterInfo) -> str:
        if verdict.reason is quorum.Reason.INVALID_CONFIGURATION:
            return "add a private subnet in another Availability Zone to the cluster"
        zones = {h.availability_zone for h in cluster.active_hsms}
        other = sorted(set(cluster.subnet_mapping) - zones)
        where = other[0] if other else "ANOTHER-AZ"
        return (
            f"aws cloudhsmv2 create-hsm --cluster-id {cluster.cluster_id} --availability-zone "
            f"{where}, and wait until the new HSM is ACTIVE"
        )

    # 8 -------------------------------------------------------------------------------------------

    def _trust_anchor(self) -> str:
        if self.anchor_pem is None:
            raise _SkippedError(
                "not asked (no --trust-anchor FILE); CreateCustomKeyStore verifies the cluster "
                "certificate against the trust anchor given to it"
            )
        if self.cluster is None:
            raise _SkippedError("needs the cluster from the cluster-quorum check")
        cert = self.cluster.cluster_certificate_pem
        if cert is None:
            raise CheckFailedError(
                f"the inventory has no ClusterCertificate for {self.cluster_id} (not initialized)",
                "initialize the cluster with a certificate signed by your trust anchor",
            )
        try:
            verify_cluster_certificate(self.anchor_pem, cert)
        except IncorrectTrustAnchorException as exc:
            seen, _, fix = exc.message.rpartition("; ")
            if not seen:
                seen, fix = exc.message, "give the customerCA.crt that signed the cluster CSR"
            raise CheckFailedError(seen, fix) from None
        anchor = load_trust_anchor(self.anchor_pem)
        return (
            f"the cluster certificate was issued and signed by {anchor.subject.rfc4514_string()}"
            f" (valid until {anchor.not_valid_after_utc.date().isoformat()})"
        )

    # 9 -------------------------------------------------------------------------------------------

    def _cleanup(self) -> str:
        if self.hsm is None:
            raise _SkippedError("no scratch key was made (no login)")
        if not self.key_attempted:
            raise _SkippedError("no scratch key was made")
        hsm = self.hsm
        try:
            gone = _patiently(lambda: hsm.destroy_key(self.label))
            left = _patiently(lambda: hsm.find_keys(self.label))
        except BackendError as exc:
            raise CheckFailedError(
                f"could not destroy or look for {self.label}: {_seen(exc)}",
                self._manual_delete_fix(),
            ) from None
        if left:
            raise CheckFailedError(
                f"{len(left)} key(s) labelled {self.label} still found after destroying {gone}",
                self._manual_delete_fix(),
            )
        if not gone:
            return f"no key labelled {self.label} was left to destroy; none found afterwards"
        objects = "object" if gone == 1 else "objects"
        return f"{self.label} destroyed ({gone} {objects}); none found afterwards"

    def _manual_delete_fix(self) -> str:
        if self._cloudhsm_like():
            return (
                f"delete it as {self.profile.crypto_user} once the HSM answers: cloudhsm-cli "
                f"key delete --filter attr.label={self.label}"
            )
        return (
            f"delete it once the HSM answers: pkcs11-tool --module {self.profile.module_path} "
            f"--login --delete-object --type secrkey --label {self.label}"
        )

    # --- summary --------------------------------------------------------------------------------

    def _summary(self) -> int:
        verdicts = list(self.verdicts.values())
        failed = [v.check for v in verdicts if v.status is Status.FAIL]
        oks = sum(v.status is Status.OK for v in verdicts)
        skips = sum(v.status is Status.SKIP for v in verdicts)
        counts = f"{oks} ok, {len(failed)} failed, {skips} skipped"
        if failed:
            line = (
                f"summary: {counts}: cluster {self.cluster_id} is NOT ready for a custom key "
                f"store (failed: {', '.join(failed)}); fix the FAIL lines from the top and run "
                "the doctor again"
            )
            code = EXIT_FAILED
        else:
            line = f"summary: {counts}: cluster {self.cluster_id} is ready for a custom key store"
            if skips:
                line += " (pass --trust-anchor FILE to check the trust anchor too)"
            code = EXIT_OK
        self.out.write(line + "\n")
        self.out.flush()
        return code

    # --- shared ---------------------------------------------------------------------------------

    def _backend_fix(self, exc: BackendError) -> str:
        if isinstance(exc, LoginError):
            return self._login_fix(exc.reason)
        for kinds, fix in _BACKEND_FIXES:
            if isinstance(exc, kinds):
                return fix.format(profile=self.profile.name)
        return f"run `hsmbridge -v doctor ...` and report {_BUG}"


# What to do about a backend error a check did not expect, by class (the first match counts).
_BACKEND_FIXES: Final[
    tuple[tuple[type[BackendError] | tuple[type[BackendError], ...], str], ...]
] = (
    (
        TransientHsmError,
        "the HSM kept answering busy after retries (CloudHSM: throttling, or a new key not yet "
        "on 2 HSMs): make sure the cluster has 2 ACTIVE HSMs and is not overloaded, then run "
        "the doctor again",
    ),
    (
        (DeviceLostError, HsmUnreachableError),
        "check that the cluster's HSMs are up and reachable from this host (client "
        "configuration, security group), then run the doctor again",
    ),
    (
        NonCompliantKeyError,
        "the HSM does not keep the template: fix the profile (template_omit) or the HSM's "
        "policy until every attribute reads back as required",
    ),
    (
        MisconfiguredError,
        "the HSM refused what the {profile} profile asks for: adjust the profile "
        "(template_omit, module_path) to this HSM",
    ),
    (DeadlineExceededError, "the HSM did not answer in time: check its load and the network"),
)


def _patiently(call: Callable[[], T]) -> T:
    """`call()`, tried again after CLEANUP_PAUSES_S while the HSM answers busy: on top of the
    backend's own quick retries, so that a throttled moment does not leave the scratch key."""
    for pause in CLEANUP_PAUSES_S:
        try:
            return call()
        except TransientHsmError:
            time.sleep(pause)
    return call()


def _seen(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _library_identity(raw: object) -> str:
    """`: "description" 2.6 by manufacturer, Cryptoki 2.40`, from what the module reports."""
    description = str(getattr(raw, "library_description", "") or "").strip()
    maker = str(getattr(raw, "manufacturer_id", "") or "").strip()
    version = _version(getattr(raw, "library_version", None))
    cryptoki = _version(getattr(raw, "cryptoki_version", None))
    parts = [f'"{description}"' if description else "", version, f"by {maker}" if maker else ""]
    said = " ".join(p for p in parts if p)
    if cryptoki:
        said = f"{said}, Cryptoki {cryptoki}" if said else f"Cryptoki {cryptoki}"
    return f": {said}" if said else ""


def _version(value: object) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}.{value[1]}"
    return ""
