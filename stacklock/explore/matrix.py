"""`stacklock matrix`: run one stack under every combination of a few links' choices, and say which link
changes the output how often.

The spec (its own TOML file, :func:`parse_matrix_spec`) names the manifest and the axes; the first value of
each axis makes the reference cell. Planning (:func:`plan_cells`) and attribution (:func:`build_report`) are
pure; :func:`run_matrix` runs the cells, one engine session per engine, model file and backend, and caches
each cell's result by its digest (a second run executes no cell, an interrupted run resumes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from stacklock import errors
from stacklock.engines.runner import Progress
from stacklock.explore.outcome import SessionPool, observe_lock
from stacklock.files.atomic import write_text_atomic
from stacklock.lock.load import load_inputs, load_template
from stacklock.lock.resolve import _max_tokens, resolve
from stacklock.lock.smoke import _smoke_pin
from stacklock.model.base import Model
from stacklock.model.effective import EffectiveBackend, EffectiveSampler
from stacklock.model.lock import Lock
from stacklock.model.manifest import Smoke, TemplateSpec
from stacklock.model.toml import parse_toml, validate
from stacklock.verify.compare import first_difference

__all__ = [
    "AxisSummary",
    "Cell",
    "CellComparison",
    "CellResult",
    "MatrixReport",
    "MatrixRun",
    "MatrixSpec",
    "apply_cell",
    "build_report",
    "cell_digest",
    "load_cell_locks",
    "merge_runs",
    "parse_matrix_spec",
    "parse_prompts",
    "plan_cells",
    "read_matrix_spec",
    "run_matrix",
]

AxisValue = str | int | float | bool


class MatrixSpec(Model):
    """A matrix file: the stack to vary and its axes."""

    manifest: str = Field(default="llmstack.toml", description="The manifest, relative to the matrix file.")
    prompts: str | None = Field(
        default=None,
        description="A JSONL file of smoke prompts (one [[smoke]] entry per line); default: the manifest's.",
    )
    top_k: int = Field(default=5, ge=1, le=20, description="Alternatives observed per generated token.")
    axes: dict[str, tuple[AxisValue, ...]] = Field(
        description=(
            "The axes: 'template' (sources: gguf, gguf:NAME, registry:ID, file:PATH, none), "
            "'backend.OPTION' and 'sampler.VALUE' (kebab-case names), each a list of values; the first "
            "value of each axis makes the reference cell."
        )
    )

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: dict[str, tuple[AxisValue, ...]]) -> dict[str, tuple[AxisValue, ...]]:
        if not axes:
            raise ValueError("name at least one axis")
        for name, values in axes.items():
            table, _, field = name.partition(".")
            known: dict[str, type[Model]] = {"backend": EffectiveBackend, "sampler": EffectiveSampler}
            if name == "template":
                pass
            elif table not in known or field.replace("-", "_") not in known[table].model_fields:
                raise ValueError(
                    f"axis '{name}' is not 'template', 'backend.OPTION' or 'sampler.VALUE' "
                    "(e.g. backend.flash-attention, sampler.temperature)"
                )
            if not values or len(set(map(repr, values))) != len(values):
                raise ValueError(f"axis '{name}' needs one or more distinct values")
        return axes


class Cell(Model):
    """One combination of axis values."""

    index: int = Field(description="Its position in the matrix (the reference cell is 0).")
    values: dict[str, AxisValue] = Field(description="The value of each axis.")


class CellResult(Model):
    """What one cell's stack produced for each prompt (cached by digest)."""

    cell: Cell = Field(description="The cell.")
    digest: str = Field(description="sha256 over everything that can change the cell's outcome.")
    outcomes: tuple[Any, ...] = Field(description="Per prompt, a PromptOutcome as JSON.")


class MatrixRun(Model):
    """The cells run so far (all of them, or one shard's)."""

    spec_digest: str = Field(description="sha256 of the spec and its prompts: shards of one matrix share it.")
    axes: dict[str, tuple[AxisValue, ...]] = Field(description="The axes.")
    prompts: tuple[str, ...] = Field(description="The prompt names, in order.")
    cell_count: int = Field(description="How many cells the whole matrix has.")
    results: tuple[CellResult, ...] = Field(description="The cells run, by index.")
    executed: int = Field(default=0, description="Cells the engine ran in this run (not from the cache).")


