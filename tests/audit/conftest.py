"""Helpers for the key-label audit tests: keys made through the service, HSM objects changed
behind hsmbridge's back with `pkcs11-tool` (a separate process, as an operator would), and the CLI
run in-process through `hsmbridge.main.main`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from hsmbridge.main import main
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN
from tests.conftest import SOFTHSM_MODULE
from tests.harness import KmsEnv


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)

    def kinds(self) -> list[tuple[str, str]]:
        """(kind, severity) of every finding, sorted."""
        return sorted((f["kind"], f["severity"]) for f in self.json["findings"])


def create_keys(env: KmsEnv, n: int) -> list[str]:
    """n keys in the env's store, through the service; returns their ARNs."""
    return [
        env.svc.keys.create(
            ADMIN, CreateKeyRequest(custom_key_store_id=env.store_id, origin="AWS_CLOUDHSM")
        ).arn
        for _ in range(n)
    ]


def pkcs11_tool(env: KmsEnv, *args: str) -> str:
    """Run pkcs11-tool against the env's token as the crypto user (PIN never echoed back)."""
    argv = [
        "pkcs11-tool",
        "--module",
        SOFTHSM_MODULE,
        "--token-label",
        env.token_label,
        "--login",
        "--pin",
        env.password,
        *args,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    return done.stdout


def keygen(env: KmsEnv, label: str, *flags: str) -> None:
    """A persistent AES-256 key made outside hsmbridge (no --sensitive: CKA_SENSITIVE false)."""
    pkcs11_tool(env, "--keygen", "--key-type", "AES:32", "--label", label, *flags)


def delete_object(env: KmsEnv, label: str) -> None:
    pkcs11_tool(env, "--delete-object", "--type", "secrkey", "--label", label)


def drop_metadata_row(env: KmsEnv, arn: str) -> None:
    """Forget a KMS key in hsmbridge's metadata only: its material becomes an orphan."""
    key_id = arn.rsplit("/", 1)[1]
    with env.svc.ctx.meta.write():
        env.svc.ctx.meta.delete_key(key_id)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    def run(*argv: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before this command
        code = main(list(argv))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def audit(run_cli: Callable[..., CliResult]) -> Callable[..., CliResult]:
    """`hsmbridge audit` on an env's store with JSON output; extra args go after the defaults."""

    def run(env: KmsEnv, *extra: str, sub: tuple[str, ...] = ()) -> CliResult:
        assert env.store_id is not None
        base = ["--config", str(env.config_path), "--keystore", env.store_id]
        return run_cli("audit", *sub, *base, "--output", "json", *extra)

    return run
