"""Generates the WorkerQueue CRD from the pydantic models: the one source of truth.

A CRD takes a structural subset of OpenAPI 3.0, so the pydantic JSON Schema is rewritten:
every `$ref` inlined, `X | None` turned into `X` with `nullable: true`, titles dropped.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from workerqueue_operator.models import spec

# Keys of JSON Schema that a CRD's structural schema accepts and that the models use.
_KEPT = {
    "type", "description", "default", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "enum", "items", "properties", "required", "minItems", "maxItems", "format", "nullable", "not",
    "additionalProperties", "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def unwrapped(text: str) -> str:
    """A docstring's paragraphs each on one line: `kubectl explain` wraps descriptions itself, and
    the line breaks of the source would show there as ragged lines."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        others = [option for option in any_of if option.get("type") != "null"]
        if len(others) != 1:
            raise ValueError(f"a CRD schema cannot express this union: {any_of}")
        merged = {**others[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        if len(others) != len(any_of):
            merged["nullable"] = True
        return _structural(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEPT:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _structural(value, defs)
        elif key == "default" and value is None:
            continue  # null defaults are the absence of a value
        elif key == "additionalProperties" and value is True:
            continue  # free-form objects say so with x-kubernetes-preserve-unknown-fields
        elif key == "description":
            out[key] = unwrapped(value)
        else:
            out[key] = value  # not a schema (CEL rules, defaults, enums): kept as written
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model, as a CRD version wants it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    result: dict[str, Any] = _structural(raw, defs)
    return result


def _printer_columns() -> list[dict[str, Any]]:
    ready = '.status.conditions[?(@.type=="Ready")]'
    return [
        {"name": "Queue-ID", "type": "string", "jsonPath": ".status.queueId"},
        {"name": "Ephemeral", "type": "boolean", "jsonPath": ".spec.ephemeral"},
        {"name": "Single-Execution", "type": "boolean", "jsonPath": ".spec.singleExecution"},
        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
        # Not part of Ready (see README "Status"): checked from the operator's network, not the workers'.
        {"name": "Temporal", "type": "string", "jsonPath": '.status.conditions[?(@.type=="TemporalReachable")].status'},
        {"name": "Running", "type": "integer", "jsonPath": ".status.workers.running"},
        {"name": "Live", "type": "integer", "jsonPath": ".status.workers.live"},
        {"name": "Backlog", "type": "integer", "jsonPath": ".status.temporal.backlog"},
        {"name": "Pollers", "type": "integer", "jsonPath": ".status.temporal.pollers"},
        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 1},
        {"name": "Desired", "type": "integer", "jsonPath": ".status.workers.desired", "priority": 1},
        {"name": "Pending", "type": "integer", "jsonPath": ".status.workers.pending", "priority": 1},
        {"name": "Task-Queue", "type": "string", "jsonPath": ".status.taskQueue", "priority": 1},
        {"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition of WorkerQueue."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{spec.PLURAL}.{spec.GROUP}",
            "labels": {"app.kubernetes.io/name": "workerqueue-operator", "app.kubernetes.io/part-of": "agentcontrol"},
        },
        "spec": {
            "group": spec.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": spec.PLURAL,
                "singular": spec.SINGULAR,
                "shortNames": list(spec.SHORT_NAMES),
                "categories": list(spec.CATEGORIES),
            },
            "versions": [
                {
                    "name": spec.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A queue of AI-agent workers: where they connect, how they "
                            "authenticate, and whether the operator runs them as pods.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                # Defaulted, so that there always is an old spec: removing it (or
                                # applying `spec: null`) would otherwise skip the transition rules
                                # on it, and a queueId could be dropped, then changed.
                                "spec": {**openapi_schema(spec.WorkerQueueSpec), "default": {}},
                                "status": openapi_schema(spec.WorkerQueueStatus),
                            },
                            "x-kubernetes-validations": [spec.cel(
                                f"self.metadata.name.size() <= {spec.MAX_NAME_LENGTH}",
                                f"metadata.name must be at most {spec.MAX_NAME_LENGTH} characters: the "
                                "operator names the queue's pods and Secrets after it")],
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML file committed under crds/ (and templated into the chart)."""
    header = "# Generated from workerqueue_operator/models/spec.py by `workerqueue-operator crds`. Do not edit.\n"
    return header + yaml.dump(build_crd(), Dumper=_NoAliases, sort_keys=False, width=120)


class _NoAliases(yaml.SafeDumper):
    """Every shared part written out where it is used: no `&id001` anchors, which some GitOps linters
    and patch tools do not follow."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def render_chart_template() -> str:
    """The CRD as a Helm template, so that `helm upgrade` upgrades it too (Helm never upgrades crds/)."""
    keep = ("  {{- if .Values.crds.keep }}\n  annotations:\n    helm.sh/resource-policy: keep\n  {{- end }}\n")
    anchor = "  name: workerqueues.agentcontrol.dev\n"
    crd_yaml = render_crd_yaml().replace(anchor, anchor + keep, 1)
    return "{{- if .Values.crds.install }}\n" + crd_yaml + "{{- end }}\n"