def parse_matrix_spec(text: str, origin: str) -> MatrixSpec:
    data = parse_toml(text, origin, errors.ManifestError)
    matrix = data.get("matrix", data)
    return validate(MatrixSpec, matrix, origin, text, errors.ManifestError)


def parse_prompts(text: str, origin: str) -> tuple[Smoke, ...]:
    """A JSONL prompt set: one smoke prompt per line, in the manifest's [[smoke]] shape (kebab-case keys)."""
    prompts: list[Smoke] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(Smoke.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as exc:
            first = str(exc).splitlines()[0] if isinstance(exc, json.JSONDecodeError) else _first_error(exc)
            raise errors.ManifestError(
                f"{origin}:{number}: not a smoke prompt: {first}",
                hint='write one JSON object per line, e.g. {"name": "a", "prompt": "Once upon a time"}',
            ) from None
    names = [p.name for p in prompts]
    if not prompts or len(set(names)) != len(names):
        raise errors.ManifestError(f"{origin}: needs one or more prompts with unique names")
    return tuple(prompts)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def plan_cells(axes: Mapping[str, Sequence[AxisValue]]) -> tuple[Cell, ...]:
    """Every combination, the first value of each axis first (cell 0 is the reference)."""
    names = list(axes)
    return tuple(
        Cell(index=i, values=dict(zip(names, combo, strict=True)))
        for i, combo in enumerate(itertools.product(*(axes[n] for n in names)))
    )


def apply_cell(lock: Lock, cell: Cell) -> Lock:
    """The lock with the cell's backend options and sampler values (its template is applied when resolving)."""
    backend = lock.backend.model_dump()
    sampler = lock.sampler.model_dump()
    origin = dict(lock.sampler.origin)
    for name, value in cell.values.items():
        table, _, field = name.partition(".")
        if table == "backend":
            backend[field.replace("-", "_")] = value
        elif table == "sampler":
            sampler[field.replace("-", "_")] = tuple(value) if isinstance(value, list) else value
            origin[field] = "manifest"
    try:
        update = {
            "backend": EffectiveBackend.model_validate(backend),
            "sampler": EffectiveSampler.model_validate({**sampler, "origin": origin}),
        }
    except ValidationError as exc:
        raise errors.ManifestError(f"matrix cell {cell.values}: {_first_error(exc)}") from None
    return lock.model_copy(update=update)


def cell_digest(lock: Lock, top_k: int) -> str:
    """Everything that can change a cell's outcome: the lock's behaviour pins, its prompts and top-k."""
    behaviour = lock.behaviour()
    behaviour["sampler"].pop("origin", None)
    text = json.dumps({"lock": behaviour, "top-k": top_k}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def merge_runs(runs: Sequence[MatrixRun]) -> MatrixRun:
    """Shards of one matrix as one run; every cell must be present once."""
    if not runs:
        raise errors.UsageError("nothing to merge")
    first = runs[0]
    for other in runs[1:]:
        if other.spec_digest != first.spec_digest:
            raise errors.UsageError(
                "the shards come from different matrix specs or prompt sets", hint="merge shards of one run"
            )
    by_index: dict[int, CellResult] = {}
    for run in runs:
        for result in run.results:
            by_index[result.cell.index] = result
    missing = [i for i in range(first.cell_count) if i not in by_index]
    if missing:
        raise errors.UsageError(
            f"cells {', '.join(map(str, missing[:8]))} are in no shard",
            hint="run every shard I/N for I = 1..N and merge all of them",
        )
    return first.model_copy(
        update={
            "results": tuple(by_index[i] for i in sorted(by_index)),
            "executed": sum(r.executed for r in runs),
        }
    )


# Comparison and attribution (pure) -------------------------------------------------------------------------


class PromptComparison(Model):
    prompt: str = Field(description="The prompt.")
    rendered_equal: bool = Field(description="Whether the rendered prompt equals the reference cell's.")
    render_error: str | None = Field(default=None, description="Why the prompt could not be rendered.")
    same_output: bool = Field(description="Whether tokens and text equal the reference cell's.")
    token_agreement: float = Field(description="Common prefix of generated tokens / the longer length.")
    first_divergence: int | None = Field(default=None, description="The first differing generated token.")
    drift: tuple[float, ...] = Field(
        default=(),
        description="Per position up to the divergence, |logprob change| of the reference's token.",
    )
    tokens: tuple[int, ...] = Field(default=(), description="The generated token ids.")
    pieces: tuple[str, ...] = Field(default=(), description="The generated tokens as text.")
    alternatives: tuple[tuple[tuple[int, float], ...], ...] = Field(
        default=(), description="The top-k alternatives at the divergence (reference's, then this cell's)."
    )
    passed: bool | None = Field(default=None, description="Whether the expectation passes (null: none).")
    text: str | None = Field(default=None, description="The output text.")
    rendered: str | None = Field(default=None, description="The rendered prompt.")


class CellComparison(Model):
    cell: Cell = Field(description="The cell.")
    rendered_equal: bool = Field(description="Every prompt renders as in the reference cell.")
    changed: int = Field(description="Prompts whose output differs from the reference cell's.")
    token_agreement: float = Field(description="Mean token agreement over prompts.")
    first_divergence: int | None = Field(default=None, description="The earliest divergence over prompts.")
    max_drift: float = Field(description="The largest logprob drift before any divergence.")
    pass_rate: float | None = Field(default=None, description="Expectations passed / with expectations.")
    prompts: tuple[PromptComparison, ...] = Field(description="Per prompt.")


class AxisSummary(Model):
    axis: str = Field(description="The axis.")
    pairs: int = Field(description="Prompt pairs of cells that differ in this axis only.")
    changed: int = Field(description="Of those, how many outputs differ.")
    rate: float = Field(description="changed / pairs: how often changing only this axis changes the output.")


class MatrixReport(Model):
    axes: dict[str, tuple[AxisValue, ...]] = Field(
        description="The axes; the first values make the reference."
    )
    prompts: tuple[str, ...] = Field(description="The prompts.")
    cells: tuple[CellComparison, ...] = Field(description="Every cell against the reference cell.")
    attribution: tuple[AxisSummary, ...] = Field(description="Variance attributed to each axis, most first.")
    executed: int = Field(
        default=0, description="Cells run by the engine in this run; the rest came from cache."
    )


def _signature(outcome: Mapping[str, Any]) -> tuple[Any, ...]:
    golden = outcome.get("golden") or {}
    render = outcome["render"]
    return (
        render.get("rendered"),
        render.get("add-bos"),
        tuple(golden.get("tokens") or ()),
        golden.get("text"),
    )


def _compare_prompt(name: str, ref: Mapping[str, Any], mine: Mapping[str, Any]) -> PromptComparison:
    render, ref_render = mine["render"], ref["render"]
    golden, ref_golden = mine.get("golden"), ref.get("golden")
    tokens = tuple(golden["tokens"]) if golden else ()
    ref_tokens = tuple(ref_golden["tokens"]) if ref_golden else ()
    divergence = first_difference(ref_tokens, tokens)
    longest = max(len(ref_tokens), len(tokens))
    common = longest if divergence is None else divergence
    drift: list[float] = []
    alternatives: tuple[tuple[tuple[int, float], ...], ...] = ()
    if golden and ref_golden:
        for position, (a, b) in enumerate(
            zip(ref_golden["top-logprobs"], golden["top-logprobs"], strict=False)
        ):
            if divergence is not None and position > divergence:
                break
            chosen = ref_tokens[position]
            left, right = dict(map(tuple, a)), dict(map(tuple, b))
            if chosen in left and chosen in right:
                drift.append(round(abs(left[chosen] - right[chosen]), 4))
        if divergence is not None and divergence < min(
            len(ref_golden["top-logprobs"]), len(golden["top-logprobs"])
        ):
            alternatives = (
                tuple((int(t), float(p)) for t, p in ref_golden["top-logprobs"][divergence]),
                tuple((int(t), float(p)) for t, p in golden["top-logprobs"][divergence]),
            )
    expect_known = golden is not None and mine.get("expects", False)
    return PromptComparison(
        prompt=name,
        rendered_equal=render.get("rendered") == ref_render.get("rendered")
        and render.get("add-bos") == ref_render.get("add-bos"),
        render_error=render.get("error"),
        same_output=_signature(ref) == _signature(mine),
        token_agreement=1.0 if longest == 0 else round(common / longest, 4),
        first_divergence=divergence,
        drift=tuple(drift),
        tokens=tokens,
        pieces=tuple(mine.get("pieces") or ()),
        alternatives=alternatives,
        passed=(mine.get("expectation-failure") is None) if expect_known else None,
        text=golden["text"] if golden else None,
        rendered=render.get("rendered"),
    )


def build_report(run: MatrixRun) -> MatrixReport:
    """Every cell against the reference cell, and each axis's share of the changes (pure)."""
    results = {r.cell.index: r for r in run.results}
    if 0 not in results or len(results) != run.cell_count:
        raise errors.UsageError(
            f"the run holds {len(results)} of {run.cell_count} cells", hint="merge every shard first"
        )
    reference = results[0].outcomes
    cells = []
    for index in sorted(results):
        result = results[index]
        prompts = tuple(
            _compare_prompt(name, ref, mine)
            for name, ref, mine in zip(run.prompts, reference, result.outcomes, strict=True)
        )
        judged = [p.passed for p in prompts if p.passed is not None]
        divergences = [p.first_divergence for p in prompts if p.first_divergence is not None]
        cells.append(
            CellComparison(
                cell=result.cell,
                rendered_equal=all(p.rendered_equal for p in prompts),
                changed=sum(not p.same_output for p in prompts),
                token_agreement=round(sum(p.token_agreement for p in prompts) / len(prompts), 4),
                first_divergence=min(divergences) if divergences else None,
                max_drift=max((d for p in prompts for d in p.drift), default=0.0),
                pass_rate=round(sum(judged) / len(judged), 4) if judged else None,
                prompts=prompts,
            )
        )
    return MatrixReport(
        axes=run.axes,
        prompts=run.prompts,
        cells=tuple(cells),
        attribution=_attribute(run, results),
        executed=run.executed,
    )


def _attribute(run: MatrixRun, results: Mapping[int, CellResult]) -> tuple[AxisSummary, ...]:
    summaries = []
    ordered = [results[i] for i in sorted(results)]
    for axis in run.axes:
        pairs = changed = 0
        groups: dict[str, list[CellResult]] = {}
        for result in ordered:
            rest = {k: v for k, v in result.cell.values.items() if k != axis}
            groups.setdefault(json.dumps(rest, sort_keys=True), []).append(result)
        for group in groups.values():
            for a, b in itertools.combinations(group, 2):
                for x, y in zip(a.outcomes, b.outcomes, strict=True):
                    pairs += 1
                    changed += _signature(x) != _signature(y)
        rate = round(changed / pairs, 4) if pairs else 0.0
        summaries.append(AxisSummary(axis=axis, pairs=pairs, changed=changed, rate=rate))
    return tuple(sorted(summaries, key=lambda s: (-s.rate, s.axis)))


# Running ----------------------------------------------------------------------------------------------------


def read_matrix_spec(path: Path) -> MatrixSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise errors.UsageError(f"matrix spec not found: {path}", hint="write a matrix TOML file") from None
    return parse_matrix_spec(text, str(path))


def load_cell_locks(spec: MatrixSpec, spec_path: Path) -> tuple[Path, list[tuple[Cell, Lock]]]:
    """Resolve the manifest once per template value and apply each cell's options (reads the world once)."""
    base = spec_path.parent
    manifest_path = base / spec.manifest
    inputs = load_inputs(manifest_path)
    manifest = inputs.manifest
    if spec.prompts is not None:
        prompts_path = base / spec.prompts
        try:
            prompts = parse_prompts(prompts_path.read_text(encoding="utf-8"), str(prompts_path))
        except FileNotFoundError:
            raise errors.UsageError(f"prompts file not found: {prompts_path}") from None
    else:
        prompts = manifest.smoke
    if not prompts:
        raise errors.ManifestError(f"{manifest_path}: no smoke prompts, and the matrix names no prompts file")
    templates: dict[str, Lock] = {}
    for source in spec.axes.get("template", (manifest.template.source,)):
        try:
            template_spec = TemplateSpec.model_validate({**manifest.template.model_dump(), "source": source})
        except ValidationError as exc:
            raise errors.ManifestError(f"matrix axis template: {source!r}: {_first_error(exc)}") from None
        varied = manifest.model_copy(update={"template": template_spec, "smoke": ()})
        resolved = load_template(varied, inputs.header, inputs.base_dir, inputs.registries)
        lock = resolve(dataclasses.replace(inputs, manifest=varied, template=resolved)).lock
        smoke = tuple(
            _smoke_pin(s, _max_tokens(s.name, s.max_tokens, lock.sampler.max_tokens, lock.engine.name))
            for s in prompts
        )
        templates[str(source)] = lock.model_copy(update={"smoke": smoke})
    cells = []
    for cell in plan_cells(spec.axes):
        template = str(cell.values.get("template", manifest.template.source))
        cells.append((cell, apply_cell(templates[template], cell)))
    return manifest_path.parent, cells


def run_matrix(
    spec_path: Path,
    *,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> MatrixRun:
    """Run every cell of the matrix (or one shard's), reusing cached cells; one engine load per combination."""
    spec = read_matrix_spec(spec_path)
    base, cells = load_cell_locks(spec, spec_path)
    cache = cache_dir or spec_path.parent / ".stacklock" / "matrix"
    digests = [cell_digest(lock, spec.top_k) for _, lock in cells]
    names = tuple(pin.name for pin in cells[0][1].smoke)
    spec_digest = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    groups: dict[str, list[int]] = {}
    for index, (_, lock) in enumerate(cells):
        key = f"{lock.engine.name}\0{lock.model.sha256}\0{lock.backend.model_dump_json()}"
        groups.setdefault(key, []).append(index)
    ordered = list(groups.values())
    if shard is not None:
        number, count = shard
        ordered = [g for position, g in enumerate(ordered) if position % count == number - 1]
    results: dict[int, CellResult] = {}
    pending: list[list[int]] = []
    for group in ordered:
        todo = []
        for index in group:
            stored = _read_cell(cache / f"{digests[index]}.json")
            if stored is None:
                todo.append(index)
            else:
                results[index] = CellResult(cell=cells[index][0], digest=digests[index], outcomes=stored)
        if todo:
            pending.append(todo)
    cached = len(results)

    def run_group(group: list[int], pool: SessionPool) -> None:
        for index in group:
            cell, lock = cells[index]
            outcomes = observe_lock(lock, base, pool, top_k=spec.top_k)
            data = [o.model_dump(mode="json", by_alias=True) for o in outcomes]
            write_text_atomic(cache / f"{digests[index]}.json", json.dumps(data, ensure_ascii=False))
            results[index] = CellResult(cell=cell, digest=digests[index], outcomes=tuple(data))
            if progress is not None:
                progress(f"cell {index + 1}/{len(cells)} done: {_label(cell)}")

    cache.mkdir(parents=True, exist_ok=True)
    with SessionPool(progress) as pool:
        if jobs <= 1 or len(pending) <= 1:
            for group in pending:
                run_group(group, pool)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as executor:
                for future in [executor.submit(run_group, g, pool) for g in pending]:
                    future.result()
    return MatrixRun(
        spec_digest=spec_digest,
        axes=spec.axes,
        prompts=names,
        cell_count=len(cells),
        results=tuple(results[i] for i in sorted(results)),
        executed=len(results) - cached,
    )


def _label(cell: Cell) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.values.items())


def _read_cell(path: Path) -> tuple[Any, ...] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return tuple(data) if isinstance(data, list) else None
