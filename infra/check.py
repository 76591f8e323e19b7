#!/usr/bin/env python3
"""Checks the deployment manifests offline: infra/knative and infra/lambda/template.yaml.

    ~/.cache/aob/venv/bin/python infra/check.py <repository root>

Prints one JSON object:

    {"knative": [{"file": ..., "kind": ..., "name": ..., "problem": null | "..."}, ...],
     "sam": {"findings": ["<rule> <message> (<file>:<line>:<column>)", ...]}}

Knative objects (serving.knative.dev Service, eventing.knative.dev Broker and Trigger) are
checked against the cloudcoil models of those CRDs (cloudcoil-models-knative-serving and
-eventing) twice: parsed by the pydantic model, and validated against the model's JSON
schema with every object closed (`additionalProperties: false`), because the models
themselves ignore fields they do not know, so a misspelled field would pass them.
Kubernetes objects (Deployment, Service, ConfigMap, Namespace) are validated with
kubernetes-validate against the newest Kubernetes version it knows, strictly (unknown
fields fail). References between the objects are checked too: a Trigger's broker,
subscriber and dead-letter sink, a Broker's ConfigMap, and the bridge's --route URLs
name objects defined in infra/knative. The SAM template goes through cfn-lint with
its informational rules included; every finding is reported.

Exits 0 once the checks ran, whatever they found; non-zero only when they could not run.
"""

import copy
import json
import sys
import warnings
from pathlib import Path
from urllib.parse import urlsplit

KNATIVE_MODELS = {
    ("serving.knative.dev/v1", "Service"): ("cloudcoil.models.knative_serving.serving.v1", "Service"),
    ("eventing.knative.dev/v1", "Broker"): ("cloudcoil.models.knative_eventing.eventing.v1", "Broker"),
    ("eventing.knative.dev/v1", "Trigger"): ("cloudcoil.models.knative_eventing.eventing.v1", "Trigger"),
}


