"""Tags on KMS keys: validation and TagResource / UntagResource / ListResourceTags.

Owns: the tag rules (key 1-128, value 0-256, at most 50 per key, `aws:` prefix reserved) and the
three tag operations. Must not import protocol, http or cli.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from hsmbridge.errors import InvalidMarkerException, TagException
from hsmbridge.model import Page, Tag
from hsmbridge.policy.evaluation import ConditionValue
from hsmbridge.request import RequestContext
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.lookup import KeyLookup, require_not_pending

MAX_TAGS_PER_KEY = 50
MAX_TAG_KEY_LENGTH = 128


def validate_tags(tags: Iterable[Tag]) -> None:
    tags = tuple(tags)
    if len(tags) > MAX_TAGS_PER_KEY:  # checked before any lookup or transaction (request limit)
        raise TagException(
            f"A request can carry at most {MAX_TAGS_PER_KEY} tags; this one has {len(tags)}."
        )
    seen: set[str] = set()
    for tag in tags:
        if not 1 <= len(tag.key) <= MAX_TAG_KEY_LENGTH:
            raise TagException(f"Tag key {tag.key!r} must be 1 to 128 characters long.")
        if len(tag.value) > 256:
            raise TagException(f"The value of tag {tag.key!r} must be at most 256 characters.")
        # NOTE: [U] for KMS specifically; the general AWS tagging rules reserve the prefix.
        if tag.key.lower().startswith("aws:"):
            raise TagException(f"Tag keys beginning with 'aws:' are reserved: {tag.key!r}.")
        if tag.key in seen:
            raise TagException(f"Duplicate tag key {tag.key!r} in one request.")
        seen.add(tag.key)


class TagService:
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup) -> None:
        self._ctx = ctx
        self._lookup = lookup

    def tag(self, caller: RequestContext, key_ref: str, tags: tuple[Tag, ...]) -> None:
        """TagResource: overwrites values of existing keys. Raises TagException, KMSInvalidState."""
        validate_tags(tags)
        with self._ctx.meta.write():
            record = self._lookup.resolve(caller, key_ref, allow_alias=False)
            request: dict[str, ConditionValue] = {f"aws:RequestTag/{t.key}": t.value for t in tags}
            request["aws:TagKeys"] = tuple(t.key for t in tags)
            self._ctx.authorize_key(caller, "kms:TagResource", record, keys=request)
            require_not_pending(record)
            merged = {t.key: t for t in record.tags}
            merged.update({t.key: t for t in tags})
            if len(merged) > MAX_TAGS_PER_KEY:
                raise TagException(
                    f"A KMS key can have at most {MAX_TAGS_PER_KEY} tags; this request would "
                    f"give {record.arn} {len(merged)}."
                )
            self._ctx.meta.put_key(replace(record, tags=tuple(merged.values())))

    def untag(self, caller: RequestContext, key_ref: str, tag_keys: tuple[str, ...]) -> None:
        """UntagResource: unknown tag keys are ignored, as in KMS."""
        with self._ctx.meta.write():
            record = self._lookup.resolve(caller, key_ref, allow_alias=False)
            self._ctx.authorize_key(
                caller, "kms:UntagResource", record, keys={"aws:TagKeys": tag_keys}
            )
            require_not_pending(record)
            remaining = tuple(t for t in record.tags if t.key not in set(tag_keys))
            self._ctx.meta.put_key(replace(record, tags=remaining))

    def list(
        self, caller: RequestContext, key_ref: str, limit: int | None, marker: str | None
    ) -> Page[Tag]:
        """ListResourceTags (Limit 1-50, default 50); the marker is the last tag key returned.

        The next page starts after the marker in key order, so a marker whose tag was removed
        (or changed) between pages still resumes where the previous page ended. Only a marker
        that cannot be a tag key is refused (InvalidMarkerException)."""
        record = self._lookup.resolve(caller, key_ref, allow_alias=False)
        self._ctx.authorize_key(caller, "kms:ListResourceTags", record)
        if marker is not None and not 1 <= len(marker) <= MAX_TAG_KEY_LENGTH:
            raise InvalidMarkerException("The Marker is not one that ListResourceTags returned.")
        ordered = sorted(record.tags, key=lambda t: t.key)
        if marker is not None:
            ordered = [t for t in ordered if t.key > marker]
        size = limit or 50
        items = tuple(ordered[:size])
        return Page(items, items[-1].key if len(ordered) > size else None)
