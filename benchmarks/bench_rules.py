"""Evaluate 10,000 rules against one fact set; the target is 0.2 s.

The rules are the bundled seed rules repeated (with distinct ids) until there are 10,000, so the predicates are
realistic: build ranges, PEP 440 specifiers, regexes, nested any/all. Prints the best of several runs, the ratio
to the target, and, as an in-process baseline, the time of a plain loop over the same number of dict lookups.
"""

from __future__ import annotations

import sys
import time

from stacklock.registry.files import load_bundled_registry
from stacklock.rules.predicates import Rule, evaluate

TARGET_S = 0.2
COUNT = 10_000

FACTS: dict[str, object] = {
    "model.architecture": "gemma2",
    "model.quantization": "Q4_K_M",
    "model.context-length": 8192,
    "model.block-count": 42,
    "model.tensor-types": ("F32", "Q4_K", "Q6_K"),
    "model.has-chat-template": True,
    "tokenizer.kind": "llama",
    "tokenizer.add-bos": True,
    "tokenizer.eos-id": 1,
    "tokenizer.special-texts": ("<end_of_turn>",),
    "template.present": True,
    "template.source": "gguf",
    "template.text": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}" * 20,
    "template.dialect": "jinja2",
    "template.features": ("bos-token", "raise-exception", "system-role-rejected"),
    "engine.name": "llama-cpp-python",
    "engine.version": "0.2.79",
    "engine.build": 3184,
    "backend.kind": "cuda",
    "backend.flash-attention": "off",
    "backend.cache-type-v": "f16",
    "backend.gpu-layers": -1,
    "smoke.has-system-message": True,
}


def main() -> int:
    seed = load_bundled_registry().rules
    rules: list[Rule] = []
    while len(rules) < COUNT:
        for rule in seed:
            rules.append(rule.model_copy(update={"id": f"{rule.id}-{len(rules)}"}))
            if len(rules) == COUNT:
                break
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        findings = evaluate(rules, FACTS)
        timings.append(time.perf_counter() - start)
    best = min(timings)
    start = time.perf_counter()
    for rule in rules:
        FACTS.get(rule.id)
    baseline = time.perf_counter() - start
    print(f"rules: {len(rules)}, findings: {len(findings)}")
    print(
        f"evaluate: best {best * 1000:.1f} ms, median {sorted(timings)[3] * 1000:.1f} ms (target {TARGET_S * 1000:.0f} ms)"
    )
    print(f"ratio to target: {best / TARGET_S:.2f} ({'ok' if best <= TARGET_S else 'TOO SLOW'})")
    print(
        f"baseline (one dict lookup per rule): {baseline * 1000:.2f} ms; evaluate/baseline: {best / baseline:.0f}x"
    )
    return 0 if best <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
