"""JSON Schemas generated from the models, so editors can validate llmstack.toml, llmstack.lock and registry files.

``python -m stacklock.schemas`` rewrites ``schemas/``; a test fails when the committed files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stacklock.files.atomic import write_text_atomic


def _schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    # The file's name is the title editors show, in place of the model's class name.
    return {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema", "title": title}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every schema stacklock publishes, by file name."""
    from stacklock.model.lock import Lock  # noqa: PLC0415
    from stacklock.model.manifest import Manifest  # noqa: PLC0415
    from stacklock.registry.files import json_schemas as registry_schemas  # noqa: PLC0415

    schemas = {
        "llmstack.schema.json": _schema(Manifest, "llmstack.toml"),
        "llmstack-lock.schema.json": _schema(Lock, "llmstack.lock"),
    }
    schemas.update(registry_schemas())
    return dict(sorted(schemas.items()))


def render_schema(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        write_text_atomic(path, render_schema(schema))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "schemas"
    for path in write_schemas(target):
        print(path)
