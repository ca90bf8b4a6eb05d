"""The CRD is generated from the models; the committed copies must not drift from them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

from workerqueue_operator.models import crd, spec, values_schema
from workerqueue_operator.models.settings import NamespacedSecretKeyRef, Settings
from workerqueue_operator.models.values_schema import CHART_OWNED_SETTINGS

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_models():
    path = ROOT / "crds" / "agentcontrol.dev_workerqueues.yaml"
    assert path.read_text() == crd.render_crd_yaml(), f"{path} drifted: run `make crds`"


def test_the_generated_crd_has_no_yaml_anchors():
    # `required: &id001` ... `*id001`: kubectl and Helm follow them; some GitOps linters and patch tools do not.
    assert not re.search(r"[&*]id\d+", crd.render_crd_yaml())


def test_chart_crds_match_the_models():
    path = ROOT / "charts" / "workerqueue-operator" / "templates" / "crds" / "workerqueues.yaml"
    assert path.read_text() == crd.render_chart_template(), f"{path} drifted: run `make crds`"


def test_the_charts_extra_config_is_generated_from_the_settings():
    """`make crds` writes it: each setting but those the chart owns, with the type and bounds the
    operator holds it to, so that `helm install` refuses what would crash-loop the pods."""
    path = ROOT / "charts" / "workerqueue-operator" / "values.schema.json"
    assert path.read_text() == values_schema.render(path.read_text()), "run `make crds`"
    extra = json.loads(path.read_text())["properties"]["extraConfig"]
    assert set(extra["properties"]) == set(Settings.model_fields) - CHART_OWNED_SETTINGS
    assert extra["additionalProperties"] is False
    lifetime = extra["properties"]["peering_lifetime_seconds"]
    assert (lifetime["type"], lifetime["minimum"], lifetime["maximum"]) == ("integer", 2, 3600)
    assert extra["properties"]["public_url"]["type"] == ["string", "null"]
    # A list, or its comma-separated string, as the operator takes either (and WQ_* variables give).
    assert extra["properties"]["ignored_secret_types"]["type"] == ["array", "string"]


def test_the_charts_extra_env_refuses_what_extra_config_refuses():
    """Env is read over the config file: a WQ_ variable would set what the chart owns around it."""
    schema = json.loads((ROOT / "charts" / "workerqueue-operator" / "values.schema.json").read_text())
    refused = set(schema["properties"]["extraEnv"]["items"]["properties"]["name"]["not"]["enum"])
    owned = {f"WQ_{name.upper()}" for name in CHART_OWNED_SETTINGS}
    assert refused == owned | {"WQ_CONFIG_FILE", "POD_ID", "PYTHONUNBUFFERED"}


def test_the_charts_urls_are_held_to_the_operators_patterns():
    """Else `helm install` takes a URL the operator then refuses at start, and its pod crash-loops."""
    schema = json.loads((ROOT / "charts" / "workerqueue-operator" / "values.schema.json").read_text())
    assert schema["properties"]["upstream"]["properties"]["url"]["pattern"] == "^$|" + spec.UPSTREAM_URL_PATTERN
    assert schema["properties"]["litellm"]["properties"]["url"]["pattern"] == "^$|" + spec.LITELLM_URL_PATTERN


def walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def test_schema_is_structural():
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "properties" in node and not path.endswith("/properties"):
            assert node.get("type") == "object", path


def test_descriptions_reach_kubectl_explain():
    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "metadata.uid" in spec["properties"]["queueId"]["description"]
    interval = dict(spec["properties"]["heartbeatIntervalSeconds"])
    assert interval.pop("description").startswith("How often workers are to send a heartbeat, in seconds:")
    assert interval == {"default": 60, "maximum": 300, "minimum": 10, "type": "integer"}


def test_every_field_of_the_spec_is_described():
    """README: `kubectl explain workerqueue.spec` documents every field (items of a list are the list's)."""
    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    undescribed = [path for path, node in walk(spec)
                   if path.rpartition("/")[0].endswith("/properties") and not node.get("description")]
    assert undescribed == []


def test_descriptions_keep_no_line_break_of_the_source():
    # kubectl explain wraps a description itself: a docstring's own line breaks would show as ragged lines.
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    described = [(path, node["description"]) for path, node in walk(schema) if isinstance(node.get("description"), str)]
    assert len(described) > 20
    for path, text in described:
        assert "\n" not in text.replace("\n\n", ""), path
    assert crd.unwrapped("One line\n    and its rest.\n\nA second   paragraph.") == (
        "One line and its rest.\n\nA second paragraph.")


def test_printer_columns_and_names():
    doc = yaml.safe_load(crd.render_crd_yaml())
    version = doc["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert names == ["Queue-ID", "Ephemeral", "Single-Execution", "Ready", "Temporal", "Running", "Live", "Backlog",
                     "Pollers", "Age"]
    assert doc["spec"]["names"]["shortNames"] == ["wq"]
    assert doc["spec"]["names"]["categories"] == ["agentcontrol"]
    assert version["subresources"] == {"status": {}}


CHART = ROOT / "charts" / "workerqueue-operator"
PROBES: list[Any] = ["", " ", "a b", "x", "Org_Key", "../x", "http://h:99999", "https://h", "https://h:65536/v1",
                     -1, 0, 1e-6, 0.5, 1, 2.5, 59, 61, 301, 3601, 86401, 2 ** 31, 2 ** 63, 10 ** 20, True, None,
                     [], [""], ["a"], " , ", {}, "x" * 300, "h" * 1100, "http://" + "h" * 2100,
                     "http://h:0000080", "http://h:99999x/", "http://u:p@h:80/", "Opaque", " a, Opaque ", ["Opaque"],
                     {"metadata": {"labels": {"team": "a"}}, "spec": {"nodeSelector": {"pool": "agents"}}}]


def _values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _mapped() -> list[tuple[str, str, bool]]:
    """(setting, value path, whether an empty value is left out) of the chart's config template."""
    template = (CHART / "templates" / "_helpers.tpl").read_text()
    given = [(setting, path, False) for setting, path in re.findall(r'"(\w+)" \(?(?:int )?\$v\.([\w.]+)', template)]
    skipped = [(setting, path, True) for path, setting in
               re.findall(r'\{\{- with \$v\.([\w.]+) \}\}\n\{\{- \$_ := set \$config "(\w+)"', template)]
    assert len(given) > 20 and {s for s, _, _ in skipped} >= {"public_url", "worker_image", "worker_pod_template"}
    return given + skipped


def _refused_by_name(setting: str, value: Any) -> bool:
    try:
        Settings(**{setting: value})
    except pydantic.ValidationError as exc:  # settings that go together (no loc) are not one value's fault
        return any(error["loc"] for error in exc.errors())
    return False


@pytest.mark.parametrize(("setting", "path", "skipped_empty"), _mapped())
def test_a_chart_value_the_schema_takes_the_operator_takes_too(setting: str, path: str, skipped_empty: bool):
    """Else `helm install` succeeds and the operator's pods crash-loop on their settings: each probe
    the values schema lets through must start the operator."""
    node: dict[str, Any] = _values_schema()
    for part in path.split("."):
        node = node["properties"][part]
    accepted = 0
    for value in PROBES:
        if skipped_empty and not value:
            continue
        if jsonschema.Draft7Validator(node).is_valid(value):
            assert not _refused_by_name(setting, value), f"{path}={value!r}"
            accepted += 1
    assert accepted, f"no probe passes the schema of {path}: nothing was tried"


def test_extra_config_takes_only_what_the_operator_takes():
    extra = _values_schema()["properties"]["extraConfig"]["properties"]
    for setting, node in extra.items():
        for value in PROBES:
            if jsonschema.Draft7Validator(node).is_valid(value):
                assert not _refused_by_name(setting, value), f"extraConfig.{setting}={value!r}"
    template = jsonschema.Draft7Validator(extra["worker_pod_template"])
    for refused in ({"foo": 1}, {"spec": {"containers": [{"image": "x"}]}}, {"metadata": {"labels": {"a": 1}}},
                    {"spec": {"hostNetwork": True}}):
        assert _refused_by_name("worker_pod_template", refused), refused
        assert not template.is_valid(refused), refused
    assert template.is_valid({"spec": {"containers": [{"name": "worker", "image": "reg/w:1"}]}})


@pytest.mark.parametrize("part", ["temporal", "litellm", "upstream"])
def test_a_secret_the_chart_takes_the_operator_takes_too(part: str):
    ref = _values_schema()["properties"][part]["properties"]["apiKeySecret"]["properties"]
    checked: set[str] = set()
    for value in (v for v in PROBES if isinstance(v, str) and v):  # empty: none
        for field in ("name", "key"):
            if jsonschema.Draft7Validator(ref[field]).is_valid(value):
                given = {"namespace": "ops", "name": "creds", "key": "k", field: value}
                NamespacedSecretKeyRef(**given)  # raises on what the operator would refuse
                checked.add(field)
    assert checked == {"name", "key"}  # some probe of each passed the schema: each was tried
