"""`stacklock bisect GOOD.lock BAD.lock`: which differing link (or pair of links) changes the output.

The links that differ come from :func:`stacklock.lock.diff.diff_locks`: the model file, the template, the
tokenizer, the engine, and each backend option and sampler value on its own. An intermediate stack is GOOD with
some links taken from BAD (:func:`swap`). A stack's outcome is compared with GOOD's in the order an answer flows:
its renders and BOS decisions first (pure, no engine), the engine only where those agree.

The search (:func:`bisect_links`) descends by halves assuming a single culprit, which costs at most
1 + 2·log2(links) engine runs, then reduces greedily (each link left out in turn) when the descent finds no
single culprit, so links that only change the outcome together are reported as an interaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stacklock.engines.machine import installed_engine_version
from stacklock.engines.runner import Progress
from stacklock.explore.outcome import (
    PromptOutcome,
    SessionPool,
    absolute,
    check_model,
    observe_lock,
    render_lock_prompts,
)
from stacklock.lock.diff import diff_locks
from stacklock.lock.project import read_lock
from stacklock.model.base import Model
from stacklock.model.lock import Lock
from stacklock.verify.compare import first_difference

__all__ = [
    "BisectReport",
    "Difference",
    "Link",
    "Trial",
    "bisect_links",
    "compare_outcomes",
    "differing_links",
    "mark_unswappable",
    "run_bisect",
    "swap",
]

_WHOLE = ("model", "template", "tokenizer", "engine")
_SPLIT = ("backend", "sampler")

Stage = Literal["template", "tokenization", "generation", "output"]


class Link(Model):
    """One link that differs between GOOD and BAD."""

    name: str = Field(description="model, template, tokenizer, engine, backend.OPTION or sampler.VALUE.")
    good: str = Field(description="Its value in GOOD, short.")
    bad: str = Field(description="Its value in BAD, short.")
    swappable: bool = Field(default=True, description="Whether it can be swapped (run) on this machine.")
    reason: str | None = Field(default=None, description="Why it is not swappable here.")


class Difference(Model):
    """Where an outcome first differs from GOOD's."""

    prompt: str = Field(description="The smoke prompt.")
    stage: Stage = Field(description="The first stage whose result differs.")
    position: int | None = Field(default=None, description="The first differing character or token.")
    good: str = Field(description="GOOD's side at that position.")
    other: str = Field(description="The other stack's side at that position.")
    good_text: str | None = Field(default=None, description="GOOD's output text.")
    other_text: str | None = Field(default=None, description="The other stack's output text.")


class Trial(Model):
    """One intermediate stack that was judged."""

    links: tuple[str, ...] = Field(description="The links taken from BAD.")
    changed: bool = Field(description="Whether its outcome differs from GOOD's.")
    engine_run: bool = Field(description="Whether the engine had to run it (renders agreed).")
    difference: Difference | None = Field(default=None, description="Where it first differs.")


class BisectReport(Model):
    good: str = Field(description="The GOOD lock.")
    bad: str = Field(description="The BAD lock.")
    links: tuple[Link, ...] = Field(description="Every link that differs.")
    verdict: Literal["culprit", "interaction", "no-change", "unswappable"] = Field(
        description=(
            "culprit: one link changes the outcome; interaction: the links only change it together; no-change: "
            "BAD's outcome is GOOD's; unswappable: only links that cannot be swapped here are left."
        )
    )
    culprit: tuple[str, ...] = Field(
        default=(), description="The smallest set of links that changes the outcome."
    )
    difference: Difference | None = Field(default=None, description="How the culprit's outcome differs.")
    trials: tuple[Trial, ...] = Field(default=(), description="Every stack judged, in order.")
    engine_runs: int = Field(default=0, description="How many stacks the engine ran (GOOD's included).")


# Links ------------------------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _attr(key: str) -> str:
    return key.replace("-", "_")


def differing_links(good: Lock, bad: Lock) -> tuple[Link, ...]:
    """The links that differ, in chain order; backend options and sampler values one by one."""
    links: list[Link] = []
    # The same file in two directories is the same model link.
    same = good.model.model_dump(exclude={"path", "source"}) == bad.model.model_dump(
        exclude={"path", "source"}
    )
    model = bad.model.model_copy(update={"path": good.model.path, "source": good.model.source})
    other = bad.model_copy(update={"model": model}) if same else bad
    diff = diff_locks(good.without_goldens(), other.without_goldens())
    for link in diff.links:
        table = link.link
        if table in _WHOLE:
            links.append(Link(name=table, good=_describe(good, table), bad=_describe(bad, table)))
        elif table in _SPLIT:
            seen: list[str] = []
            for change in link.changes:
                field = change.key.split(".")[1]
                # Where a value came from (manifest, gguf, engine default) never changes what the engine does.
                if field != "origin" and field not in seen:
                    seen.append(field)
            for field in seen:
                old = getattr(getattr(good, table), _attr(field))
                new = getattr(getattr(bad, table), _attr(field))
                links.append(Link(name=f"{table}.{field}", good=_short(old), bad=_short(new)))
    return tuple(links)


