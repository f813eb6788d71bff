"""The base of every pydantic model that crosses a trust boundary (manifest, lock, registry, engine replies)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def kebab(name: str) -> str:
    """TOML keys are kebab-case: ``top_k`` is written ``top-k``."""
    return name.replace("_", "-")


class Model(BaseModel):
    """Frozen, unknown keys forbidden, kebab-case keys, descriptions that reach the JSON Schemas."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=kebab,
        populate_by_name=True,
        use_enum_values=False,
        validate_default=True,
        defer_build=True,
        # NaN and infinity cross JSON as null and make a value unequal to itself (a fresh lock stale at once).
        allow_inf_nan=False,
    )
