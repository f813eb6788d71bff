"""Findings: what the resolver says about a stack, as data. Shared by the registry, the lock and the CLI."""

from __future__ import annotations

import enum

from pydantic import Field

from stacklock.model.base import Model


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Link(enum.StrEnum):
    """The links of a stack's chain, in the order an answer flows through them."""

    MODEL = "model"
    TEMPLATE = "template"
    TOKENIZER = "tokenizer"
    ENGINE = "engine"
    BACKEND = "backend"
    SAMPLER = "sampler"
    POST_PROCESSING = "post-processing"


class Finding(Model):
    """One rule that matched a stack."""

    rule: str = Field(description="The id of the registry rule that matched.")
    severity: Severity = Field(
        description="error stops the lock unless allowed; warning and info are recorded."
    )
    title: str = Field(description="One line: what is wrong.")
    links: tuple[Link, ...] = Field(description="The links of the stack the rule concerns.")
    explanation: str = Field(description="Why it matters for this stack.")
    fix: str = Field(description="How to fix or work around it.")
    references: tuple[str, ...] = Field(
        default=(), description="Upstream issues or PRs, e.g. ggml-org/llama.cpp#6920."
    )
    registry: str = Field(default="bundled", description="The registry the rule came from.")


class Allowance(Model):
    """An error finding the user accepted explicitly with `stacklock lock --allow RULE --reason TEXT`."""

    rule: str = Field(description="The id of the accepted rule.")
    reason: str = Field(description="Why the user accepts it, as given with --reason.")


class RegistrySource(Model):
    """A registry named in the manifest, beside the bundled one."""

    name: str = Field(description="A short name for the registry, unique within the manifest.")
    url: str = Field(
        description=(
            "Where it lives: a local directory, a git repository (git+file://, git+https://, or a path "
            "ending in .git) or an HTTPS (or loopback HTTP) URL of a .tar.gz/.zip archive."
        )
    )
    revision: str | None = Field(
        default=None, description="For git: a branch, tag or commit to resolve; the lock pins the commit."
    )


class RegistryPin(Model):
    """A registry as the lock pins it."""

    name: str = Field(description="The registry's name ('bundled' for the one shipped with stacklock).")
    url: str = Field(description="Where it was read from.")
    revision: str | None = Field(default=None, description="The resolved revision (git commit) if any.")
    digest: str = Field(description="sha256 over the registry's files (sorted paths and contents).")
