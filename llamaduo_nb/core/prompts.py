"""Prompts are data: `params/prompts/<name>.yaml` with system, template, schema, version."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import yaml

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import file_fingerprint
from llamaduo_nb.core.params import resolve_prompt


@dataclass(frozen=True)
class Prompt:
    name: str
    version: int
    system: str
    template: str
    schema: Optional[dict]
    fingerprint: str
    extra: dict = field(default_factory=dict)

    def messages(self, task: str | None = None, **fields) -> tuple:
        """System + user messages; a prompt may carry per-task wording in `tasks: {task: {field: text}}`."""
        fields = {**{k: "" for k in ("guidance",)}, **(self.extra.get("tasks", {}).get(task, {}) if task else {}), **fields}
        try:
            user = self.template.format(**fields)
        except KeyError as exc:
            raise UserError(f"prompt '{self.name}': template uses {{{exc.args[0]}}}, which this stage does not provide") from None
        system = ({"role": "system", "content": self.system.strip()},) if self.system.strip() else ()
        return system + ({"role": "user", "content": user.strip()},)


def load_prompt(name: str) -> Prompt:
    path = resolve_prompt(name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML ({exc})") from None
    for key in ("template",):
        if not isinstance(raw, dict) or key not in raw:
            raise UserError(f"{path}: a prompt file needs a '{key}'")
    known = {"name", "version", "system", "template", "schema"}
    return Prompt(
        name=raw.get("name", path.stem), version=int(raw.get("version", 1)), system=raw.get("system", "") or "",
        template=raw["template"], schema=raw.get("schema"), fingerprint=file_fingerprint(path),
        extra={k: v for k, v in raw.items() if k not in known},
    )
