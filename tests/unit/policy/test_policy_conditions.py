"""Condition operators, set qualifiers, missing keys, policy variables and the matching helpers,
each checked through a one-statement identity policy the way a request meets it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from hsmbridge.policy import matching
from hsmbridge.policy.conditions import ConditionError, parse_operator
from hsmbridge.policy.document import parse_identity_policy
from hsmbridge.policy.evaluation import ConditionValue, RequestFacts, evaluate

KEY = "arn:aws:kms:us-east-1:111122223333:key/k1"
USER = "arn:aws:iam::111122223333:user/alice"


def _request(keys: dict[str, ConditionValue], resource: str = KEY) -> RequestFacts:
    return RequestFacts("kms:Encrypt", resource, USER, "111122223333", "User", None, keys)


def holds(
    operator: str,
    key: str,
    values: Any,
    keys: dict[str, ConditionValue],
    version: str = "2012-10-17",
) -> bool:
    doc = parse_identity_policy(
        {
            "Version": version,
            "Statement": [
                {"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*",
                 "Condition": {operator: {key: values}}}
            ],
        }
    )  # fmt: skip
    return evaluate(doc, _request(keys), label="p", resource_policy=False).allow is not None


CASES: list[tuple[str, str, Any, dict[str, ConditionValue], bool]] = [
    # -- strings ---------------------------------------------------------------------------------
    ("StringEquals", "k", "a", {"k": "a"}, True),
    ("StringEquals", "k", "a", {"k": "A"}, False),
    ("StringEquals", "k", ["x", "a"], {"k": "a"}, True),  # values within a key are ORed
    ("StringEquals", "K", "a", {"k": "a"}, True),  # key names are case-insensitive
    ("StringEquals", "k", "a", {}, False),
    ("StringEquals", "k", "true", {"k": True}, True),
    ("StringEquals", "k", 5, {"k": 5}, True),
    ("StringNotEquals", "k", "a", {"k": "b"}, True),
    ("StringNotEquals", "k", ["a", "b"], {"k": "b"}, False),  # no value may match
    ("StringNotEquals", "k", "a", {}, True),  # negated operators hold for a missing key
    ("StringEqualsIgnoreCase", "k", "ABC", {"k": "abc"}, True),
    ("StringEqualsIgnoreCase", "k", "ABC", {"k": "abd"}, False),
    ("StringNotEqualsIgnoreCase", "k", "ABC", {"k": "abc"}, False),
    ("StringNotEqualsIgnoreCase", "k", "ABC", {"k": "xyz"}, True),
    ("StringLike", "k", "a*c", {"k": "abbbc"}, True),
    ("StringLike", "k", "a?c", {"k": "abc"}, True),
    ("StringLike", "k", "a?c", {"k": "abbc"}, False),
    ("StringLike", "k", "A*", {"k": "abc"}, False),  # case-sensitive
    ("StringLike", "k", "a.c", {"k": "abc"}, False),  # regex characters are literal
    ("StringNotLike", "k", "a*", {"k": "abc"}, False),
    ("StringNotLike", "k", "a*", {"k": "xbc"}, True),
    ("StringNotLike", "k", "a*", {}, True),
    ("StringEqualsIfExists", "k", "a", {}, True),
    ("StringEqualsIfExists", "k", "a", {"k": "b"}, False),
    ("StringNotEqualsIfExists", "k", "a", {"k": "a"}, False),
    # -- numbers -------------------------------------------------------------------------------
    ("NumericEquals", "n", "10", {"n": 10}, True),
    ("NumericEquals", "n", "10", {"n": "10.0"}, True),
    ("NumericEquals", "n", 10, {"n": "abc"}, False),
    ("NumericNotEquals", "n", "10", {"n": 11}, True),
    ("NumericNotEquals", "n", "10", {"n": 10}, False),
    ("NumericLessThan", "n", "10", {"n": 9.5}, True),
    ("NumericLessThan", "n", "10", {"n": 10}, False),
    ("NumericLessThanEquals", "n", "10", {"n": 10}, True),
    ("NumericGreaterThan", "n", "10", {"n": 10}, False),
    ("NumericGreaterThan", "n", "10", {"n": 11}, True),
    ("NumericGreaterThanEquals", "n", "10", {"n": 10}, True),
    ("NumericLessThan", "n", "10", {}, False),
    ("NumericNotEquals", "n", "10", {}, True),
    ("NumericLessThanIfExists", "n", "10", {}, True),
    ("NumericGreaterThan", "n", "1", {"n": True}, False),
    # -- dates ---------------------------------------------------------------------------------
    ("DateLessThan", "t", "2030-01-01T00:00:00Z", {"t": datetime(2029, 1, 1, tzinfo=UTC)}, True),
    ("DateLessThan", "t", "2030-01-01T00:00:00Z", {"t": datetime(2031, 1, 1, tzinfo=UTC)}, False),
    ("DateGreaterThan", "t", "2020-01-01", {"t": "2020-01-02T00:00:00Z"}, True),
    ("DateEquals", "t", "2020-01-01T00:00:00Z", {"t": 1577836800}, True),
    ("DateEquals", "t", "1577836800", {"t": "2020-01-01T00:00:00+00:00"}, True),
    ("DateNotEquals", "t", "1577836800", {"t": "2020-01-01T00:00:01Z"}, True),
    ("DateLessThanEquals", "t", "2020-01-01T00:00:00Z", {"t": "2020-01-01T00:00:00Z"}, True),
    ("DateGreaterThanEquals", "t", "2020-01-01T01:00:00+01:00", {"t": "2020-01-01T00:00:00Z"},
     True),
    ("DateLessThan", "t", "2030-01-01", {"t": "not a date"}, False),
    ("DateLessThan", "t", "2030-01-01", {}, False),
    ("DateLessThanIfExists", "t", "2030-01-01", {}, True),
    # -- Bool, Binary ----------------------------------------------------------------------------
    ("Bool", "b", "true", {"b": True}, True),
    ("Bool", "b", True, {"b": "TRUE"}, True),
    ("Bool", "b", "true", {"b": False}, False),
    ("Bool", "b", "false", {}, False),
    ("BoolIfExists", "b", "false", {}, True),
    ("BinaryEquals", "x", "QmluYXJ5VmFsdWU=", {"x": "QmluYXJ5VmFsdWU="}, True),
    ("BinaryEquals", "x", "QmluYXJ5VmFsdWU=", {"x": "qmluyxj5vmfsdwu="}, False),
    # -- IP addresses ----------------------------------------------------------------------------
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", {"aws:SourceIp": "203.0.113.7"}, True),
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", {"aws:SourceIp": "203.0.114.7"}, False),
    ("IpAddress", "aws:SourceIp", "203.0.113.7", {"aws:SourceIp": "203.0.113.7"}, True),
    ("IpAddress", "aws:SourceIp", "2001:db8::/32", {"aws:SourceIp": "2001:db8:1::5"}, True),
    ("IpAddress", "aws:SourceIp", "2001:db8::/32", {"aws:SourceIp": "203.0.113.7"}, False),
    ("IpAddress", "aws:SourceIp", "10.0.0.0/8", {"aws:SourceIp": "garbage"}, False),
    ("IpAddress", "aws:SourceIp", "10.0.0.0/8", {}, False),
    ("NotIpAddress", "aws:SourceIp", ["10.0.0.0/8", "192.168.0.0/16"],
     {"aws:SourceIp": "192.168.1.1"}, False),
    ("NotIpAddress", "aws:SourceIp", "10.0.0.0/8", {"aws:SourceIp": "11.0.0.1"}, True),
    ("NotIpAddress", "aws:SourceIp", "10.0.0.0/8", {}, True),
    # -- ARNs ------------------------------------------------------------------------------------
    ("ArnEquals", "aws:SourceArn", "arn:aws:s3:::bucket", {"aws:SourceArn": "arn:aws:s3:::bucket"},
     True),
    ("ArnLike", "aws:SourceArn", "arn:aws:iam::*:role/app*",
     {"aws:SourceArn": "arn:aws:iam::111122223333:role/app-1"}, True),
    ("ArnLike", "aws:SourceArn", "arn:aws:iam::*:role/app*",
     {"aws:SourceArn": "arn:aws:iam::111122223333:user/app-1"}, False),
    # a pattern of fewer than six parts is compared as a whole
    ("ArnLike", "aws:SourceArn", "arn:aws:kms:*:key/k1",
     {"aws:SourceArn": "arn:aws:kms:us-east-1:111122223333:key/k1"}, True),
    # otherwise each part on its own: a wildcard never spans into the next part
    ("ArnLike", "aws:SourceArn", "arn:aws:kms:*:*:key/k1",
     {"aws:SourceArn": "arn:aws:kms:us-east-1:111122223333:alias/x:key/k1"}, False),
    ("ArnLike", "aws:SourceArn", "arn:aws:kms:*:111122223333:key/*",
     {"aws:SourceArn": "arn:aws:kms:us-east-1:111122223333:key/k1"}, True),
    ("ArnLike", "aws:SourceArn", "arn:aws:kms:us-*:*:key/*",
     {"aws:SourceArn": "arn:aws:kms:eu-west-1:111122223333:key/k1"}, False),
    ("ArnLike", "aws:SourceArn", "arn:aws:s3:::Bucket/*",
     {"aws:SourceArn": "arn:aws:s3:::bucket/x"}, False),
    ("ArnNotEquals", "aws:SourceArn", "arn:aws:s3:::b", {"aws:SourceArn": "arn:aws:s3:::c"}, True),
    ("ArnNotLike", "aws:SourceArn", "arn:aws:s3:::b*", {"aws:SourceArn": "arn:aws:s3:::bx"}, False),
    ("ArnNotLike", "aws:SourceArn", "arn:aws:s3:::b*", {}, True),
    ("ArnLike", "aws:SourceArn", "arn:aws:s3:::b*", {}, False),
    # -- Null ------------------------------------------------------------------------------------
    ("Null", "k", "true", {}, True),
    ("Null", "k", "true", {"k": "v"}, False),
    ("Null", "k", "false", {"k": "v"}, True),
    ("Null", "k", "false", {}, False),
    ("Null", "k", "true", {"k": []}, True),
    # -- set qualifiers over multivalued keys ----------------------------------------------------
    ("ForAllValues:StringEquals", "ks", ["a", "b"], {"ks": ["a"]}, True),
    ("ForAllValues:StringEquals", "ks", ["a", "b"], {"ks": ["a", "b"]}, True),
    ("ForAllValues:StringEquals", "ks", ["a", "b"], {"ks": ["a", "c"]}, False),
    ("ForAllValues:StringEquals", "ks", ["a", "b"], {"ks": []}, True),
    ("ForAllValues:StringEquals", "ks", ["a", "b"], {}, True),
    ("ForAllValues:StringLike", "ks", "a*", {"ks": ["ab", "ac"]}, True),
    ("ForAllValues:StringNotEquals", "ks", ["a"], {"ks": ["b", "c"]}, True),
    ("ForAllValues:StringNotEquals", "ks", ["a"], {"ks": ["b", "a"]}, False),
    ("ForAnyValue:StringEquals", "ks", ["a"], {"ks": ["x", "a"]}, True),
    ("ForAnyValue:StringEquals", "ks", ["a"], {"ks": ["x", "y"]}, False),
    ("ForAnyValue:StringEquals", "ks", ["a"], {"ks": []}, False),
    ("ForAnyValue:StringEquals", "ks", ["a"], {}, False),
    ("ForAnyValue:StringNotEquals", "ks", ["a"], {"ks": ["a", "b"]}, True),
    ("ForAnyValue:StringNotEquals", "ks", ["a"], {"ks": ["a"]}, False),
    ("ForAnyValue:StringEqualsIfExists", "ks", ["a"], {}, True),
    ("forallvalues:stringequals", "ks", ["a"], {"ks": ["a"]}, True),
    # a multivalued key without a qualifier: one value suffices, or none may match when negated
    ("StringEquals", "ks", "a", {"ks": ["x", "a"]}, True),
    ("StringNotEquals", "ks", "a", {"ks": ["x", "a"]}, False),
    ("StringNotEquals", "ks", "a", {"ks": ["x", "y"]}, True),
    # -- policy variables ------------------------------------------------------------------------
    ("StringEquals", "aws:ResourceTag/Owner", "${aws:username}",
     {"aws:username": "alice", "aws:ResourceTag/Owner": "alice"}, True),
    ("StringEquals", "aws:ResourceTag/Owner", "${aws:username}",
     {"aws:username": "alice", "aws:ResourceTag/Owner": "bob"}, False),
    ("StringEquals", "aws:ResourceTag/Owner", "${aws:username}", {"aws:ResourceTag/Owner": "x"},
     False),
    ("StringNotEquals", "aws:ResourceTag/Owner", "${aws:username}", {"aws:ResourceTag/Owner": "x"},
     True),
    ("StringEquals", "aws:ResourceTag/Owner", "${aws:UserName}",
     {"aws:username": "alice", "aws:ResourceTag/Owner": "alice"}, True),
    ("StringEquals", "t", "team-${aws:PrincipalAccount}", {"t": "team-111122223333"}, True),
    ("StringEquals", "t", "${aws:PrincipalType}", {"t": "User"}, True),
    ("StringEquals", "t", "${aws:PrincipalArn}", {"t": USER}, True),
    ("StringEquals", "t", "${kms:CallerAccount, 'none'}", {"t": "none"}, True),
    ("StringEquals", "t", "${kms:CallerAccount, 'none'}", {"t": "9", "kms:CallerAccount": "9"},
     True),
    ("StringEquals", "t", "a${*}b", {"t": "a*b"}, True),
    ("StringLike", "t", "a${*}b", {"t": "axb"}, False),
    ("StringLike", "t", "a${*}b", {"t": "a*b"}, True),
    ("StringLike", "t", "${?}*", {"t": "?abc"}, True),
    ("StringLike", "t", "${?}*", {"t": "xabc"}, False),
    ("StringEquals", "t", "${$}{x}", {"t": "${x}"}, True),
    ("StringLike", "t", "home/${aws:username}/*", {"aws:username": "a*", "t": "home/a*/x"}, True),
    ("StringLike", "t", "home/${aws:username}/*", {"aws:username": "a*", "t": "home/ab/x"}, False),
    ("ArnLike", "aws:SourceArn", "arn:aws:iam::${aws:PrincipalAccount}:role/*",
     {"aws:SourceArn": "arn:aws:iam::111122223333:role/r"}, True),
    ("ArnLike", "aws:SourceArn", "arn:aws:iam::${aws:PrincipalAccount}:role/*",
     {"aws:SourceArn": "arn:aws:iam::444455556666:role/r"}, False),
    ("StringEquals", "t", "${ks}", {"t": "a", "ks": ["a"]}, False),  # multivalued: no variable
]  # fmt: skip


@pytest.mark.parametrize(("operator", "key", "values", "keys", "expected"), CASES)
def test_operator(
    operator: str, key: str, values: Any, keys: dict[str, ConditionValue], expected: bool
) -> None:
    assert holds(operator, key, values, keys) is expected


def test_variables_need_version_2012() -> None:
    keys: dict[str, ConditionValue] = {"aws:username": "alice", "t": "${aws:username}"}
    assert holds("StringEquals", "t", "${aws:username}", keys, version="2008-10-17")
    assert not holds("StringEquals", "t", "${aws:username}", keys)
    assert holds("StringEquals", "t", "${aws:username}", {"aws:username": "alice", "t": "alice"})


def test_all_condition_blocks_must_hold() -> None:
    doc = parse_identity_policy(
        {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*",
            "Condition": {"StringEquals": {"a": "1", "b": "2"}, "Bool": {"c": "true"}}}]}
    )  # fmt: skip

    def allowed(keys: dict[str, ConditionValue]) -> bool:
        return evaluate(doc, _request(keys), label="p", resource_policy=False).allow is not None

    assert allowed({"a": "1", "b": "2", "c": True})
    assert not allowed({"a": "1", "b": "2", "c": False})
    assert not allowed({"a": "1", "c": True})
    assert not allowed({"a": "x", "b": "2", "c": True})


def test_resource_variables() -> None:
    doc = parse_identity_policy(
        {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "kms:*",
            "Resource": "arn:aws:kms:*:${aws:PrincipalAccount}:key/*"}]}
    )  # fmt: skip
    assert evaluate(doc, _request({}), label="p", resource_policy=False).allow is not None
    other = "arn:aws:kms:us-east-1:444455556666:key/k1"
    assert evaluate(doc, _request({}, other), label="p", resource_policy=False).allow is None


@pytest.mark.parametrize(
    "name",
    ["StringEq", "StringEqualsIfExistsIfExists", "ForAny:StringEquals", "Numeric", "DateLike",
     "IpAddressLike", "NullIfExists", "Arn", "ForAllValues:"],
)  # fmt: skip
def test_unknown_operators(name: str) -> None:
    with pytest.raises(ConditionError, match=f'unknown operator "{name}"'):
        parse_operator(name)


def test_operator_parsing() -> None:
    op = parse_operator("ForAnyValue:StringLikeIfExists")
    assert (op.family, op.compare, op.negated, op.if_exists, op.set_op) == (
        "string", "like", False, True, "any",
    )  # fmt: skip
    op = parse_operator("NotIpAddress")
    assert (op.family, op.negated, op.set_op) == ("ip", True, None)
    op = parse_operator("ForAllValues:DateNotEquals")
    assert (op.family, op.compare, op.negated, op.set_op) == ("date", "eq", True, "all")


# --- matching helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "anything:at/all", True),
        ("arn:aws:kms:*:111122223333:key/*", "arn:aws:kms:us-east-1:111122223333:key/k", True),
        ("arn:aws:kms:*:111122223333:key/*", "arn:aws:kms:us-east-1:444455556666:key/k", False),
        ("arn:aws:kms:us-?ast-1:*:key/k", "arn:aws:kms:us-east-1:1:key/k", True),
        ("arn:aws:kms:*", "arn:aws:kms:us-east-1:1:key/k", True),
        ("arn:aws:kms:us-east-1:1:key/K", "arn:aws:kms:us-east-1:1:key/k", False),
        ("arn:aws:kms:us-east-1:1:key/k", "*", False),
        ("arn:aws:s3:::bucket/a:b*", "arn:aws:s3:::bucket/a:bc:d", True),
    ],
)
def test_arn_match(pattern: str, value: str, expected: bool) -> None:
    assert matching.arn_match(pattern, value) is expected


def test_wildcard_patterns_are_compiled_once() -> None:
    matching.wildcard_match("kms:Gen*Pair", "kms:GenerateDataKeyPair", ignore_case=True)
    before = matching._wildcard.cache_info()
    for _ in range(5):
        assert matching.wildcard_match("kms:Gen*Pair", "kms:GenerateDataKeyPair", ignore_case=True)
    after = matching._wildcard.cache_info()
    assert after.misses == before.misses
    assert after.hits == before.hits + 5


def test_documents_compile_once() -> None:
    doc = parse_identity_policy(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*",
                                                 "Resource": "*"}]}
    )  # fmt: skip
    evaluate(doc, _request({}), label="p", resource_policy=False)
    compiled = doc._compiled
    assert compiled is not None
    evaluate(doc, _request({"x": "y"}), label="p", resource_policy=False)
    assert doc._compiled is compiled


def test_principal_arn_forms() -> None:
    assert matching.is_principal_arn("111122223333")
    assert matching.is_principal_arn("arn:aws:iam::111122223333:root")
    assert matching.is_principal_arn("arn:aws-us-gov:iam::111122223333:user/path/bob")
    assert matching.is_principal_arn("arn:aws:iam::111122223333:role/service-role/r")
    assert matching.is_principal_arn("arn:aws:sts::111122223333:assumed-role/r/s@x.com")
    assert not matching.is_principal_arn("11112222333")
    assert not matching.is_principal_arn("arn:aws:iam::111122223333:group/g")
    assert not matching.is_principal_arn("arn:aws:sts::111122223333:assumed-role/r")
    assert matching.root_account("arn:aws:iam::111122223333:root") == "111122223333"
    assert matching.root_account("arn:aws:iam::111122223333:user/root") is None
