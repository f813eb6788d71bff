"""Facts: the flat view of a lock that registry rules are evaluated against (see :mod:`stacklock.rules`).

Pure, and light to import: `stacklock check` builds facts from a lock without reading any model file.
"""

from __future__ import annotations

from stacklock.model.lock import Lock
from stacklock.rules.predicates import AtLeast


def facts_from_lock(lock: Lock) -> dict[str, object]:
    """The flat facts registry rules are evaluated against (see stacklock.rules.predicates)."""
    facts: dict[str, object] = {
        "model.quantization": lock.model.quantization,
        "model.parameter-count": lock.model.parameter_count,
        "model.tensor-types": tuple(lock.model.tensor_types),
        "tokenizer.kind": lock.tokenizer.kind,
        "tokenizer.vocab-size": lock.tokenizer.vocab_size,
        "template.present": lock.template.text is not None,
        "template.source": lock.template.source.partition(":")[0],
        "template.dialect": lock.template.dialect,
        "template.features": lock.template.features,
        "engine.name": lock.engine.name,
        "engine.version": lock.engine.version,
        "smoke.has-system-message": any(m.role == "system" for s in lock.smoke for m in (s.messages or ())),
    }
    optional: dict[str, object | None] = {
        "model.architecture": lock.model.architecture,
        "model.context-length": lock.model.context_length,
        "model.block-count": lock.model.metadata.get(f"{lock.model.architecture}.block_count"),
        "tokenizer.pre": lock.tokenizer.pre,
        "tokenizer.add-bos": lock.tokenizer.add_bos,
        "tokenizer.add-eos": lock.tokenizer.add_eos,
        "tokenizer.bos-id": lock.tokenizer.bos_id,
        "tokenizer.eos-id": lock.tokenizer.eos_id,
        "tokenizer.eot-id": lock.tokenizer.eot_id,
        "tokenizer.eom-id": lock.tokenizer.eom_id,
        "tokenizer.bos-text": lock.tokenizer.bos_text,
        "tokenizer.eos-text": lock.tokenizer.eos_text,
        "template.text": lock.template.text,
        "template.sha256": lock.template.sha256,
        "engine.build": build_fact(lock.engine.build, exact=lock.engine.build_exact),
    }
    facts.update({k: v for k, v in optional.items() if v is not None})
    facts["tokenizer.special-texts"] = lock.model.special_texts
    facts["model.has-chat-template"] = lock.model.chat_template_sha256 is not None
    facts.update({f"gguf.{k}": v for k, v in lock.model.metadata.items()})
    for key, shape in lock.model.arrays.items():
        facts[f"gguf.{key}"] = int(shape[shape.index("[") + 1 : -1])
    # A value whose origin is unknown is left out: an unknown fact, never a guessed one.
    for key, value in lock.backend.model_dump(by_alias=True, mode="json", exclude={"origin"}).items():
        if value is not None:
            facts[f"backend.{key}"] = value
    for key, value in lock.sampler.model_dump(by_alias=True, mode="json", exclude={"origin"}).items():
        if value is not None:
            facts[f"sampler.{key}"] = tuple(value) if isinstance(value, list) else value
    return facts


def build_fact(build: int | None, *, exact: bool) -> int | AtLeast | None:
    """The ``engine.build`` fact: the exact build, or only a lower bound (rules that depend on it say so)."""
    if build is None:
        return None
    return build if exact else AtLeast(build)
