"""Parsing key, identity, session and trust policies: what is accepted, and every refusal's
message (it must name the element a person has to fix)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

from hsmbridge.errors import LimitExceededException, MalformedPolicyDocumentException
from hsmbridge.policy.document import (
    Condition,
    PolicyDocument,
    PolicyDocumentError,
    Principals,
    default_policy,
    parse_identity_policy,
    parse_key_policy,
    parse_policy,
    parse_trust_policy,
)

ROOT = "arn:aws:iam::111122223333:root"


def _key(*statements: dict[str, Any], **top: Any) -> str:
    return json.dumps({"Version": "2012-10-17", **top, "Statement": list(statements)})


def _ok(**extra: Any) -> dict[str, Any]:
    return {
        "Effect": "Allow",
        "Principal": {"AWS": ROOT},
        "Action": "kms:*",
        "Resource": "*",
    } | extra


def test_default_policy_is_unchanged() -> None:
    assert json.loads(default_policy("aws-cn", "111122223333")) == {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws-cn:iam::111122223333:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    assert parse_policy is parse_key_policy
    doc = parse_key_policy(default_policy("aws", "111122223333"))
    assert doc.version == "2012-10-17"
    assert doc.id == "key-default-1"
    [statement] = doc.statements
    assert statement.sid == "Enable IAM User Permissions"
    assert statement.principal == Principals(False, frozenset({ROOT}), frozenset(), frozenset())
    assert statement.actions == ("kms:*",)
    assert statement.resources == ("*",)
    assert statement.not_actions is None
    assert statement.conditions == ()


def test_single_values_and_lists_are_both_accepted() -> None:
    single = parse_key_policy(_key(_ok()))
    listed = parse_key_policy(
        json.dumps(
            {
                "Statement": {
                    "Effect": "Allow",
                    "Principal": {"AWS": [ROOT]},
                    "Action": ["kms:*"],
                    "Resource": ["*"],
                }
            }
        )
    )
    assert single.statements == listed.statements
    assert listed.version is None


def test_principal_forms() -> None:
    doc = parse_key_policy(
        _key(
            _ok(Principal={"AWS": ["111122223333", "arn:aws:iam::444455556666:user/a/b",
                                   "arn:aws:sts::444455556666:assumed-role/R/s"]}),
            _ok(Principal="*"),
            _ok(Principal={"AWS": "*"}),
            _ok(Principal={"Service": ["logs.amazonaws.com"],
                           "Federated": "cognito-identity.amazonaws.com"}),
            {"Effect": "Deny", "NotPrincipal": {"AWS": "arn:aws:iam::444455556666:role/x"},
             "Action": "kms:*", "Resource": "*"},
        )
    )  # fmt: skip
    first, star, aws_star, services, negated = doc.statements
    assert first.principal is not None
    assert first.principal.aws == {
        ROOT,
        "arn:aws:iam::444455556666:user/a/b",
        "arn:aws:sts::444455556666:assumed-role/R/s",
    }
    assert star.principal == Principals(True, frozenset(), frozenset(), frozenset())
    assert aws_star.principal == star.principal
    assert services.principal == Principals(
        False,
        frozenset(),
        frozenset({"logs.amazonaws.com"}),
        frozenset({"cognito-identity.amazonaws.com"}),
    )
    assert negated.principal is None
    assert negated.not_principal is not None
    assert doc.aws_principals() == first.principal.aws | {"arn:aws:iam::444455556666:role/x"}


def test_condition_values_are_rendered_as_strings() -> None:
    doc = parse_key_policy(
        _key(_ok(Condition={"Bool": {"aws:SecureTransport": True},
                            "NumericLessThan": {"kms:N": [5, 2.5]},
                            "ForAnyValue:StringLikeIfExists": {"kms:EncryptionContextKeys": "a*"}}))
    )  # fmt: skip
    assert doc.statements[0].conditions == (
        Condition("Bool", "aws:SecureTransport", ("true",)),
        Condition("NumericLessThan", "kms:N", ("5", "2.5")),
        Condition("ForAnyValue:StringLikeIfExists", "kms:EncryptionContextKeys", ("a*",)),
    )


def test_documents_are_values() -> None:
    text = _key(_ok())
    assert parse_key_policy(text) == parse_key_policy(text)
    assert hash(parse_key_policy(text)) == hash(parse_key_policy(text))


# --- key policies: refusals -----------------------------------------------------------------

KEY_REFUSALS: list[tuple[str, str]] = [
    ("{not json", "The key policy is not valid JSON: "),
    ("[]", "The key policy is not valid: the policy must be a JSON object"),
    ('{"Version": "2012-10-17"}',
     "The key policy is not valid: Statement: missing; a policy needs at least one statement"),
    ('{"Statement": []}',
     "The key policy is not valid: Statement: is empty; a policy needs at least one statement"),
    (_key(_ok(), Version="2012-10-18"),
     "The key policy is not valid: Version: must be \"2012-10-17\" or \"2008-10-17\", "
     "got '2012-10-18'"),
    (json.dumps({"Statement": [_ok()], "Extra": 1}),
     'The key policy is not valid: unknown top-level element "Extra"'),
    (_key(_ok(), Id=5), "The key policy is not valid: Id: must be a string"),
    (_key("x"), "The key policy is not valid: Statement[0]: must be a JSON object"),  # type: ignore[arg-type]
    (_key(_ok(), _ok(Effect="allow")),
     "The key policy is not valid: Statement[1].Effect: must be \"Allow\" or \"Deny\", "
     "got 'allow'"),
    (_key({"Effect": "Allow", "Action": "kms:*", "Resource": "*"}),
     "The key policy is not valid: Statement[0]: has no Principal; every key policy "
     "statement needs one"),
    (_key(_ok(NotPrincipal={"AWS": ROOT})),
     "The key policy is not valid: Statement[0]: has both Principal and NotPrincipal; use one"),
    (_key(_ok(NotAction="kms:Decrypt")),
     "The key policy is not valid: Statement[0]: has both Action and NotAction; use one"),
    (_key(_ok(NotResource="*")),
     "The key policy is not valid: Statement[0]: has both Resource and NotResource; use one"),
    (_key(_ok(Sid=1)), "The key policy is not valid: Statement[0].Sid: must be a string"),
    (_key(_ok(Principals="*")),
     'The key policy is not valid: Statement[0]: unknown element "Principals"'),
    (_key(_ok(Action=[])), "The key policy is not valid: Statement[0].Action: must name at "
     "least one value"),
    (_key(_ok(Action=["kms:Encrypt", 3])),
     "The key policy is not valid: Statement[0].Action: must be a non-empty string or a list "
     "of them, got 3"),
    (_key(_ok(Principal={"AWS": "bob"})),
     'Policy contains a statement with one or more invalid principals. Statement[0].Principal'
     '.AWS: "bob" is not an account id or the ARN of an account root, IAM user, IAM role or '
     "assumed-role session"),
    (_key(_ok(Principal={"AWS": "arn:aws:iam::1111:root"})),
     "Policy contains a statement with one or more invalid principals. "),
    (_key(_ok(Principal={"AWS": "arn:aws:s3:::bucket"})),
     "Policy contains a statement with one or more invalid principals. "),
    (_key(_ok(Principal={"AWS": "arn:aws:iam::111122223333:group/admins"})),
     "Policy contains a statement with one or more invalid principals. "),
    (_key(_ok(Principal={})),
     'The key policy is not valid: Statement[0].Principal: must be "*" or an object with '
     '"AWS", "Service" or "Federated"'),
    (_key(_ok(Principal="arn:aws:iam::111122223333:root")),
     'The key policy is not valid: Statement[0].Principal: must be "*" or an object'),
    (_key(_ok(Principal={"CanonicalUser": "abc"})),
     'The key policy is not valid: Statement[0].Principal: unknown principal type '
     '"CanonicalUser" (use AWS, Service or Federated)'),
    (_key(_ok(Principal={"AWS": None})),
     "The key policy is not valid: Statement[0].Principal.AWS: must be a non-empty string"),
    (_key(_ok(Condition="x")),
     "The key policy is not valid: Statement[0].Condition: must be an object of operators"),
    (_key(_ok(Condition={"StringEquals": "x"})),
     "The key policy is not valid: Statement[0].Condition.StringEquals: must be an object of "
     "condition keys and values"),
    (_key(_ok(Condition={"StringEq": {"a": "b"}})),
     'The key policy is not valid: Statement[0].Condition: unknown operator "StringEq"'),
    (_key(_ok(Condition={"ForSomeValues:StringEquals": {"a": "b"}})),
     'The key policy is not valid: Statement[0].Condition: unknown operator '
     '"ForSomeValues:StringEquals"'),
    (_key(_ok(Condition={"NullIfExists": {"a": "true"}})),
     'The key policy is not valid: Statement[0].Condition: unknown operator "NullIfExists"'),
    (_key(_ok(Condition={"StringEquals": {"a": {"b": "c"}}})),
     "The key policy is not valid: Statement[0].Condition.StringEquals.a: values must be "
     "strings, numbers or booleans"),
    (_key(_ok(Condition={"StringEquals": {"a": None}})),
     "The key policy is not valid: Statement[0].Condition.StringEquals.a: values must be"),
    (_key(_ok(Condition={"NumericLessThan": {"n": "five"}})),
     'The key policy is not valid: Statement[0].Condition: NumericLessThan needs numbers, '
     'got "five"'),
    (_key(_ok(Condition={"DateGreaterThan": {"aws:CurrentTime": "yesterday"}})),
     'The key policy is not valid: Statement[0].Condition: DateGreaterThan needs ISO 8601 '
     'dates or epoch seconds, got "yesterday"'),
    (_key(_ok(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/33"}})),
     'The key policy is not valid: Statement[0].Condition: IpAddress needs IP addresses or '
     'CIDR blocks, got "10.0.0.0/33"'),
    (_key(_ok(Condition={"Null": {"a": "yes"}})),
     'The key policy is not valid: Statement[0].Condition: Null takes "true" or "false", '
     'got "yes"'),
    (_key(_ok(Condition={"StringEquals": {"": "x"}})),
     "The key policy is not valid: Statement[0].Condition.StringEquals: a condition key is "
     "empty"),
    ('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", '
     '"Sid": "caf\u00e9\u0100"}]}',
     "The key policy contains characters outside tab, LF, CR and \\u0020-\\u00FF."),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), KEY_REFUSALS)
def test_key_policy_refusals(text: str, message: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        parse_key_policy(text)
    assert caught.value.message.startswith(message), caught.value.message


def test_key_policy_size_quota() -> None:
    statement = _ok(Sid="x" * (32 * 1024))
    with pytest.raises(LimitExceededException, match="larger than the 32768-byte"):
        parse_key_policy(_key(statement))
    padded = _key(_ok())
    padded += " " * (32 * 1024 - len(padded))
    assert parse_key_policy(padded).statements


def test_key_policy_statement_without_action_or_resource_is_accepted() -> None:
    doc = parse_key_policy(_key({"Effect": "Allow", "Principal": "*"}))
    assert doc.statements[0].actions is None
    assert doc.statements[0].resources is None


def test_key_policy_accepts_not_principal_alone() -> None:
    doc = parse_key_policy(
        _key({"Effect": "Deny", "NotPrincipal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"})
    )
    assert doc.statements[0].not_principal is not None


# --- identity, session and trust policies ----------------------------------------------------

IDENTITY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt",
                                                    "Resource": "*"}]}  # fmt: skip


def test_identity_policy_forms() -> None:
    text = json.dumps(IDENTITY)
    expected = parse_identity_policy(IDENTITY)
    assert parse_identity_policy(text) == expected
    assert parse_identity_policy(urllib.parse.quote(text)) == expected
    assert parse_identity_policy("  " + urllib.parse.quote(text).replace("%7B", "%7b")) == expected
    assert parse_identity_policy(urllib.parse.quote(text, safe="")) == expected
    assert expected.statements[0].principal is None


IDENTITY_REFUSALS: list[tuple[Any, str]] = [
    ("{oops", "the policy is not valid JSON: "),
    ("%7Boops", "the policy is not valid JSON: "),
    ([], "the policy must be a JSON object"),
    ({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}]},
     "Statement[0].Principal: identity-based and session policies cannot name a principal"),
    ({"Statement": [{"Effect": "Allow", "NotPrincipal": {"AWS": ROOT}, "Action": "kms:*",
                     "Resource": "*"}]},
     "Statement[0].NotPrincipal: identity-based and session policies cannot name a principal"),
    ({"Statement": [{"Effect": "Allow", "Resource": "*"}]},
     "Statement[0]: has no Action or NotAction"),
    ({"Statement": [{"Effect": "Allow", "Action": "kms:*"}]},
     "Statement[0]: has no Resource or NotResource"),
    ({"Statement": [{"Effect": "Allow", "Action": "Encrypt", "Resource": "*"}]},
     'Statement[0].Action: "Encrypt" needs a service prefix, e.g. "kms:Encrypt"'),
    ({"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
                    {"Effect": "Allow", "Action": "kms:*", "Resource": "*",
                     "Condition": {"StringEq": {"k": "v"}}}]},
     'Statement[1].Condition: unknown operator "StringEq"'),
    ({"Statement": [{"Effect": "Deny", "Action": "kms:*", "NotAction": "kms:Decrypt",
                     "Resource": "*"}]},
     "Statement[0]: has both Action and NotAction; use one"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "message"), IDENTITY_REFUSALS)
def test_identity_policy_refusals(doc: Any, message: str) -> None:
    with pytest.raises(PolicyDocumentError) as caught:
        parse_identity_policy(doc)
    assert str(caught.value).startswith(message), str(caught.value)


def test_policy_document_error_is_a_value_error() -> None:
    assert issubclass(PolicyDocumentError, ValueError)


def test_trust_policy() -> None:
    doc = parse_trust_policy(
        {
            "Version": "2012-10-17",
            "Statement": {
                "Effect": "Allow",
                "Principal": {"AWS": "444455556666"},
                "Action": "sts:AssumeRole",
            },
        }
    )
    assert isinstance(doc, PolicyDocument)
    assert doc.aws_principals() == {"arn:aws:iam::444455556666:root"}
    assert doc.statements[0].resources is None
    quoted = urllib.parse.quote(json.dumps({"Statement": [{"Effect": "Allow", "Principal": {
        "Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))  # fmt: skip
    assert parse_trust_policy(quoted).statements[0].principal is not None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole"}]},
         "Statement[0]: has no Principal; every trust policy statement needs one"),
        ({"Statement": [{"Effect": "Allow", "Principal": {"AWS": "someone"},
                         "Action": "sts:AssumeRole"}]},
         'Statement[0].Principal.AWS: "someone" is not an account id'),
        ({"Statement": [{"Effect": "Allow", "Principal": "*"}]},
         "Statement[0]: has no Action or NotAction"),
    ],
)  # fmt: skip
def test_trust_policy_refusals(doc: Any, message: str) -> None:
    with pytest.raises(PolicyDocumentError) as caught:
        parse_trust_policy(doc)
    assert str(caught.value).startswith(message), str(caught.value)


def test_documents_nested_past_the_interpreters_limit_are_malformed_not_a_crash() -> None:
    deep = "[" * 16_000 + "]" * 16_000  # within the 32 KiB quota
    with pytest.raises(MalformedPolicyDocumentException, match="nested too deeply"):
        parse_key_policy(deep)
    with pytest.raises(PolicyDocumentError, match="nested too deeply"):
        parse_identity_policy(deep)
