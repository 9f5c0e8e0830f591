"""Reading a params file: YAML, `--set` overrides, sweeps over service LLMs, and the files it names.

An unknown key, a wrong type or a missing file is refused with one line naming the file and the field.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.params import Params, resolve_prompt
from llamaduo_nb.core.models import resolve
from llamaduo_nb.core.rows import check_coverage_file, read_human_labels


def _loc_to_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(node.get(key, {}), dict):
            raise UserError(f"--set {dotted}: '{key}' is not a section")
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"--set {item}: expected key.path=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Params:
    """Load, merge `--set` overrides into, and validate a params file describing ONE experiment.

    Raises UserError with one line `FILE: field.path: problem` on any mistake. A file whose
    `service` is a list describes a sweep over service LLMs: see `load_family`.
    """
    family = load_family(path, overrides)
    if len(family) > 1:
        raise UserError(f"{_where(path, overrides)}: service: a list of {len(family)} service LLMs is a sweep; "
                        "`llamaduo run` expands it into one run folder per service LLM")
    return family[0]


def _where(path, overrides) -> str:
    source = str(path) if path else "<defaults>"
    return source + (f" (with --set {', '.join(overrides)})" if overrides else "")


def service_slug(params: Params) -> str:
    """A folder name for one service LLM of a sweep."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", params.service.label).strip("_")


def load_family(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> list[Params]:
    """Every experiment a params file describes: one, or one per service LLM when `service` is a list
    (each synthesises its own data, and by default judges; tasks, local models, volumes and judges
    are expanded inside each run). Errors name the list item: `service[1].model: …`."""
    raw, where = _read_raw(path, overrides)
    services = raw.get("service")
    if not isinstance(services, list):
        return [_validate(raw, where, path)]
    if not services:
        raise UserError(f"{where}: service: an empty list; give one service LLM or several")
    family = []
    for i, service in enumerate(services):
        member = dict(raw, service=service)
        try:
            family.append(_validate(member, where, path))
        except UserError as exc:
            raise UserError(str(exc).replace(f"{where}: service", f"{where}: service[{i}]", 1)) from None
    labels = [p.service.label for p in family]
    if len(set(labels)) < len(labels) or len({service_slug(p) for p in family}) < len(family):
        raise UserError(f"{where}: service: two service LLMs share the label {labels}; give each a distinct `name`")
    return family


def _read_raw(path, overrides) -> tuple[dict, str]:
    overrides = list(overrides or [])
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{source}: params file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark else ""
            raise UserError(f"{source}: {where}malformed YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{source}: top level must be a mapping of sections")
        raw = copy.deepcopy(loaded)
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    return raw, _where(path, overrides)


def _validate(raw: dict, where: str, path) -> Params:
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        field = _loc_to_str(first["loc"]) or "(top level)"
        named = re.match(r"^([\w.\[\]]+): (.*)$", msg)
        if not first["loc"] and named:  # cross-field checks name their field themselves
            field, msg = named[1], named[2]
        raise UserError(f"{where}: {field}: {msg}{more}") from None
    # Files the params point at must exist now, not halfway through a run.
    for field, name in (("synthesize.prompt", params.synthesize.prompt), ("evaluate.prompt", params.evaluate.prompt)):
        try:
            resolve_prompt(name)
        except FileNotFoundError as exc:
            raise UserError(f"{where}: {field}: {exc}") from None
    local_models = [("finetune.base_models", m) for m in params.finetune.base_models]
    local_models += [(f"{f}.model", s.model) for f, s in [("service", params.service)] + [(f"evaluate.judges[{i}]", j) for i, j in enumerate(params.evaluate.judges or [])] if s.backend == "local"]
    for field, ref in local_models:
        try:
            resolve(ref)
        except UserError as exc:
            raise UserError(f"{where}: {field}: {str(exc)}") from None
    if params.coverage.source == "file":
        cov = Path(params.coverage.path)
        if not cov.is_absolute() and path is not None and not cov.exists():
            cov = Path(path).resolve().parent / cov
        if not cov.exists():
            raise UserError(f"{where}: coverage.path: file not found: {params.coverage.path}")
        params.coverage.path = str(cov.resolve())
        check_coverage_file(params)  # empty, not No Robots' schema, unknown category, test in train
    if params.evaluate.human_labels not in (None, "bundled"):
        try:
            read_human_labels(params.evaluate.human_labels)  # a bad line fails here, before anything runs
        except ValueError as exc:
            raise UserError(f"{where}: evaluate.human_labels: {exc}") from None
    return params
