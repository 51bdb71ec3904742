"""`hsmbridge doctor` against real environments: `hsmbridge init --hsm cloudhsm-shim` (the
`cloudhsm` profile through the CloudHSM stand-in) and `hsmbridge init` on SoftHSM2 itself.

Every doctor run is `python -m hsmbridge doctor ...` in its own process, as an operator runs it;
the pytest process never loads a PKCS#11 module. `init` connects the store, which rotates
kmsuser's password to one only hsmbridge knows, so the fixture resets it to a known one as the
cluster's officer with the stand-in's `cloudhsm-cli`, as an operator would on a real cluster.
Only the usage errors, which stop before anything is loaded, run in this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmbridge.cli.doctor_checks import CHECKS, SCRATCH_PREFIX
from hsmbridge.cli.kmsuser_password import PASSWORD_ENV
from hsmbridge.keystore.demo import make_demo_pki, new_cluster_id
from hsmbridge.main import main
from tests.cli.process import Finished, hsmbridge_env, run_hsmbridge
from tests.reliability.servers import InitEnv, init_env
from tests.staging.test_staging import Staging, exercise, served

pytestmark = pytest.mark.softhsm

REPO = Path(__file__).resolve().parents[2]
CLOUDHSM_CLI = REPO / "softhsm" / "cloudhsm-shim" / "cloudhsm-cli"
KNOWN = "doctor-known-0001"  # kmsuser's password once the officer has reset it
NAMES = [name for name, _ in CHECKS]
LINE = re.compile(r"^(?P<status>ok  |FAIL|skip) (?P<check>[a-z-]+): (?P<text>.+)$")

# Lists the labels of the token's secret keys through the stand-in, logged in as kmsuser.
LIST_LABELS = r"""
import json, sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
module, label, pin = sys.argv[1], sys.argv[2], sys.stdin.read()
token = pkcs11.lib(module).get_token(token_label=label)
with token.open(user_pin=pin) as session:
    objs = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
    print(json.dumps(sorted(o.label for o in objs)))
