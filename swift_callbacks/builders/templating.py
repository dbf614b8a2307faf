"""Prompt templates of the builders, kept as versioned YAML data and overridable per key from a user file.

A template file looks like::

    version: 1
    name: swift-study-builders
    lang: en
    templates:
      cot:
        directive: " Please output the reason first ..."
        system: "..."
        user: "... {query} ... {response} ..."

Placeholders are ``{name}`` with a known name (see ``SPEC``); any other brace is literal text, so templates may
show JSON without escaping. Which placeholders each field must and may hold is checked when a file is loaded,
so a typo in a user template fails at once rather than after paying for a thousand requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ..errors import UserError
from ..generation.base import Message

LANGS = ("en", "zh")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(UserError):
    """A template file is malformed: unknown key, wrong type, missing or unknown placeholder."""


@dataclass(frozen=True)
class FieldSpec:
    """What one template field may hold.

    Attributes:
        required: Placeholders the field must contain.
        optional: Placeholders the field may contain.
        phrases: True for a list of fixed phrases (e.g. verdict sentences) rather than one text.
    """

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    phrases: bool = False


_CHAT = {"system": FieldSpec()}
# Every builder's template entry: field name -> spec. A default file must fill every field; a user file any subset.
SPEC: dict[str, dict[str, FieldSpec]] = {
    "cot": {**_CHAT, "user": FieldSpec(("query", "response")), "directive": FieldSpec()},
    "clarify": {
        **_CHAT,
        "user": FieldSpec(("query",)),
        "rephrase": FieldSpec(("query",)),
        "clarified": FieldSpec(("query", "requirements")),
    },
    "evaluate": {
        **_CHAT,
        "user": FieldSpec(("query", "output"), ("verdict",)),
        "prompt": FieldSpec(("query", "output")),
        "verdict_pass": FieldSpec(phrases=True),
        "verdict_fail": FieldSpec(phrases=True),
    },
    "similar": {
        **_CHAT,
        "user": FieldSpec(("query", "response")),
        "query_label": FieldSpec(),
        "response_label": FieldSpec(),
    },
    "rules-extract": {**_CHAT, "user": FieldSpec(("questions",), ("known_rules",))},
    "rules-apply": {
        **_CHAT,
        "user": FieldSpec(("query", "rule"), ("choices",)),
        "prompt": FieldSpec(("query", "choices")),
    },
}


@dataclass
class TemplateSet:
    """The templates of one language, after any user override.

    Attributes:
        name: Name of the default file.
        version: Provenance string written into every output row, e.g. ``"swift-study-builders@1"`` or, with an
            override, ``"swift-study-builders@1+my-templates@3"``.
        lang: Language code.
        entries: ``builder -> field -> text`` (or list of phrases).
    """

    name: str
    version: str
    lang: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def text(self, builder: str, name: str) -> str:
        """Returns a field's raw text (no substitution)."""
        return self.entries[builder][name]

    def phrases(self, builder: str, name: str) -> list[str]:
        """Returns a phrase-list field."""
        return list(self.entries[builder][name])

    def render(self, builder: str, name: str, **values: str) -> str:
        """Fills a field's placeholders in one pass, so text inside a value is never substituted again."""
        return fill(self.entries[builder][name], values)

    def messages(self, builder: str, **values: str) -> list[Message]:
        """Chat messages of a builder's request: the system message (if not empty) and the user message."""
        system = self.render(builder, "system", **values).strip()
        user = self.render(builder, "user", **values)
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def fill(template: str, values: Mapping[str, str]) -> str:
    """Substitutes ``{name}`` placeholders; unknown names raise ``KeyError`` (a bug: files are checked on load)."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses."""
    return set(_PLACEHOLDER.findall(template))


def load_templates(lang: str = "en", override: str | os.PathLike | Mapping | None = None) -> TemplateSet:
    """Loads the shipped templates of a language, then applies a user override per builder and field.

    Args:
        lang: ``"en"`` or ``"zh"``.
        override: A YAML file path (or an already parsed mapping) with ``version``, ``name``, optional ``lang``
            and a ``templates`` mapping holding any subset of the builders' fields.

    Raises:
        TemplateError: Unknown language, builder or field; wrong type; missing or unknown placeholders; a
            missing ``version``/``name``; an override written for another language.
    """
    if lang not in LANGS:
        raise TemplateError(f"unknown template language {lang!r}; choose one of {list(LANGS)}")
    base_text = resources.files(__package__).joinpath("templates", f"strategies.{lang}.yaml").read_text("utf-8")
    base = _parse_file(yaml.safe_load(base_text), f"strategies.{lang}.yaml", lang, complete=True)
    templates = TemplateSet(base["name"], f"{base['name']}@{base['version']}", lang, base["templates"])
    if override is not None:
        _apply_override(templates, override)
    return templates