def _describe(lock: Lock, table: str) -> str:
    if table == "model":
        return f"{lock.model.path.rsplit('/', 1)[-1]} ({lock.model.sha256[:12]})"
    if table == "template":
        digest = (lock.template.sha256 or "")[:12]
        return f"{lock.template.source} ({digest})" if digest else lock.template.source
    if table == "engine":
        return f"{lock.engine.name} {lock.engine.version}"
    flags = lock.tokenizer
    return f"add-bos={flags.add_bos} add-eos={flags.add_eos} ({flags.sha256[:12]})"


def swap(good: Lock, bad: Lock, links: Sequence[str]) -> Lock:
    """GOOD with the named links taken from BAD, its smoke prompts kept (pure)."""
    update: dict[str, Any] = {}
    backend: dict[str, Any] = {}
    sampler: dict[str, Any] = {}
    for name in links:
        table, _, field = name.partition(".")
        if not field:
            update[table] = getattr(bad, table)
        elif table == "backend":
            backend[_attr(field)] = getattr(bad.backend, _attr(field))
        else:
            sampler[_attr(field)] = getattr(bad.sampler, _attr(field))
    if backend:
        update["backend"] = good.backend.model_copy(update=backend)
    if sampler:
        update["sampler"] = good.sampler.model_copy(update=sampler)
    return good.model_copy(update=update).without_goldens()


def mark_unswappable(links: Sequence[Link], bad: Lock) -> tuple[Link, ...]:
    """The engine link cannot be swapped in-process unless BAD's engine version is the one installed here."""
    installed = installed_engine_version(bad.engine.name)
    if installed == bad.engine.version:
        return tuple(links)
    here = f"{installed} is installed" if installed else "it is not installed"
    reason = f"not swappable here: BAD runs {bad.engine.name} {bad.engine.version}, {here}"
    return tuple(
        link.model_copy(update={"swappable": False, "reason": reason}) if link.name == "engine" else link
        for link in links
    )


# Outcomes ---------------------------------------------------------------------------------------------------


def compare_outcomes(good: Sequence[Any], other: Sequence[Any]) -> Difference | None:
    """The first difference between two stacks' prompt outcomes (:class:`~stacklock.explore.outcome.PromptOutcome`),
    in stage order; None when they agree. Outcomes without a golden are compared by render only."""
    for mine, theirs in zip(good, other, strict=True):
        name = mine.render.name
        a, b = mine.render, theirs.render
        if a.rendered != b.rendered or a.error != b.error:
            left, right = a.rendered or a.error or "", b.rendered or b.error or ""
            index = first_difference(left, right)
            return Difference(
                prompt=name,
                stage="template",
                position=index,
                good=_around(left, index),
                other=_around(right, index),
            )
        if a.add_bos != b.add_bos:
            return Difference(
                prompt=name,
                stage="tokenization",
                position=0,
                good=f"add-bos={a.add_bos}",
                other=f"add-bos={b.add_bos}",
            )
        x, y = mine.golden, theirs.golden
        if x is None or y is None:
            continue
        if x.prompt_tokens_sha256 != y.prompt_tokens_sha256:
            index = first_difference(x.prompt_tokens or (), y.prompt_tokens or ())
            return Difference(
                prompt=name,
                stage="tokenization",
                position=index,
                good=_token_at(x.prompt_tokens or (), index),
                other=_token_at(y.prompt_tokens or (), index),
            )
        if x.tokens != y.tokens:
            index = first_difference(x.tokens, y.tokens)
            return Difference(
                prompt=name,
                stage="generation",
                position=index,
                good=_token_at(x.tokens, index, mine.pieces),
                other=_token_at(y.tokens, index, theirs.pieces),
                good_text=x.text,
                other_text=y.text,
            )
        if x.text != y.text:
            index = first_difference(x.text, y.text)
            return Difference(
                prompt=name,
                stage="output",
                position=index,
                good=_around(x.text, index),
                other=_around(y.text, index),
                good_text=x.text,
                other_text=y.text,
            )
    return None