"""


@dataclass
class DoctorEnv:
    init: InitEnv
    password_file: Path

    @property
    def root(self) -> Path:
        return self.init.root

    @property
    def config(self) -> Path:
        return self.init.config

    def cluster_id(self) -> str:
        doc = tomllib.loads(self.config.read_text())
        return str(doc["clusters"][0]["cluster_id"])

    def hsm_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HSMBRIDGE_SHIM_CONF": str(self.root / "cloudhsm-shim.conf"),
            "SOFTHSM2_CONF": str(self.root / "softhsm2.conf"),
        }

    def doctor(self, *args: str | Path, password: str | None = None) -> Finished:
        """The doctor on this environment: the password from the file, or from the
        environment variable when `password` is given."""
        argv: list[str | Path] = ["doctor", "--config", self.config, *args]
        if password is None:
            argv += ["--password-file", self.password_file]
        done = run_hsmbridge(*argv, env=hsmbridge_env(**{PASSWORD_ENV: password}), timeout=60)
        for secret in (KNOWN, self.init.password, password):
            if secret:
                assert secret not in done.out + done.err
        assert "Traceback" not in done.out + done.err
        return done

    def scratch_labels(self) -> list[str]:
        """Labels of doctor scratch keys on the cluster, read through the stand-in."""
        doc = tomllib.loads(self.config.read_text())
        module = doc["clusters"][0]["module_path"]
        done = subprocess.run(
            [sys.executable, "-c", LIST_LABELS, module, self.cluster_id()],
            input=f"kmsuser:{KNOWN}",
            env=self.hsm_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return [label for label in json.loads(done.stdout) if label.startswith(SCRATCH_PREFIX)]


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _reset_kmsuser(env: InitEnv, new: str) -> None:
    """The officer sets kmsuser's password (read from standard input, typed twice)."""
    so_pin = (env.root / "softhsm-so.pin").read_text().strip()
    argv = [str(CLOUDHSM_CLI), "user", "change-password", "--username", "kmsuser"]
    done = subprocess.run(
        [*argv, "--role", "crypto-user"],
        input=f"{new}\n{new}\n",
        env={
            **os.environ,
            "CLOUDHSM_ROLE": "admin",
            "CLOUDHSM_PIN": f"admin:{so_pin}",
            "HSMBRIDGE_SHIM_CONF": str(env.root / "cloudhsm-shim.conf"),
            "SOFTHSM2_CONF": str(env.root / "softhsm2.conf"),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> DoctorEnv:
    root = tmp_path_factory.mktemp("doctor-shim")
    env = init_env(root / "env", hsm="cloudhsm-shim")
    _reset_kmsuser(env, KNOWN)  # init's own connect spent kmsuser.password
    return DoctorEnv(env, _write_private(root / "kmsuser.known", KNOWN + "\n"))


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> DoctorEnv:
    root = tmp_path_factory.mktemp("doctor-softhsm")
    env = init_env(root / "env", hsm="softhsm2")
    # The softhsm2 profile does not rotate: init's password is still kmsuser's.
    return DoctorEnv(env, env.root / "kmsuser.password")


def _verdicts(out: str) -> dict[str, tuple[str, str]]:
    """check -> (status, text), asserting the output's shape: a header, one line per check in
    order, a summary."""
    lines = out.splitlines()
    assert lines[0].startswith("hsmbridge doctor: cluster "), lines[0]
    assert lines[-1].startswith("summary: "), lines[-1]
    verdicts: dict[str, tuple[str, str]] = {}
    for line in lines[1:-1]:
        match = LINE.match(line)
        assert match, f"not a check line: {line!r}"
        status, text = match["status"].strip(), match["text"]
        assert (" — fix: " in text) == (status == "FAIL"), line
        verdicts[match["check"]] = (status, text)
    assert list(verdicts) == NAMES
    return verdicts


def _statuses(verdicts: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {name: status for name, (status, _) in verdicts.items()}


@contextmanager
def _faults(env: DoctorEnv, text: str) -> Iterator[None]:
    path = env.root / "cloudhsm-shim.faults"
    try:
        path.write_text(text)
        yield
    finally:
        path.write_text("")
        now = time.time_ns()  # the stand-in re-reads the file when its mtime changes
        os.utime(path, ns=(now, now + 1_000_000))


@contextmanager
def _inventory_edit(env: DoctorEnv, drop_hsms: int) -> Iterator[None]:
    path = env.root / "clusters.json"
    original = path.read_text()
    doc = json.loads(original)
    del doc["Clusters"][0]["Hsms"][:drop_hsms]
    path.write_text(json.dumps(doc))
    try:
        yield
    finally:
        path.write_text(original)


# --- the cloudhsm profile through the stand-in ---------------------------------------------------


def test_every_check_passes_on_a_healthy_cluster(shim: DoctorEnv) -> None:
    done = shim.doctor("--trust-anchor", shim.root / "customerCA.crt")
    assert done.code == 0, done.out + done.err
    verdicts = _verdicts(done.out)
    assert set(_statuses(verdicts).values()) == {"ok"}, done.out
    assert "libcloudhsm-shim.so loaded" in verdicts["module"][1]
    assert 'kmsuser logged in (PIN "kmsuser:<password>"' in verdicts["login"][1]
    assert "every attribute read back as required" in verdicts["key-template"][1]
    assert "written by the HSM (iv_policy hsm_zero_buffer)" in verdicts["aes-gcm"][1]
    assert "BadCiphertextError" in verdicts["tampered-tag"][1]
    assert "4 threads x 25" in verdicts["concurrency"][1]
    assert "2 ACTIVE HSMs" in verdicts["cluster-quorum"][1]
    assert "issued and signed by" in verdicts["trust-anchor"][1]
    assert "destroyed (1 object); none found afterwards" in verdicts["cleanup"][1]
    assert "9 ok, 0 failed, 0 skipped" in done.out.splitlines()[-1]
    assert shim.scratch_labels() == []


def test_a_wrong_password_skips_the_hsm_checks_but_not_the_cluster_ones(
    shim: DoctorEnv, tmp_path: Path
) -> None:
    """One run for two findings (each doctor run costs ~1.5 s of start-up): the login fails, so
    the HSM checks are skipped, while the cluster checks, which need no HSM, still run; the
    trust anchor given is another cluster's CA, which did not sign this cluster's certificate."""
    other = tmp_path / "otherCA.crt"
    other.write_text(make_demo_pki(new_cluster_id()).ca_cert_pem)
    # The password from $HSMBRIDGE_KMSUSER_PASSWORD this time.
    done = shim.doctor("--trust-anchor", other, password="not-the-password-1")
    assert done.code == 1, done.out + done.err
    verdicts = _verdicts(done.out)
    assert _statuses(verdicts) == {
        "module": "ok",
        "login": "FAIL",
        "key-template": "skip",
        "aes-gcm": "skip",
        "tampered-tag": "skip",
        "concurrency": "skip",
        "cluster-quorum": "ok",
        "trust-anchor": "FAIL",
        "cleanup": "skip",
    }
    login = verdicts["login"][1]
    assert login.startswith("INVALID_CREDENTIALS: ")
    assert "user change-password --username kmsuser --role crypto-user" in login
    anchor = verdicts["trust-anchor"][1]
    assert "does not verify with the trust anchor" in anchor
    assert "fix: supply the customerCA.crt that signed the cluster CSR" in anchor
    assert "(failed: login, trust-anchor)" in done.out.splitlines()[-1]


def test_a_cluster_short_of_an_hsm_fails_the_quorum_and_still_cleans_up(shim: DoctorEnv) -> None:
    with _inventory_edit(shim, drop_hsms=1):
        done = shim.doctor("--trust-anchor", shim.root / "customerCA.crt")
    assert done.code == 1, done.out + done.err
    verdicts = _verdicts(done.out)
    statuses = _statuses(verdicts)
    assert statuses.pop("cluster-quorum") == "FAIL"
    assert set(statuses.values()) == {"ok"}, done.out
    seen = verdicts["cluster-quorum"][1]
    assert "has 1 ACTIVE HSM" in seen
    assert "CreateKey needs at least 2 ACTIVE HSMs in 2 different Availability Zones" in seen
    assert "fix: aws cloudhsmv2 create-hsm --cluster-id" in seen
    assert "destroyed (1 object); none found afterwards" in verdicts["cleanup"][1]
    assert shim.scratch_labels() == []  # seen from another process, through the stand-in


def test_a_throttling_hsm_fails_the_key_check_in_one_line(shim: DoctorEnv) -> None:
    with _faults(shim, "throttle_rate = 1\n"):  # every operation answers CKR_FUNCTION_FAILED
        done = shim.doctor()
    assert done.code == 1, done.out + done.err
    verdicts = _verdicts(done.out)
    statuses = _statuses(verdicts)
    assert statuses["module"] == statuses["login"] == "ok"  # logging in is not throttled
    assert statuses["key-template"] == "FAIL"
    assert {statuses[c] for c in ("aes-gcm", "tampered-tag", "concurrency")} == {"skip"}
    assert statuses["cluster-quorum"] == "ok"
    key = verdicts["key-template"][1]
    assert "HsmBusyError: PKCS#11 FunctionFailed" in key
    assert "fix: the HSM kept answering busy" in key
    # The cleanup cannot even look while every search is refused: it says so, with the label.
    assert statuses["cleanup"] == "FAIL"
    assert "cloudhsm-cli key delete --filter attr.label=hsmbridge-doctor-" in done.out
    assert shim.scratch_labels() == []  # the throttled generation never made the key


# --- profile-agnostic: SoftHSM2 itself -----------------------------------------------------------


def test_a_softhsm2_environment_passes_with_the_trust_anchor_skipped(softhsm: DoctorEnv) -> None:
    done = softhsm.doctor()
    assert done.code == 0, done.out + done.err
    verdicts = _verdicts(done.out)
    statuses = _statuses(verdicts)
    assert statuses.pop("trust-anchor") == "skip"
    assert set(statuses.values()) == {"ok"}, done.out
    assert "(profile softhsm2," in done.out.splitlines()[0]
    assert "the password as the PIN" in verdicts["login"][1]
    assert "drawn by hsmbridge (iv_policy caller)" in verdicts["aes-gcm"][1]
    assert "8 ok, 0 failed, 1 skipped" in done.out.splitlines()[-1]


# --- usage errors: nothing is loaded, so these run in this process -------------------------------


def test_the_password_is_refused_on_the_command_line(shim: DoctorEnv, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["doctor", "--config", str(shim.config), "--password", "s3cret-on-argv"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "never taken from the command line" in err
    assert "s3cret-on-argv" not in err


def test_no_password_is_a_usage_error(
    shim: DoctorEnv, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert main(["doctor", "--config", str(shim.config)]) == 2
    assert f"--password-file or ${PASSWORD_ENV}" in capsys.readouterr().err


def test_the_cluster_must_be_named_when_the_config_has_several(shim: DoctorEnv, capsys) -> None:
    two = shim.root / "two-clusters.toml"
    two.write_text(
        shim.config.read_text()
        + '\n[[clusters]]\ncluster_id = "cluster-second00001"\nprofile = "softhsm2"\n'
        + 'token_label = "cluster-second00001"\n'
    )
    argv = ["doctor", "--config", str(two), "--password-file", str(shim.password_file)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 [[clusters]] entries" in err
    assert shim.cluster_id() in err
    assert "cluster-second00001" in err
    assert main([*argv, "--cluster", "cluster-unknown0001"]) == 2
    assert "cluster cluster-unknown0001 has no [[clusters]] entry" in capsys.readouterr().err


def test_the_staging_suite_runs_against_the_stand_in(shim: DoctorEnv, tmp_path: Path) -> None:
    """The `pytest -m staging` path, pointed at this environment as at a real cluster: the
    staging kit is not code that only ever skips. Its cluster must have no store yet, so init's
    goes first; afterwards the officer resets kmsuser (the staging run's connect rotated it)."""
    staging = Staging(
        config=shim.config,
        password=KNOWN,
        anchor=(shim.root / "customerCA.crt").read_text(),
        cluster_id=shim.cluster_id(),
        connect_timeout_s=60.0,
    )
    with served(staging, tmp_path / "staging-server.log") as kms:
        for store in kms.describe_custom_key_stores()["CustomKeyStores"]:
            kms.disconnect_custom_key_store(CustomKeyStoreId=store["CustomKeyStoreId"])
            kms.delete_custom_key_store(CustomKeyStoreId=store["CustomKeyStoreId"])
        assert exercise(staging, kms).startswith("left: custom key store ")
    _reset_kmsuser(shim.init, KNOWN)