def _apply_override(templates: TemplateSet, override: str | os.PathLike | Mapping) -> None:
    if isinstance(override, Mapping):
        data, where = override, "template override"
    else:
        where = str(override)
        try:
            with open(override, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as err:
            raise TemplateError(f"cannot read templates file {where!r}: {err}") from err
        except yaml.YAMLError as err:
            raise TemplateError(f"templates file {where!r} is not valid YAML: {err}") from err
    user = _parse_file(data, where, templates.lang, complete=False)
    for builder, fields in user["templates"].items():
        templates.entries[builder] = {**templates.entries[builder], **fields}
    templates.version += f"+{user['name']}@{user['version']}"


def _parse_file(data: Any, where: str, lang: str, *, complete: bool) -> dict[str, Any]:
    """Checks a parsed template file; ``complete`` demands every builder and field (the shipped files)."""
    if not isinstance(data, Mapping):
        raise TemplateError(f"{where}: expected a mapping with 'version', 'name' and 'templates'")
    unknown = set(data) - {"version", "name", "lang", "templates"}
    if unknown:
        raise TemplateError(f"{where}: unknown top-level keys {sorted(unknown)}")
    if not isinstance(data.get("version"), int) or isinstance(data.get("version"), bool):
        raise TemplateError(f"{where}: 'version' must be an integer")
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise TemplateError(f"{where}: 'name' must be a non-empty string")
    if data.get("lang", lang) != lang:
        raise TemplateError(f"{where}: written for lang {data['lang']!r} but the build uses {lang!r}")
    entries = data.get("templates")
    if not isinstance(entries, Mapping):
        raise TemplateError(f"{where}: 'templates' must be a mapping of builder name to fields")
    checked = {builder: _check_entry(where, builder, fields, complete) for builder, fields in entries.items()}
    if complete and set(checked) != set(SPEC):
        raise TemplateError(f"{where}: missing builders {sorted(set(SPEC) - set(checked))}")
    return {"version": data["version"], "name": data["name"].strip(), "templates": checked}


def _check_entry(where: str, builder: str, fields: Any, complete: bool) -> dict[str, Any]:
    if builder not in SPEC:
        raise TemplateError(f"{where}: unknown builder {builder!r}; known: {sorted(SPEC)}")
    if not isinstance(fields, Mapping):
        raise TemplateError(f"{where}: templates.{builder} must be a mapping of field to text")
    spec = SPEC[builder]
    unknown = set(fields) - set(spec)
    if unknown:
        raise TemplateError(f"{where}: templates.{builder} has unknown fields {sorted(unknown)}; known: {sorted(spec)}")
    if complete and set(fields) != set(spec):
        raise TemplateError(f"{where}: templates.{builder} lacks fields {sorted(set(spec) - set(fields))}")
    return {
        name: _check_field(f"{where}: templates.{builder}.{name}", spec[name], value) for name, value in fields.items()
    }


def _check_field(where: str, spec: FieldSpec, value: Any) -> str | list[str]:
    if spec.phrases:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise TemplateError(f"{where} must be a non-empty string or list of non-empty strings")
        return list(value)
    if not isinstance(value, str):
        raise TemplateError(f"{where} must be a string, got {type(value).__name__}")
    used = placeholders(value)
    missing = set(spec.required) - used
    if missing:
        raise TemplateError(f"{where} is missing placeholders {sorted('{' + p + '}' for p in missing)}")
    unknown = used - set(spec.required) - set(spec.optional)
    if unknown:
        allowed = sorted("{" + p + "}" for p in (*spec.required, *spec.optional))
        raise TemplateError(f"{where} uses unknown placeholders {sorted('{' + p + '}' for p in unknown)}; "
                            f"allowed: {allowed or 'none'}")  # fmt: skip
    return value