def _around(text: str, index: int | None) -> str:
    start = max(0, (index or 0) - 12)
    return text[start : start + 40]


def _token_at(tokens: Sequence[int], index: int | None, pieces: Sequence[str] = ()) -> str:
    if index is None or index >= len(tokens):
        return "(end)"
    piece = f" {pieces[index]!r}" if index < len(pieces) else ""
    return f"token {tokens[index]}{piece}"


# The search -------------------------------------------------------------------------------------------------

#: Judges a set of links taken from BAD: the trial (its difference from GOOD, whether the engine ran).
Judge = Callable[[tuple[str, ...]], Trial]


def bisect_links(good_name: str, bad_name: str, links: Sequence[Link], judge: Judge) -> BisectReport:
    """Find the smallest set of swappable links whose change flips the outcome; pure given ``judge``."""
    trials: dict[tuple[str, ...], Trial] = {}
    order = [link.name for link in links]

    def flips(names: Sequence[str]) -> bool:
        key = tuple(n for n in order if n in names)
        if key not in trials:
            trials[key] = judge(key)
        return trials[key].changed

    search = [link.name for link in links if link.swappable]
    verdict: Literal["culprit", "interaction", "no-change", "unswappable"]
    culprit: tuple[str, ...] = ()
    if not search or not flips(search):
        verdict = "unswappable" if len(search) < len(order) else "no-change"
        culprit = tuple(link.name for link in links if not link.swappable) if verdict == "unswappable" else ()
    else:
        culprit = _minimise(search, flips)
        verdict = "culprit" if len(culprit) == 1 else "interaction"
    key = tuple(n for n in order if n in culprit)
    difference = trials[key].difference if key in trials else None
    return BisectReport(
        good=good_name,
        bad=bad_name,
        links=tuple(links),
        verdict=verdict,
        culprit=culprit,
        difference=difference,
        trials=tuple(trials.values()),
        engine_runs=sum(t.engine_run for t in trials.values()),
    )


def _minimise(changing: list[str], flips: Callable[[Sequence[str]], bool]) -> tuple[str, ...]:
    # Descent by halves, trusting the single-culprit case: when the first half does not flip, the second is
    # taken without a run, and the single link reached is checked at the end.
    current = changing
    while len(current) > 1:
        half = len(current) // 2
        first, second = current[:half], current[half:]
        current = first if flips(first) else second
    if flips(current):
        return tuple(current)
    # No single culprit: leave each link out in turn while the rest still flips (each one left is needed).
    kept = list(changing)
    for name in list(changing):
        rest = [n for n in kept if n != name]
        if rest and flips(rest):
            kept = rest
    return tuple(kept)


# Running ----------------------------------------------------------------------------------------------------


def run_bisect(
    good_path: Path, bad_path: Path, *, progress: Progress | None = None, top_k: int = 5
) -> BisectReport:
    """Read two locks and bisect the links between them, running the engine only where renders agree."""
    good = absolute(read_lock(good_path), good_path.parent)
    bad = absolute(read_lock(bad_path), bad_path.parent)
    links = mark_unswappable(differing_links(good, bad), bad)
    root = Path("/")
    check_model(good, root)
    check_model(bad, root)
    with SessionPool(progress) as pool:
        reference: list[tuple[PromptOutcome, ...]] = []

        def good_outcome() -> tuple[PromptOutcome, ...]:
            if not reference:
                reference.append(observe_lock(good, root, pool, top_k=top_k))
            return reference[0]

        def judge(names: tuple[str, ...]) -> Trial:
            variant = swap(good, bad, names)
            cheap = tuple(PromptOutcome(render=r) for r in render_lock_prompts(variant))
            base = tuple(PromptOutcome(render=r) for r in render_lock_prompts(good))
            difference = compare_outcomes(base, cheap)
            if difference is not None:
                return Trial(links=names, changed=True, engine_run=False, difference=difference)
            before = pool.engine_runs
            expected = good_outcome()
            if progress is not None:
                progress(f"running GOOD with {', '.join(names)} from BAD")
            observed = observe_lock(variant, root, pool, top_k=top_k)
            difference = compare_outcomes(expected, observed)
            runs = pool.engine_runs - before
            return Trial(
                links=names, changed=difference is not None, engine_run=runs > 0, difference=difference
            )

        report = bisect_links(str(good_path), str(bad_path), links, judge)
        return report.model_copy(update={"engine_runs": pool.engine_runs})
