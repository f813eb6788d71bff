"""An upstream tokenizer (a hub repository's ``tokenizer.json`` and ``tokenizer_config.json``), fingerprinted the
way the GGUF vocabulary is, and compared with it: the classic re-conversion bug is a GGUF whose vocabulary,
merges, special ids or add-bos no longer match the tokenizer the model was trained with. Pure.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from typing import Any

from stacklock.errors import SourceError
from stacklock.model.findings import Finding, Link, Severity
from stacklock.model.lock import UpstreamTokenizerPin
from stacklock.model.tokenizer import TokenizerFingerprint
from stacklock.rules.builtin import BuiltinCheck, register

TOKENIZER_MISMATCH = register(
    BuiltinCheck(
        id="upstream-tokenizer-mismatch",
        family="upstream-tokenizer",
        severity=Severity.ERROR,
        title="The model file's tokenizer differs from the upstream tokenizer.json",
        links=(Link.TOKENIZER, Link.MODEL),
        explanation=(
            "The GGUF's embedded vocabulary was converted from a tokenizer that no longer matches the upstream "
            "one (a re-conversion with an old converter, or an upstream fix): prompts tokenize differently from "
            "what the model was trained on."
        ),
        fix="re-convert the model with a current llama.cpp from the upstream repository, or pin the matching revision",
    )
)


def _strings_sha256(items: Iterable[str]) -> str:
    # The GGUF string-array encoding: per item a u64 little-endian length, then its UTF-8 bytes.
    digest = hashlib.sha256()
    for item in items:
        raw = item.encode("utf-8")
        digest.update(struct.pack("<Q", len(raw)))
        digest.update(raw)
    return digest.hexdigest()


def _special(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def parse_upstream_tokenizer(
    tokenizer_json: str, config_json: str | None, *, source: str, origin: str, revision: str
) -> UpstreamTokenizerPin:
    """Fingerprint ``tokenizer.json`` (+ the special tokens of ``tokenizer_config.json``) like a GGUF vocabulary."""
    try:
        data = json.loads(tokenizer_json)
        config = json.loads(config_json) if config_json else {}
    except json.JSONDecodeError as exc:
        raise SourceError(f"tokenizer.source: {origin}: not JSON (line {exc.lineno}: {exc.msg})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise SourceError(f"tokenizer.source: {origin}: no 'model' table", hint="is this a tokenizer.json?")
    vocab = model.get("vocab")
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id = {int(i): str(t) for t, i in vocab.items() if isinstance(i, int)}
    elif isinstance(vocab, list):
        by_id = {i: str(e[0]) for i, e in enumerate(vocab) if isinstance(e, list) and e}
    for added in data.get("added_tokens") or ():
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            by_id[added["id"]] = str(added.get("content", ""))
    size = max(by_id, default=-1) + 1
    if size > 10_000_000:
        raise SourceError(f"tokenizer.source: {origin}: a token id of {size - 1} is not a vocabulary")
    tokens = [by_id.get(i, "") for i in range(size)]
    merges_raw = model.get("merges")
    merges = (
        [m if isinstance(m, str) else " ".join(map(str, m)) for m in merges_raw]
        if isinstance(merges_raw, list) and merges_raw
        else None
    )
    ids = {t: i for i, t in enumerate(tokens)}
    bos, eos = _special(config, "bos_token"), _special(config, "eos_token")
    add_bos = config.get("add_bos_token")
    return UpstreamTokenizerPin(
        source=source,
        origin=origin,
        revision=revision,
        vocab_size=size,
        tokens_sha256=_strings_sha256(tokens),
        merges_sha256=None if merges is None else _strings_sha256(merges),
        bos_id=None if bos is None else ids.get(bos),
        eos_id=None if eos is None else ids.get(eos),
        add_bos=add_bos if isinstance(add_bos, bool) else None,
    )


def compare_tokenizers(gguf: TokenizerFingerprint, upstream: UpstreamTokenizerPin) -> tuple[str, ...]:
    """What differs, in words; only what the upstream files declare is compared."""
    found = []
    if gguf.vocab_size != upstream.vocab_size:
        found.append(f"vocabulary size {gguf.vocab_size} in the GGUF, {upstream.vocab_size} upstream")
    elif gguf.tokens_sha256 != upstream.tokens_sha256:
        found.append("vocabulary: same size, different token texts")
    if upstream.merges_sha256 is not None and gguf.merges_sha256 != upstream.merges_sha256:
        found.append("merges differ")
    for label, mine, theirs in (
        ("bos id", gguf.bos_id, upstream.bos_id),
        ("eos id", gguf.eos_id, upstream.eos_id),
        ("add-bos", gguf.add_bos, upstream.add_bos),
    ):
        if theirs is not None and mine != theirs:
            found.append(f"{label} {mine} in the GGUF, {theirs} upstream")
    return tuple(found)


def tokenizer_finding(upstream: UpstreamTokenizerPin) -> Finding | None:
    if not upstream.differences:
        return None
    listed = "; ".join(upstream.differences)
    return TOKENIZER_MISMATCH.finding(
        explanation=f"{TOKENIZER_MISMATCH.explanation} Against {upstream.origin}: {listed}."
    )
