"""The Helm chart's values schema, in its part the models define: `extraConfig`, whose keys are the
operator's settings. Generated from `Settings` as the CRD is from the spec, so that a value the
operator would refuse at start (a typo, a wrong type, a number out of range) is refused by
`helm install` instead of crash-looping the new pods of an upgrade. The rest of the file is written
by hand; `render` rewrites the whole file in one layout.
"""

from __future__ import annotations

import json
from typing import Any

from workerqueue_operator.models.crd import unwrapped
from workerqueue_operator.models.settings import CSV_SETTINGS, Settings

CHART_OWNED_SETTINGS = frozenset({
    "http_host", "http_port", "tls_cert_file", "tls_key_file", "namespaces", "temporal_api_key_secret",
    "litellm_api_key_secret", "upstream_api_key_secret", "http_drain_seconds", "upstream_url", "metrics_port",
    "upstream_namespaces",
})
"""Settings the chart derives from values that its other manifests follow too (probes, Service,
volumes, the Roles that read the named Secrets, the termination grace period): `extraConfig` may
not set them, nor may `extraEnv`."""

_KEPT = {"type", "description", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
         "maxLength", "pattern", "items", "enum", "minItems", "maxItems", "not"}
_WIDTH = 120


def _setting(node: dict[str, Any]) -> dict[str, Any]:
    """One setting's JSON Schema, draft-07 as Helm reads it: `X | None` as a type list, no titles
    nor defaults (the operator's defaults apply to what the values leave out)."""
    if "anyOf" in node:
        others = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(others) != 1 or "type" not in others[0]:
            raise ValueError(f"a setting's schema cannot express this union: {node['anyOf']}")
        rest = {key: value for key, value in node.items() if key != "anyOf"}
        merged = _setting({**others[0], **rest})
        if len(others) != len(node["anyOf"]):
            merged["type"] = [merged["type"], "null"]
        return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEPT:
            continue
        out[key] = _setting(value) if key == "items" else unwrapped(value) if key == "description" else value
    return out


def extra_config_schema(pod_template: dict[str, Any]) -> dict[str, Any]:
    """`pod_template`: the schema of the chart's `worker.podTemplate`, which `worker_pod_template` is too."""
    raw = Settings.model_json_schema(mode="validation")
    properties = {name: _setting(raw["properties"][name]) for name in Settings.model_fields
                  if name not in CHART_OWNED_SETTINGS}
    for name in CSV_SETTINGS:
        if name in properties:  # a list, or its comma-separated string, as the operator reads either
            properties[name]["type"] = ["array", "string"]
            if properties[name].get("minItems"):  # as a string, something besides commas and spaces
                properties[name]["pattern"] = "[^\t\n\f\r ,]"
            item = properties[name].get("items", {}).get("pattern", "")
            if item.startswith("^") and item.endswith("$"):  # as a string, such items between commas
                one = item[1:-1]
                properties[name]["pattern"] = rf"^[\s,]*({one}(\s*,[\s,]*{one})*)?[\s,]*$"
    # Settings._not_opaque, as the schema says it: an item, or a part of the comma-separated string.
    properties["ignored_secret_types"]["items"]["not"] = {"enum": ["Opaque"]}
    properties["ignored_secret_types"]["not"] = {"type": "string", "pattern": r"(^|,)\s*Opaque\s*(,|$)"}
    # The operator's checks of a template are code (Settings._pod_template), not a schema of its own.
    properties["worker_pod_template"] = {**pod_template,
                                         "description": properties["worker_pod_template"]["description"]}
    return {
        "type": "object",
        "description": "Further operator settings (snake_case Settings fields), verbatim; not those the chart derives "
                       "from values its other manifests follow too (" + ", ".join(sorted(CHART_OWNED_SETTINGS)) + ").",
        "additionalProperties": False,
        "properties": properties,
    }


def render(text: str) -> str:
    """The values schema `text` with its `extraConfig` generated from the models."""
    schema = json.loads(text)
    pod_template = schema["properties"]["worker"]["properties"]["podTemplate"]
    schema["properties"]["extraConfig"] = extra_config_schema(pod_template)
    return _dumps(schema, 0) + "\n"


def _dumps(node: Any, indent: int, used: int = 0) -> str:
    """JSON with 2-space indents, where each object or list that fits on its line (`used` columns
    taken already) is written on it."""
    inline = json.dumps(node, ensure_ascii=False)
    if not isinstance(node, (dict, list)) or not node or (indent and used + len(inline) <= _WIDTH):
        return inline
    pad = " " * (indent + 2)
    if isinstance(node, dict):
        items = []
        for key, value in node.items():
            head = f"{pad}{json.dumps(key, ensure_ascii=False)}: "
            items.append(head + _dumps(value, indent + 2, len(head)))
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    lines = [pad + _dumps(item, indent + 2, len(pad)) for item in node]
    return "[\n" + ",\n".join(lines) + "\n" + " " * indent + "]"