def closed(schema):
    """The JSON schema with every object that lists its properties closed to others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for n in node:
                walk(n)
            return
        if not isinstance(node, dict):
            return
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key in ("properties", "$defs", "patternProperties"):
            for sub in node.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not", "if", "then", "else"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            walk(node.get(key, []))

    walk(schema)
    return schema


def where(path):
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top)"


def leaves(error):
    """The errors under one that says only that no branch of an anyOf matched: every field
    here is optional (`X | null`), so the branch that explains is the one that is not null."""
    if not error.context:
        return [error]
    found = []
    for sub in error.context:
        if sub.validator == "type" and sub.validator_value == "null":
            continue
        found.extend(leaves(sub))
    return found or [error]


class KnativeChecker:
    def __init__(self):
        import importlib

        import jsonschema
        import pydantic

        self.pydantic = pydantic
        self.models = {}
        self.validators = {}
        for key, (module, name) in KNATIVE_MODELS.items():
            model = getattr(importlib.import_module(module), name)
            self.models[key] = model
            schema = closed(model.model_json_schema())
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            self.validators[key] = cls(schema)

    def handles(self, doc):
        return (doc.get("apiVersion"), doc.get("kind")) in self.models

    def problems(self, doc):
        key = (doc.get("apiVersion"), doc.get("kind"))
        out = []
        try:
            # Strict: no coercion (a string is not taken for a number, nor the reverse).
            self.models[key].model_validate(doc, strict=True)
        except self.pydantic.ValidationError as e:
            for err in e.errors():
                out.append(f"{where(err['loc'])}: {err['msg']}")
        except TypeError:
            # The generated models give int-or-string fields (resource quantities such as
            # `cpu: 1`) a pattern pydantic cannot apply to an int, and pydantic gives up on
            # the whole object. The JSON schema below, from the same model, still checks it.
            pass
        errors = [leaf for e in self.validators[key].iter_errors(doc) for leaf in leaves(e)]
        for err in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
            line = f"{where(err.absolute_path)}: {err.message}"
            if line not in out:
                out.append(line)
        return out


def kubernetes_problems(kv, version, doc):
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        return [f"{where(e.absolute_path)}: {e.message}"]
    except kv.SchemaNotFoundError as e:
        return [e.message]
    return []


def reference_problems(doc, defined):
    """Whether the objects this one names are among those defined in infra/knative."""
    out = []
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    ns = (doc.get("metadata") or {}).get("namespace")

    def need(api, k, name, namespace, what):
        if (api, k, namespace or ns, name) not in defined:
            out.append(f"{what}: no {k} {name} ({api}) in namespace {namespace or ns} in infra/knative")

    if doc.get("apiVersion") == "eventing.knative.dev/v1" and kind == "Trigger":
        if spec.get("broker"):
            need("eventing.knative.dev/v1", "Broker", spec["broker"], None, "spec.broker")
        sinks = [("spec.subscriber", spec.get("subscriber") or {})]
        sinks.append(("spec.delivery.deadLetterSink", (spec.get("delivery") or {}).get("deadLetterSink") or {}))
        for what, sink in sinks:
            ref = sink.get("ref")
            if ref:
                need(ref.get("apiVersion"), ref.get("kind"), ref.get("name"), ref.get("namespace"), what + ".ref")
    if doc.get("apiVersion") == "eventing.knative.dev/v1" and kind == "Broker":
        cfg = spec.get("config")
        if cfg:
            need(cfg.get("apiVersion"), cfg.get("kind"), cfg.get("name"), cfg.get("namespace"), "spec.config")
    if doc.get("apiVersion") == "apps/v1" and kind == "Deployment":
        pod = ((spec.get("template") or {}).get("spec")) or {}
        for c in pod.get("containers") or []:
            args = list(c.get("command") or []) + list(c.get("args") or [])
            for flag, value in zip(args, args[1:]):
                if flag != "--route":
                    continue
                _, _, url = value.partition("=")
                host = (urlsplit(url).hostname or "").split(".")
                if len(host) >= 2 and host[2:] in ([], ["svc", "cluster", "local"], ["svc"]):
                    need("serving.knative.dev/v1", "Service", host[0], host[1], f"--route {value}")
                else:
                    out.append(f"--route {value}: not the URL of a Service in the cluster")
    return out


def check_knative(root):
    import kubernetes_validate as kv
    import yaml

    knative = KnativeChecker()
    version = kv.latest_version()
    docs = []
    results = []
    for path in sorted((root / "infra" / "knative").glob("*.yaml")):
        rel = path.relative_to(root).as_posix()
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            results.append({"file": rel, "kind": None, "name": None, "problem": f"not YAML: {e}"})
            continue
        for doc in loaded:
            docs.append((rel, doc))
    defined = set()
    for _, doc in docs:
        if isinstance(doc, dict):
            meta = doc.get("metadata") or {}
            defined.add((doc.get("apiVersion"), doc.get("kind"), meta.get("namespace"), meta.get("name")))
    for rel, doc in docs:
        if not isinstance(doc, dict):
            results.append({"file": rel, "kind": None, "name": None, "problem": "not a mapping"})
            continue
        if knative.handles(doc):
            problems = knative.problems(doc)
        else:
            problems = kubernetes_problems(kv, version, doc)
        problems += reference_problems(doc, defined)
        results.append(
            {
                "file": rel,
                "kind": doc.get("kind"),
                "name": (doc.get("metadata") or {}).get("name"),
                "problem": "; ".join(problems) if problems else None,
            }
        )
    return results


def check_sam(root):
    from cfnlint.api import ManualArgs, lint_file

    template = root / "infra" / "lambda" / "template.yaml"
    matches = lint_file(template, ManualArgs(include_checks=["I"]))
    findings = []
    for m in matches:
        file = Path(m.filename).resolve().relative_to(root.resolve()).as_posix() if m.filename else "?"
        findings.append(f"{m.rule.id} {m.message} ({file}:{m.linenumber}:{m.columnnumber})")
    return {"findings": findings}


def main():
    if len(sys.argv) != 2:
        print("usage: check.py <repository root>", file=sys.stderr)
        return 2
    root = Path(sys.argv[1])
    warnings.simplefilter("ignore")
    report = {"knative": check_knative(root), "sam": check_sam(root)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
