"""Issue "Deploy where Envoy runs": the deployment files, checked offline (no container engine, no cluster).

- docker-compose.yml against the Compose Specification schema, and against the files it mounts;
- envoy/compose.yaml is envoy/demo.yaml with the compose addresses, and passes `envoy --mode validate`
  with the built module and compose's default environment;
- every shipped configuration (envoy/*.yaml, the Istio EnvoyFilter, the Envoy Gateway EnvoyPatchPolicy)
  lets the listener role hold the request headers while it reads the body
  (`allow_on_headers_stop_iteration`), so it decides before the first attempt, reloads a failed VM
  (`failure_policy: FAIL_RELOAD`) in both roles, and gives both roles one vm_id, module and configuration;
- the Dockerfiles: the mock's build steps replayed offline, the Wasm image's layout;
- Prometheus config and alert rules with promtool (when installed), the 80% alert unit-tested;
- the Grafana provisioning and dashboard; every panel's PromQL names metrics, labels and label values
  that a real Envoy running tollgate exports after tests/demo_traffic.py, and (with a local Prometheus)
  every panel shows non-zero data;
- every shipped configuration lets Envoy buffer a body of tollgate's max_request_bytes: the listener's
  buffer (while the listener role holds the body) and the router's retry buffer (replayed to the next key
  or provider); on Istio and Envoy Gateway, shown necessary against what the control plane sets by default;
- the Istio and Envoy Gateway manifests against their CRD schemas (tests/schemas/README.md), consistent
  with each other, and the Envoy configuration each control plane would generate from them (the patches
  applied to a listener and clusters of the shape it generates) passes
  `envoy --mode validate` with the built module (validate mode loads the module and runs its
  configuration check, so the plugin configurations are checked too), reading the pod's mounted files
  (module, Secret of provider keys, ConfigMap of SDS documents) laid out as the kubelet lays them out;
- on both, provider keys are secrets Envoy keeps, rotated by changing the Secret alone: the secret names
  agree from tollgate's configuration through each provider cluster's composite filter and the SDS
  documents to the Secret, and nothing is read from the environment (which only a restart changes).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import KEYS, start_shipped_demo
from harness import ENVOY, MOCK_BIN, WASM, free_port, walk

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "schemas"
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


# ---------------------------------------------------------------------------------------------- helpers

def load(rel: str):
    return yaml.safe_load((ROOT / rel).read_text())


def load_all(rel: str) -> list:
    return [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d]


def by_kind(docs: list, kind: str) -> list:
    return [d for d in docs if d.get("kind") == kind]


def closed(schema):
    """Object schemas that list their properties refuse others, as the API server's strict field
    validation refuses unknown fields (except where the CRD preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        if "properties" in schema:
            schema["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        return schema
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    return schema


def schema_errors(schema: dict, doc) -> list[str]:
    v = jsonschema.Draft7Validator(closed(schema))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def crd_errors(schema_file: str, doc: dict) -> list[str]:
    return schema_errors(json.loads((SCHEMAS / schema_file).read_text()), doc)


def compose_errors(doc: dict) -> list[str]:
    schema = json.loads((files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json").read_text())
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def wasm_configs(node) -> list[dict]:
    out = []
    walk(node, lambda d: out.append(d["config"]) if str(d.get("@type", "")).endswith("filters.http.wasm.v3.Wasm") else None)
    return out


def replace_filenames(node, new: str):
    def fn(d):
        if "filename" in d and str(d["filename"]).endswith((".wasm",)):
            d["filename"] = new
    walk(node, fn)


def env_names_in_plugin_config(cfg: dict) -> set[str]:
    names = {k["env"] for p in cfg.get("providers", []) for k in p.get("keys", []) if "env" in k}
    names |= {c["key_env"] for c in cfg.get("consumers", {}).get("list", []) if "key_env" in c}
    names |= {cfg["status"]["admin_key_env"]} if "admin_key_env" in cfg.get("status", {}) else set()
    return names


def envoy_validate(config: dict, env: dict[str, str], tmp_path: Path, cwd: Path | None = None) -> tuple[int, str]:
    path = tmp_path / f"validate-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config))
    r = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "-l", "warning"],
                       env={"PATH": os.environ.get("PATH", ""), **env}, capture_output=True, text=True, timeout=120,
                       cwd=cwd)
    return r.returncode, r.stdout + r.stderr


HCM = "envoy.filters.network.http_connection_manager"


def hcm(http_filters: list[dict], route_cluster: str) -> dict:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gw",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": route_cluster}}]}]},
        "http_filters": http_filters,
    }


def bootstrap(listener: dict, clusters: list[dict]) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def listener_bootstrap(http_filter: dict, clusters: list[dict], route_cluster: str) -> dict:
    """A minimal bootstrap around a control plane's listener filter and its patched clusters."""
    return bootstrap({"name": "gw", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                      "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm([http_filter, ROUTER], route_cluster)}]}]},
                     clusters)


def roles(node) -> dict[str, list[dict]]:
    """root_id -> the Wasm PluginConfigs of that role."""
    out: dict[str, list[dict]] = {}
    for c in wasm_configs(node):
        out.setdefault(c["root_id"], []).append(c)
    return out


def assert_roles_decide_first_and_reload(node) -> None:
    """What every shipped configuration must say: the listener role may hold the request headers while it
    reads the body (allow_on_headers_stop_iteration), so it decides consumer, quota and provider before the
    first attempt; both roles reload a VM that trapped (failure_policy: FAIL_RELOAD; Envoy refuses the
    deprecated fail_open beside it); both share one vm_id, hence one shared-data space, and one build."""
    r = roles(node)
    assert set(r) == {"tollgate.listener", "tollgate.upstream"}, set(r)
    assert all(c.get("allow_on_headers_stop_iteration") is True for c in r["tollgate.listener"])
    every = [c for cs in r.values() for c in cs]
    assert all(c.get("failure_policy") == "FAIL_RELOAD" and "fail_open" not in c for c in every)
    assert len({c["vm_config"].get("vm_id", "") for c in every}) == 1
    assert len({json.dumps(c["vm_config"]["code"], sort_keys=True) for c in every}) == 1
    assert len({json.dumps(json.loads(c["configuration"]["value"]), sort_keys=True) for c in every}) == 1


ENVOY_DEFAULT_BUFFER = 1 << 20  # a listener's per_connection_buffer_limit_bytes when unset


def http_connection_managers(listener: dict) -> list[dict]:
    chains = listener.get("filter_chains", []) + ([listener["default_filter_chain"]] if "default_filter_chain" in listener else [])
    return [f["typed_config"] for c in chains for f in c["filters"] if f["name"] == HCM]


def assert_buffers_take_max_request(cfg: dict) -> None:
    """Envoy's buffers take every body tollgate admits: the listener's (what Envoy buffers while the
    listener role holds a body) and, for every route, the router's retry buffer (the route's or virtual
    host's request_body_buffer_limit, else the listener's), each over tollgate's max_request_bytes.
    Otherwise Envoy refuses a long prompt with 413 before tollgate reads it, or a 429 is not retried."""
    max_request = json.loads(wasm_configs(cfg)[0]["configuration"]["value"]).get("max_request_bytes", 4 << 20)
    checked = 0
    for listener in cfg["static_resources"]["listeners"]:
        hcms = [h for h in http_connection_managers(listener) if "tollgate.listener" in roles(h["http_filters"])]
        if not hcms:
            continue
        own = listener.get("per_connection_buffer_limit_bytes", ENVOY_DEFAULT_BUFFER)
        assert own > max_request, f"{listener['name']}: per_connection_buffer_limit_bytes {own} <= {max_request}"
        for h in hcms:
            for vh in h["route_config"]["virtual_hosts"]:
                for r in vh["routes"]:
                    retry = r.get("request_body_buffer_limit", vh.get("request_body_buffer_limit", own))
                    assert retry > max_request, f"{vh['name']} {r['match']}: retry buffer {retry} <= {max_request}"
                    checked += 1
    assert checked, "no route behind tollgate's listener role"


def host_env(node) -> dict[str, str]:
    """A test value for every variable the configuration's Wasm VMs read."""
    return {k: f"test-{k}" for c in wasm_configs(node)
            for k in c["vm_config"].get("environment_variables", {}).get("host_env_keys", [])}


def tls_cluster(name: str, host: str) -> dict:
    """A provider cluster the way a control plane generates it, before tollgate's patch."""
    return {
        "name": name, "type": "STRICT_DNS", "connect_timeout": "5s", "dns_lookup_family": "V4_ONLY",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": 443}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni": host}},
    }


def json_patch_add(doc: dict, pointer: str, value) -> None:
    """RFC 6902 `add`: sets an object member, or inserts into an array before the element at that index."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.lstrip("/").split("/")]
    target = doc
    for p in parts[:-1]:
        target = target[int(p)] if isinstance(target, list) else target[p]
    if isinstance(target, list):
        target.insert(len(target) if parts[-1] == "-" else int(parts[-1]), copy.deepcopy(value))
    else:
        target[parts[-1]] = copy.deepcopy(value)


def json_path_pointers(doc, json_path: str) -> list[str]:
    """Envoy Gateway turns an operation's jsonPath into JSON pointers (internal/utils/jsonpatch). Only the
    form the manifests use is understood here: `..<key>[?(@.name == '<value>')]`."""
    m = re.fullmatch(r"\.\.(\w+)\[\?\(@\.name == '([^']*)'\)\]", json_path)
    assert m, f"jsonPath {json_path!r} is not of the form this test evaluates"
    key, name = m.groups()
    out = []

    def visit(node, pointer: str):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key and isinstance(v, list):
                    out.extend(f"{pointer}/{k}/{i}" for i, e in enumerate(v) if isinstance(e, dict) and e.get("name") == name)
                visit(v, f"{pointer}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{pointer}/{i}")
    visit(doc, "")
    return out


def dockerfile(rel: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / rel).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def dockerignore_includes(patterns: list[str], path: str) -> bool:
    """Docker's rules: the last pattern matching the path or one of its parent directories wins."""
    def rx(p: str) -> re.Pattern:
        p = p.strip("/")
        out = ""
        i = 0
        while i < len(p):
            if p.startswith("**", i):
                out += ".*"
                i += 2
            elif p[i] == "*":
                out += "[^/]*"
                i += 1
            elif p[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(p[i])
                i += 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        neg = raw.startswith("!")
        pat = rx(raw[1:] if neg else raw)
        if any(pat.match(p) for p in prefixes):
            included = neg
    return included


def compose_env_defaults() -> dict[str, str]:
    env = load("docker-compose.yml")["services"]["envoy"]["environment"]
    out = {}
    for name, value in env.items():
        m = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(value))
        assert m and m.group(1) == name, f"{name}: {value!r} is not ${{{name}:-default}}"
        out[name] = m.group(2)
    return out


METRIC = re.compile(r"\btollgate_[a-z0-9_]+\b")


def promql_labels(expr: str) -> dict[str, set[str]]:
    """Label names each metric is grouped by or matched on in an expression (by/without and {..})."""
    out: dict[str, set[str]] = {}
    groups = [set(map(str.strip, g.split(","))) for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)]
    for m in re.finditer(r"\b(tollgate_[a-z0-9_]+)\b(\{([^}]*)\})?", expr):
        labels = out.setdefault(m.group(1), set())
        labels |= {k for k, _, _ in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', m.group(3) or "")}
        for g in groups:
            labels |= g
    return out


def promql_matcher_values(expr: str) -> dict[tuple[str, str], set[str]]:
    """(metric, label) -> the label values an = or =~ matcher expects to exist."""
    out: dict[tuple[str, str], set[str]] = {}
    for m in re.finditer(r"\b(tollgate_[a-z0-9_]+)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', m.group(2)):
            out.setdefault((m.group(1), label), set()).update(value.split("|") if op == "=~" else [value])
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads((ROOT / "deploy/grafana/dashboards/tollgate.json").read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [r for g in load("deploy/prometheus/alerts.yml")["groups"] for r in g["rules"]]


def parse_prometheus(text: str) -> dict[str, list[dict[str, str]]]:
    """metric name -> label sets of its samples."""
    out: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.setdefault(m.group(1), []).append(labels)
    return out


def demo_plugin() -> dict:
    demo = load("envoy/demo.yaml")
    return json.loads(wasm_configs(demo)[0]["configuration"]["value"])


def demo_traffic_module():
    spec = importlib.util.spec_from_file_location("demo_traffic", ROOT / "tests" / "demo_traffic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------- provider keys Envoy keeps

# The request header tollgate.upstream sets to the secret name of the key it chose (src/api/headers.rs).
CREDENTIAL_HEADER = "x-tollgate-credential"
COMPOSITE = "envoy.filters.http.composite"
HEADER_MUTATION = "envoy.filters.http.header_mutation"
UPSTREAM_CODEC = "envoy.filters.http.upstream_codec"
# The header Envoy's generic credential writes for each provider type, and the prefix before the raw key.
INJECTED = {"openai": ("authorization", "Bearer "), "openai_compatible": ("authorization", "Bearer "),
            "azure_openai": ("api-key", None), "anthropic": ("x-api-key", None)}
# Istio's bootstrap (istio-agent's envoy_bootstrap.json) and Envoy Gateway's (--service-node,
# --service-cluster) set a node id and cluster; Envoy's file-based SDS refuses to start without them.
NODE = {"id": "gateway-pod", "cluster": "gateway"}
SDS_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sds_keys(plugin: dict) -> dict[str, list[str]]:
    """provider -> the secret names of its keys; every provider key of a shipped manifest is an `sds` key."""
    out = {}
    for p in plugin["providers"]:
        assert all(set(k) & {"env", "value", "sds"} == {"sds"} for k in p["keys"]), p["keys"]
        out[p["name"]] = [k["sds"] for k in p["keys"]]
    return out


def credential_entries(http_filters: list[dict]) -> dict[str, dict]:
    """secret name -> the generic credential a provider cluster's composite filter injects for it, after
    checking the upstream filters around it: tollgate.upstream names the secret, the composite injects
    it, header_mutation removes the name, upstream_codec last."""
    assert [f["name"] for f in http_filters] == ["tollgate.upstream", COMPOSITE, HEADER_MUTATION, UPSTREAM_CODEC]
    composite, mutation = http_filters[1]["typed_config"], http_filters[2]["typed_config"]
    assert mutation["@type"].endswith("filters.http.header_mutation.v3.HeaderMutation")
    assert mutation["mutations"] == {"request_mutations": [{"remove": CREDENTIAL_HEADER}]}
    assert composite["@type"].endswith("common.matching.v3.ExtensionWithMatcher")
    assert composite["extension_config"]["typed_config"]["@type"].endswith("filters.http.composite.v3.Composite")
    # Exact names only, and no on_no_match: a name the composite does not list gets no credential.
    assert set(composite["xds_matcher"]) == {"matcher_tree"}
    tree = composite["xds_matcher"]["matcher_tree"]
    assert set(tree) == {"input", "exact_match_map"}
    assert tree["input"]["typed_config"]["@type"].endswith("type.matcher.v3.HttpRequestHeaderMatchInput")
    assert tree["input"]["typed_config"]["header_name"] == CREDENTIAL_HEADER
    out = {}
    for name, entry in tree["exact_match_map"]["map"].items():
        action = entry["action"]
        assert action["name"] == name and action["typed_config"]["@type"].endswith("composite.v3.ExecuteFilterAction")
        injector = action["typed_config"]["typed_config"]
        assert injector["name"] == "envoy.filters.http.credential_injector"
        cfg = injector["typed_config"]
        # overwrite: whatever auth header the attempt carries is replaced. allow_request_without_credential:
        # a secret Envoy could not load sends the attempt without a key, and the provider's 401 is retried
        # with another key; a 401 from Envoy's own upstream filter would be final.
        assert cfg["overwrite"] is True and cfg["allow_request_without_credential"] is True
        assert cfg["credential"]["name"] == "envoy.http.injected_credentials.generic"
        generic = cfg["credential"]["typed_config"]
        assert generic["@type"].endswith("injected_credentials.generic.v3.Generic")
        assert generic["credential"]["name"] == name
        out[name] = generic
    return out


def assert_keys_wired(plugin: dict, filters_by_provider: dict[str, list[dict]], secret: dict, sds_docs: dict,
                      mounts: dict[str, str]) -> None:
    """The secret names agree from tollgate's configuration to the Secret: each provider cluster's composite
    lists exactly that provider's keys and injects them in that provider's header, each from the SDS
    document of that name (mounted ConfigMap), which names the Secret's file of that name, in a directory
    Envoy watches (mounted Secret)."""
    names = sds_keys(plugin)
    types = {p["name"]: p["type"] for p in plugin["providers"]}
    assert set(filters_by_provider) == set(names)
    for provider, filters in filters_by_provider.items():
        entries = credential_entries(filters)
        assert sorted(entries) == sorted(names[provider]), provider
        header, prefix = INJECTED[types[provider]]
        for name, generic in entries.items():
            assert (generic["header"], generic.get("header_value_prefix")) == (header, prefix), name
            assert generic["credential"]["sds_config"] == {
                "path_config_source": {"path": f"{mounts['sds']}/{name}.json",
                                       "watched_directory": {"path": mounts["keys"]}},
                "resource_api_version": "V3"}, name
    every = [n for ns in names.values() for n in ns]
    assert len(every) == len(set(every)), every
    assert set(secret["stringData"]) == set(every)
    assert set(sds_docs["data"]) == {f"{n}.json" for n in every}
    for n in every:
        assert json.loads(sds_docs["data"][f"{n}.json"]) == {"resources": [{
            "@type": SDS_SECRET_TYPE, "name": n, "generic_secret": {"secret": {"filename": f"{mounts['keys']}/{n}"}}}]}
    assert secret["metadata"]["namespace"] == sds_docs["metadata"]["namespace"]


def pod_mounts(volumes: list[dict], mounts: list[dict], secret: dict, sds_docs: dict) -> dict[str, str]:
    """`keys`, `sds`, `module` -> where the proxy container mounts the Secret, the ConfigMap and the
    tollgate image. The Secret and the ConfigMap are mounted whole, without `items` (a key added later
    appears without changing the pod) and without subPath (the kubelet never updates a subPath mount)."""
    by_name = {v["name"]: v for v in volumes}
    assert sorted(by_name) == sorted(m["name"] for m in mounts)
    out = {}
    for m in mounts:
        assert m.get("readOnly") is True and not {"subPath", "subPathExpr"} & set(m), m
        v = by_name[m["name"]]
        if "secret" in v:
            assert v["secret"] == {"secretName": secret["metadata"]["name"]}, v
            out["keys"] = m["mountPath"]
        elif "configMap" in v:
            assert v["configMap"] == {"name": sds_docs["metadata"]["name"]}, v
            out["sds"] = m["mountPath"]
        else:
            assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+(:[\w.-]+|@sha256:[0-9a-f]{64})", v["image"]["reference"])
            out["module"] = m["mountPath"]
    assert sorted(out) == ["keys", "module", "sds"], out
    return out


def image_reference(volumes: list[dict]) -> str:
    (ref,) = [v["image"]["reference"] for v in volumes if "image" in v]
    return ref


def assert_nothing_from_env(plugin: dict, wasm_cfgs: list[dict], container: dict) -> None:
    """Nothing tollgate needs comes from environment variables, which change only when the pod restarts:
    consumers are digests, provider keys are files Envoy watches."""
    assert env_names_in_plugin_config(plugin) == set()
    assert all("key_sha256" in c for c in plugin["consumers"]["list"])
    assert all("environment_variables" not in c["vm_config"] for c in wasm_cfgs)
    assert not {"env", "envFrom"} & set(container), container


def kubelet_volume(path: Path, files: dict[str, str]) -> None:
    """A Secret or ConfigMap volume laid out as the kubelet does: the files in a timestamped directory,
    `..data` a link to it (swapped atomically on an update), and each file a link through `..data`."""
    ts = path / "..2026_01_01_00_00_00.000000001"
    ts.mkdir(parents=True)
    for name, content in files.items():
        (ts / name).write_text(content)
    (path / "..data").symlink_to(ts.name)
    for name in files:
        (path / name).symlink_to(f"..data/{name}")


def in_pod(cfg: dict, root: Path, mounts: dict[str, str], secret: dict, sds_docs: dict) -> dict:
    """The pod's mounted files under `root` (the Secret and ConfigMap as the kubelet lays them out, the
    image volume's plugin.wasm the built module), and `cfg` with every path under a mount moved there."""
    def rebase(text: str) -> str:
        for m in mounts.values():
            text = text.replace(f'"{m}/', f'"{root}{m}/').replace(f'"{m}"', f'"{root}{m}"')
        return text

    kubelet_volume(root / mounts["keys"].lstrip("/"), secret["stringData"])
    kubelet_volume(root / mounts["sds"].lstrip("/"), {k: rebase(v) for k, v in sds_docs["data"].items()})
    module = root / mounts["module"].lstrip("/")
    module.mkdir(parents=True)
    (module / "plugin.wasm").symlink_to(WASM)
    out = json.loads(rebase(json.dumps(cfg)))
    assert out != cfg
    return out


def assert_pod_config_passes_envoy_validate(cfg: dict, root: Path, mounts: dict[str, str], tmp_path: Path) -> None:
    """`envoy --mode validate` on the configuration a control plane would generate, as the pod reads it; and
    the two things file-based SDS needs from the platform, each shown to be necessary."""
    rc, out = envoy_validate(cfg, {}, tmp_path)
    assert rc == 0 and "OK" in out, out[-3000:]
    # Validate mode reads the SDS documents but not the files they name: those are read when the cluster
    # initializes, which for a cluster of DNS names (api.openai.com) comes after validation ends. So: each
    # document names a file of the Secret as mounted.
    sds_dir = root / mounts["sds"].lstrip("/")
    docs = sorted(sds_dir.glob("*.json"))
    assert docs
    for doc in docs:
        (res,) = json.loads(doc.read_text())["resources"]
        assert Path(res["generic_secret"]["secret"]["filename"]).is_file(), doc
    bad = copy.deepcopy(cfg)
    del bad["node"]
    rc, out = envoy_validate(bad, {}, tmp_path)
    assert rc != 0 and "node 'id' and 'cluster' are required" in out, out[-3000:]
    # An SDS document must exist before a cluster names it: Envoy refuses the cluster (at run time, it
    # rejects the cluster update and keeps the previous cluster).
    doc = docs[0]
    target = doc.resolve()
    doc.unlink()
    try:
        rc, out = envoy_validate(cfg, {}, tmp_path)
        assert rc != 0 and f"'{doc}' does not exist" in out, out[-3000:]
    finally:
        doc.symlink_to(f"..data/{doc.name}")
        assert doc.resolve() == target


# ---------------------------------------------------------------------------------------------- compose

def test_compose_file_is_valid_compose_spec():
    doc = load("docker-compose.yml")
    assert compose_errors(doc) == []
    # The schema is strict enough to catch a misspelt key or a wrong shape.
    bad = copy.deepcopy(doc)
    bad["services"]["envoy"]["portz"] = ["10000:10000"]
    assert any("portz" in e for e in compose_errors(bad))
    bad = copy.deepcopy(doc)
    bad["services"]["grafana"]["depends_on"] = "prometheus"
    assert compose_errors(bad) != []


def test_compose_file_matches_what_it_mounts_and_runs():
    doc = load("docker-compose.yml")
    svc = doc["services"]
    assert set(svc) == {"envoy", "openai-mock", "anthropic-mock", "prometheus", "grafana"}
    for name, s in svc.items():  # pinned images, no :latest
        if "build" not in s:
            repo, _, tag = s["image"].rpartition(":")
            assert repo and re.match(r"v?\d+\.\d+\.\d+$", tag), f"{name}: {s['image']} is not pinned"
    assert re.fullmatch(r"envoyproxy/envoy:v1\.40\.\d+", svc["envoy"]["image"])

    def mounts(s):
        out = {}
        for v in s.get("volumes", []):
            if isinstance(v, str):
                src, dst = v.split(":")[:2]
            else:
                src, dst = v["source"], v["target"]
            out[dst] = src
        return out

    envoy_mounts = mounts(svc["envoy"])
    assert envoy_mounts["/etc/envoy/envoy.yaml"] == "./envoy/compose.yaml"
    assert envoy_mounts["/etc/envoy/tollgate.wasm"] == "./" + str(WASM.relative_to(ROOT))
    for s in svc.values():
        for src in mounts(s).values():
            if "target/" not in src:
                assert (ROOT / src).exists(), f"{src} is mounted but does not exist"

    envoy_cfg = load("envoy/compose.yaml")
    cfgs = wasm_configs(envoy_cfg)
    assert {c["vm_config"]["code"]["local"]["filename"] for c in cfgs} == {"/etc/envoy/tollgate.wasm"}
    assert set(cfgs[0]["vm_config"]["environment_variables"]["host_env_keys"]) <= set(compose_env_defaults())
    assert envoy_cfg["admin"]["address"]["socket_address"]["port_value"] == 9901
    assert envoy_cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 10000
    assert {"10000:10000", "9901:9901"} <= set(svc["envoy"]["ports"])

    # Every mock endpoint of the Envoy config is a compose service listening on that port on all interfaces.
    endpoints = set()
    for c in envoy_cfg["static_resources"]["clusters"]:
        assert c["type"] == "STRICT_DNS"
        for prio in c["load_assignment"]["endpoints"]:
            for e in prio["lb_endpoints"]:
                sa = e["endpoint"]["address"]["socket_address"]
                endpoints.add((sa["address"], sa["port_value"]))
    assert endpoints == {("openai-mock", 18001), ("anthropic-mock", 18002)}
    for host, port in endpoints:
        cmd = svc[host]["command"]
        args = dict(zip(cmd[::2], cmd[1::2]))
        assert args["--host"] == "0.0.0.0" and args["--port"] == str(port)
        assert f"{port}:{port}" in svc[host]["ports"]  # demo_traffic.py scripts the mocks from the host
        assert (ROOT / svc[host]["build"]["context"] / svc[host]["build"]["dockerfile"]).exists()

    prom = load("deploy/prometheus/prometheus.yml")
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounts(svc["prometheus"]) == {"/etc/prometheus/prometheus.yml": "./deploy/prometheus/prometheus.yml",
                                         "/etc/prometheus/alerts.yml": "./deploy/prometheus/alerts.yml"}
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/stats/prometheus" and job["static_configs"][0]["targets"] == ["envoy:9901"]

    graf = mounts(svc["grafana"])
    provider = load("deploy/grafana/provisioning/dashboards/tollgate.yml")["providers"][0]
    assert graf[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert graf["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    home = svc["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / Path(home).relative_to(provider["options"]["path"])).exists()
    (ds,) = load("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "9090:9090" in svc["prometheus"]["ports"]


def test_compose_envoy_config_is_the_demo_config_with_compose_addresses():
    demo, compose = load("envoy/demo.yaml"), load("envoy/compose.yaml")
    demo["admin"]["address"]["socket_address"]["address"] = "0.0.0.0"
    demo["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = "0.0.0.0"
    replace_filenames(demo, "/etc/envoy/tollgate.wasm")
    hosts = {18001: "openai-mock", 18002: "anthropic-mock"}
    for c in demo["static_resources"]["clusters"]:
        c["type"] = "STRICT_DNS"
        c["dns_lookup_family"] = "V4_ONLY"
        walk(c, lambda d: d.update(address=hosts[d["port_value"]]) if "port_value" in d else None)
    assert compose == demo


def test_compose_envoy_config_passes_envoy_validate(tmp_path):
    cfg = load("envoy/compose.yaml")
    replace_filenames(cfg, str(WASM))
    rc, out = envoy_validate(cfg, compose_env_defaults(), tmp_path)
    assert rc == 0 and "OK" in out, out[-3000:]
    # validate mode refuses a broken Envoy field, and runs tollgate's own configuration check: an unknown
    # plugin field, or a key variable compose does not set, fails (so the check above means something).
    bad = copy.deepcopy(cfg)
    bad["static_resources"]["clusters"][0]["connect_timeoutt"] = "2s"
    rc, out = envoy_validate(bad, compose_env_defaults(), tmp_path)
    assert rc != 0 and "connect_timeoutt" in out
    bad = copy.deepcopy(cfg)
    for c in wasm_configs(bad):
        c["configuration"]["value"] = c["configuration"]["value"].replace('"default_max_tokens"', '"default_max_tokenz"')
    rc, out = envoy_validate(bad, compose_env_defaults(), tmp_path)
    assert rc != 0 and "tollgate: invalid configuration" in out and "default_max_tokenz" in out
    env = compose_env_defaults()
    del env["TEAM_B_KEY"]
    rc, out = envoy_validate(cfg, env, tmp_path)
    assert rc != 0 and "TEAM_B_KEY" in out
    # The deprecated fail_open beside failure_policy is refused, not silently preferred.
    bad = copy.deepcopy(cfg)
    wasm_configs(bad)[0]["fail_open"] = True
    rc, out = envoy_validate(bad, compose_env_defaults(), tmp_path)
    assert rc != 0 and "only one of fail_open or failure_policy" in out


SHIPPED_ENVOY_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "envoy").glob("*.yaml"))


@pytest.mark.parametrize("rel", SHIPPED_ENVOY_CONFIGS)
def test_shipped_envoy_config_decides_before_the_first_attempt_and_passes_envoy_validate(rel, tmp_path):
    cfg = load(rel)
    assert_roles_decide_first_and_reload(cfg)
    assert_buffers_take_max_request(cfg)
    replace_filenames(cfg, str(WASM))
    rc, out = envoy_validate(cfg, host_env(cfg), tmp_path)
    assert rc == 0 and "OK" in out, out[-3000:]


@pytest.fixture
def shipped_demo(mocks):
    gw = start_shipped_demo(mocks)
    yield gw
    gw.stop()


def test_demo_serves_each_model_family_from_its_provider_and_fails_over(shipped_demo, mocks):
    """envoy/demo.yaml as `make run` starts it, with both SDKs: a Claude model reaches the Anthropic mock and
    a GPT model the OpenAI mock, each in its own API; a GPT model that OpenAI refuses falls over to
    Anthropic as the Claude model mapped to it; a model neither serves is refused in the client's shape."""
    import anthropic  # noqa: PLC0415
    import openai  # noqa: PLC0415

    oa = openai.OpenAI(base_url=f"{shipped_demo.base_url}/v1", api_key="tg-demo-team-a", max_retries=0)
    an = anthropic.Anthropic(base_url=shipped_demo.base_url, api_key="tg-demo-team-a", max_retries=0)
    hello = [{"role": "user", "content": "Say hello"}]

    raw = an.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=50, messages=hello)
    assert raw.headers["x-tollgate-provider"] == "anthropic"
    assert raw.parse().content[0].text == "Hello from anthropic."
    (sent,) = mocks["anthropic"].requests()
    assert sent["path"] == "/v1/messages" and json.loads(sent["body"])["model"] == "claude-haiku-4-5"
    assert sent["key"] == KEYS["ANTHROPIC_KEY_1"]
    assert mocks["openai"].requests() == []
    # The OpenAI SDK naming a Claude model reaches Anthropic too, translated both ways.
    raw = oa.chat.completions.with_raw_response.create(model="claude-sonnet-4-5", messages=hello)
    assert raw.headers["x-tollgate-provider"] == "anthropic"
    assert raw.parse().choices[0].message.content == "Hello from anthropic."
    assert json.loads(mocks["anthropic"].requests()[-1]["body"])["model"] == "claude-sonnet-4-5"
    assert mocks["openai"].requests() == []

    raw = oa.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=hello)
    assert raw.headers["x-tollgate-provider"] == "openai"
    assert raw.parse().choices[0].message.content == "Hello from openai."
    (sent,) = mocks["openai"].requests()
    assert sent["path"] == "/v1/chat/completions" and json.loads(sent["body"])["model"] == "gpt-4o-mini"
    assert len(mocks["anthropic"].requests()) == 2

    # Failover: OpenAI refuses once, the retry goes to Anthropic as claude-haiku-4-5.
    mocks["openai"].script({"status": 429, "headers": {"retry-after": "1"}, "times": 1})
    raw = oa.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=hello)
    assert raw.headers["x-tollgate-provider"] == "anthropic"
    assert raw.parse().model == "gpt-4o-mini"
    assert [r["status"] for r in mocks["openai"].requests()] == [200, 429]
    assert json.loads(mocks["anthropic"].requests()[-1]["body"])["model"] == "claude-haiku-4-5"

    with pytest.raises(anthropic.BadRequestError) as e:
        an.messages.create(model="gemini-2.5-pro", max_tokens=50, messages=hello)
    assert e.value.body["error"]["message"] == "The model 'gemini-2.5-pro' is not served by this gateway."
    assert len(mocks["anthropic"].requests()) == 3 and len(mocks["openai"].requests()) == 2


# ---------------------------------------------------------------------------------------------- rotation example

ROTATION = "envoy/rotation"
def rotation_static(base: Path = ROOT) -> dict:
    """The rotation example's bootstrap with its LDS and CDS files' resources as static resources:
    `envoy --mode validate` does not read dynamic resources, so this is what it can check."""
    boot = yaml.safe_load((base / ROTATION / "envoy.yaml").read_text())
    dyn = boot.pop("dynamic_resources")
    read = lambda key: [{k: v for k, v in r.items() if k != "@type"}  # noqa: E731
                        for r in yaml.safe_load((base / dyn[key]["path_config_source"]["path"]).read_text())["resources"]]
    boot["static_resources"] = {"listeners": read("lds_config"), "clusters": read("cds_config")}
    return boot


def test_rotation_example_passes_envoy_validate_and_gives_every_sds_key_its_credential(tmp_path):
    cfg = rotation_static()
    assert_roles_decide_first_and_reload(cfg)
    assert_buffers_take_max_request(cfg)
    plugin = json.loads(wasm_configs(cfg)[0]["configuration"]["value"])
    want = {k["sds"]: INJECTED[p["type"]] for p in plugin["providers"] for k in p["keys"]}
    assert want and all("sds" in k for p in plugin["providers"] for k in p["keys"]), "every key of the example is an sds key"
    for cluster in cfg["static_resources"]["clusters"]:
        entries = credential_entries(cluster["typed_extension_protocol_options"][HPO]["http_filters"])
        assert {n: (g["header"], g.get("header_value_prefix")) for n, g in entries.items()} == want, cluster["name"]
        for name, g in entries.items():
            sds = g["credential"]["sds_config"]["path_config_source"]["path"]
            (res,) = yaml.safe_load((ROOT / sds).read_text())["resources"]
            assert res["name"] == name and set(res["generic_secret"]["secret"]) == {"filename"}, sds
            assert (ROOT / res["generic_secret"]["secret"]["filename"]).is_file()
    replace_filenames(cfg, str(WASM))
    rc, out = envoy_validate(cfg, host_env(cfg), tmp_path, cwd=ROOT)
    assert rc == 0 and "OK" in out, out[-3000:]


def test_rotation_example_serves_and_takes_a_replaced_key_file(mocks, tmp_path):
    """The example as shipped (its relative paths, from a copy of the tree), on free ports: a key file
    replaced by a rename is what the provider sees next."""
    from harness import Envoy, chat  # noqa: PLC0415
    shutil.copytree(ROOT / ROTATION, tmp_path / ROTATION)
    (tmp_path / "target").symlink_to(ROOT / "target")
    ports = {10000: free_port(), 9901: free_port(), 18001: mocks["openai"].port, 18002: mocks["anthropic"].port}
    for rel in ("envoy.yaml", "lds.yaml", "cds.yaml"):
        # (through JSON: YAML aliases are one shared object, and each port is changed once)
        doc = json.loads(json.dumps(yaml.safe_load((tmp_path / ROTATION / rel).read_text())))
        walk(doc, lambda d: d.update(port_value=ports[d["port_value"]]) if "port_value" in d else None)
        (tmp_path / ROTATION / rel).write_text(json.dumps(doc))
    boot = yaml.safe_load((tmp_path / ROTATION / "envoy.yaml").read_text())
    gw = Envoy(boot, env={"TOLLGATE_ADMIN_KEY": "tg-test-admin"}, cwd=tmp_path)
    gw.port = ports[10000]
    gw.start()
    try:
        deadline = time.time() + 10
        while gw.stat("listener_manager.lds.update_success") < 1 and time.time() < deadline:
            time.sleep(0.1)
        assert chat(gw.port).status == 200
        assert mocks["openai"].requests()[-1]["key"] in {"sk-demo-rotation-openai-1", "sk-demo-rotation-openai-2"}
        # OpenAI refuses once: the retry goes to Anthropic, with its own header.
        mocks["openai"].script({"status": 429, "headers": {"retry-after": "1"}, "times": 1})
        r = chat(gw.port)
        assert r.status == 200 and r.headers["x-tollgate-provider"] == "anthropic", r
        assert mocks["anthropic"].requests()[-1]["headers"]["x-api-key"] == "sk-ant-demo-rotation-1"
        key = tmp_path / ROTATION / "keys" / "openai-1"
        new = key.with_name(".openai-1.new")
        new.write_text("sk-demo-rotation-openai-1-NEW\n")
        os.replace(new, key)
        deadline = time.time() + 5
        while time.time() < deadline:
            assert chat(gw.port).status == 200
            if mocks["openai"].requests()[-1]["key"] == "sk-demo-rotation-openai-1-NEW":
                break
        assert mocks["openai"].requests()[-1]["key"] == "sk-demo-rotation-openai-1-NEW"
        # From then on the old key is gone. (The request just before the first NEW one may still
        # have used it: the file changed between the two. Each worker takes the new secret from
        # the main thread, so the other worker is given a moment.)
        time.sleep(0.5)
        seen = len(mocks["openai"].requests())
        for _ in range(6):
            assert chat(gw.port).status == 200
        after = mocks["openai"].requests()[seen:]
        keys = {"sk-demo-rotation-openai-1-NEW", "sk-demo-rotation-openai-2"}
        assert after and all(q["key"] in keys for q in after), [q["key"] for q in after]
    finally:
        gw.stop()


# ---------------------------------------------------------------------------------------------- images

def test_mock_provider_dockerfile_builds_from_what_it_copies(tmp_path):
    steps = dockerfile("tests/mock-provider/Dockerfile")
    froms = [a for i, a in steps if i == "FROM"]
    assert len(froms) == 2 and re.match(r"rust:\d+\.\d+-slim-\w+ AS build$", froms[0]), froms
    assert ":" in froms[1] and "latest" not in froms[1]
    build = steps[: [i for i, _ in steps].index("FROM", 1)]
    workdir = next(a for i, a in build if i == "WORKDIR")
    copies = [a.split() for i, a in build if i == "COPY"]
    (run,) = [a for i, a in build if i == "RUN"]
    assert "-p mock-provider" in run and "--locked" in run

    ignore = [l.strip() for l in (ROOT / "tests/mock-provider/Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    sources = [s for c in copies for s in c[:-1]]
    for s in sources:
        assert (ROOT / s).exists() and dockerignore_includes(ignore, s.rstrip("/")), s
    for heavy in ("target/release/mock-provider", ".venv/bin/python", "src/lib.rs", "tests/e2e/harness.py"):
        assert not dockerignore_includes(ignore, heavy), f"{heavy} would be sent to the builder"

    # Replay the build stage: only the copied files, no network.
    ctx = tmp_path / workdir.strip("/")
    for *srcs, dst in copies:
        for s in srcs:
            target = ctx / dst / Path(s).name if dst.endswith("/") else ctx / dst
            if (ROOT / s).is_dir():
                shutil.copytree(ROOT / s, target, ignore=shutil.ignore_patterns("target"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / s, target)
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target" / "docker-replay")}
    r = subprocess.run(run.split() + ["--offline"], cwd=ctx, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    final = steps[[i for i, _ in steps].index("FROM", 1):]
    (copy_bin,) = [a.split() for i, a in final if i == "COPY"]
    assert copy_bin[0] == "--from=build" and copy_bin[1] == f"{workdir}/target/release/mock-provider"
    entry = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    assert entry == [copy_bin[2]]
    assert (ROOT / "target" / "docker-replay" / "release" / "mock-provider").exists()


def test_mock_provider_accepts_the_compose_command_line():
    cmd = load("docker-compose.yml")["services"]["openai-mock"]["command"]
    args = dict(zip(cmd[::2], cmd[1::2]))
    args.update({"--host": "127.0.0.1", "--port": str(free_port())})
    proc = subprocess.Popen([str(MOCK_BIN), *[x for kv in args.items() for x in kv]], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"mock-provider openai listening on 127.0.0.1:{args['--port']}"
    finally:
        proc.terminate()
        proc.wait(5)


def test_wasm_image_is_the_module_alone_as_plugin_wasm():
    steps = dockerfile("deploy/wasm-image/Dockerfile")
    assert steps == [("FROM", "scratch"), ("COPY", f"{WASM.name} ./plugin.wasm")]
    # The documented build context is where `make build` leaves the module.
    assert str(WASM.parent.relative_to(ROOT)) in (ROOT / "deploy/wasm-image/Dockerfile").read_text()


# ---------------------------------------------------------------------------------------------- prometheus

def test_alert_rule_is_the_80_percent_budget_gauge():
    rule = next(r for r in alert_rules() if r["alert"] == "TollgateConsumerBudget80Percent")
    assert re.search(r"\btollgate_consumer_limit_used_permille\b.*>=\s*800\s*$", rule["expr"]), rule["expr"]
    assert rule["labels"]["severity"] == "warning"


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package `prometheus`)")


@needs_promtool
def test_prometheus_config_and_rules_pass_promtool(tmp_path):
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    cfg = load("deploy/prometheus/prometheus.yml")
    cfg["rule_files"] = [str(tmp_path / "alerts.yml")]  # the compose mount point does not exist here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    for args in (["check", "config", str(tmp_path / "prometheus.yml")], ["check", "rules", str(tmp_path / "alerts.yml")]):
        r = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_budget_alert_fires_at_800_permille_and_dashboard_queries_parse(tmp_path):
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    rule = next(r for r in alert_rules() if r["alert"] == "TollgateConsumerBudget80Percent")
    series = 'tollgate_consumer_limit_used_permille{consumer="%s",limit="%s"}'
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": series % ("team-a", "requests_60s"), "values": "100 800 850"},
                             {"series": series % ("team-b", "cost_usd_3600s"), "values": "799 799 799"}],
            "alert_rule_test": [
                {"eval_time": "0m", "alertname": rule["alert"], "exp_alerts": []},
                {"eval_time": "2m", "alertname": rule["alert"], "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "consumer": "team-a", "limit": "requests_60s"},
                    "exp_annotations": {"summary": "Consumer team-a has used 850‰ of its requests_60s budget",
                                        "description": rule["annotations"]["description"]}}]},
            ],
        }, {
            # No series: every dashboard query must parse and evaluate (to nothing).
            "interval": "1m",
            "input_series": [],
            "promql_expr_test": [{"expr": e.replace("$__rate_interval", "1m"), "eval_time": "1m", "exp_samples": []}
                                 for _, e in dashboard_exprs()],
        }],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, allow_unicode=True))
    r = subprocess.run(["promtool", "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------- grafana

def test_grafana_dashboard_is_provisioned_and_covers_every_metric_family():
    (ds,) = load("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    d = json.loads((ROOT / "deploy/grafana/dashboards/tollgate.json").read_text())
    assert d["uid"] == "tollgate"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}
        assert p["targets"] and all(t["datasource"]["uid"] == ds["uid"] and t["expr"] for t in p["targets"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']} overlaps another"
        cells |= mine
    used = {(m, frozenset(v)) for _, e in dashboard_exprs() for (m, _), v in promql_matcher_values(e).items()}
    names = {n for _, e in dashboard_exprs() for n in METRIC.findall(e)}
    assert {"tollgate_consumer_model_tokens_in", "tollgate_consumer_model_tokens_out", "tollgate_outcome_requests",
            "tollgate_provider_key_cooldowns", "tollgate_provider_key_cooldown_until_s",
            "tollgate_provider_retried_attempts", "tollgate_provider_steered_requests",
            "tollgate_consumer_limit_used_permille"} <= names
    assert ("tollgate_outcome_requests", frozenset({"rejected_quota", "exhausted"})) in used
    by: dict[str, set[str]] = {}
    for _, e in dashboard_exprs():
        for n, labels in promql_labels(e).items():
            by.setdefault(n, set()).update(labels)
    assert {"consumer", "model"} <= by["tollgate_consumer_model_tokens_in"] | by["tollgate_consumer_model_tokens_out"]


# ---------------------------------------------------------------------------------------------- istio

def istio_docs():
    ef = load("deploy/istio/envoyfilter.yaml")
    secret = load("deploy/istio/secret.yaml")
    sds_docs = load("deploy/istio/sds.yaml")
    patch = load("deploy/istio/gateway-patch.yaml")
    routing = load_all("deploy/istio/routing.yaml")
    return ef, secret, sds_docs, patch, routing


def envoyproxy_schema(*path: str) -> dict:
    """A part of the EnvoyProxy spec schema; pod.volumes and container.volumeMounts are Kubernetes' own
    Volume and VolumeMount schemas, which the CRD embeds."""
    node = json.loads((SCHEMAS / "envoy-gateway/envoyproxy-v1alpha1.json").read_text())["properties"]["spec"]
    for p in ("provider", "kubernetes", "envoyDeployment", *path):
        node = node["properties"][p]
    return node


def istio_patches(ef: dict) -> tuple[dict, list[dict]]:
    """The listener role's HTTP_FILTER patch and the cluster-level role's CLUSTER patches."""
    patches = ef["spec"]["configPatches"]
    (listener,) = [p for p in patches if p["applyTo"] == "HTTP_FILTER"]
    clusters = [p for p in patches if p["applyTo"] == "CLUSTER"]
    assert len(clusters) + 1 + len(istio_buffer_patches(ef)) == len(patches)
    return listener, clusters


def istio_buffer_patches(ef: dict) -> dict[str, dict]:
    """applyTo (LISTENER, VIRTUAL_HOST) -> what the patch MERGEs into every one of the gateway's."""
    out = {}
    for p in ef["spec"]["configPatches"]:
        if p["applyTo"] in ("LISTENER", "VIRTUAL_HOST"):
            assert p["match"] == {"context": "GATEWAY"} and p["patch"]["operation"] == "MERGE", p
            assert p["applyTo"] not in out
            out[p["applyTo"]] = p["patch"]["value"]
    return out


def test_istio_manifests_match_the_crd_schemas():
    ef, *_ = istio_docs()
    assert crd_errors("istio/envoyfilter-v1alpha3.json", ef) == []
    # CEL rules of the CRD that concern the fields used here.
    assert sum(k in ef["spec"] for k in ("workloadSelector", "targetRefs")) <= 1
    # Strict: what the API server would refuse, the schema refuses.
    bad = copy.deepcopy(ef)
    bad["spec"]["configPatches"][1]["applyTo"] = "UPSTREAM_HTTP_FILTER"  # proposed, not in Istio (istio/istio#57342)
    assert crd_errors("istio/envoyfilter-v1alpha3.json", bad) != []
    bad = copy.deepcopy(ef)
    bad["spec"]["configPatches"][1]["match"]["cluster"]["port"] = 443
    assert crd_errors("istio/envoyfilter-v1alpha3.json", bad) != []
    bad = copy.deepcopy(ef)
    bad["spec"]["configPatches"][0]["match"]["listener"]["filterChain"]["filter"]["subfilter"] = {}
    assert any("subfilter" in e for e in crd_errors("istio/envoyfilter-v1alpha3.json", bad))
    # Why the listener role is not a WasmPlugin: nothing in WasmPlugin carries allow_on_headers_stop_iteration.
    wasmplugin = (SCHEMAS / "istio/wasmplugin-v1alpha1.json").read_text().lower()
    assert "stop_iteration" not in wasmplugin and "stopiteration" not in wasmplugin
    # The gateway patch's volumes and mounts against Kubernetes' Volume and VolumeMount schemas.
    _, _, _, patch, _ = istio_docs()
    pod = patch["spec"]["template"]["spec"]
    volumes, mounts = envoyproxy_schema("pod", "volumes"), envoyproxy_schema("container", "volumeMounts")
    assert schema_errors(volumes, pod["volumes"]) == []
    assert all(schema_errors(mounts, c["volumeMounts"]) == [] for c in pod["containers"])
    bad = copy.deepcopy(pod["volumes"])
    next(v for v in bad if "secret" in v)["secret"] = {"name": "tollgate-provider-keys"}  # a ConfigMap's field
    assert any("'name' was unexpected" in e for e in schema_errors(volumes, bad))


def test_istio_listener_and_upstream_roles_agree():
    ef, secret, sds_docs, patch, routing = istio_docs()
    assert_roles_decide_first_and_reload(ef)
    listener, patches = istio_patches(ef)
    # Before the router of the gateway's HTTP connection managers.
    assert listener["match"]["context"] == "GATEWAY" and listener["patch"]["operation"] == "INSERT_BEFORE"
    assert listener["match"]["listener"]["filterChain"]["filter"] == {"name": HCM,
                                                                     "subFilter": {"name": ROUTER["name"]}}
    (lc,) = wasm_configs(listener["patch"]["value"])
    assert listener["patch"]["value"]["name"] == lc["root_id"] == "tollgate.listener"
    plugin = json.loads(lc["configuration"]["value"])
    # MERGE replaces the cluster's HttpProtocolOptions whole: each patch carries all of it, the same for
    # every provider but for its keys.
    opts = {p["patch"]["value"]["metadata"]["filter_metadata"]["tollgate"]["provider"]:
            p["patch"]["value"]["typed_extension_protocol_options"][HPO] for p in patches}
    assert len(opts) == len(patches)
    assert all(set(o) == {"@type", "explicit_http_config", "http_filters"} for o in opts.values())
    ups = [c for o in opts.values() for c in wasm_configs(o["http_filters"])]
    assert len(ups) == len(opts) and all(c == ups[0] for c in ups)
    up = ups[0]
    assert up["root_id"] == "tollgate.upstream"
    # An explicit vm_id, shared by both roles (assert_roles_decide_first_and_reload): WasmPlugins on the
    # same gateway get an empty one from istiod and would otherwise share tollgate's data space.
    assert up["vm_config"]["vm_id"]
    # Provider keys: tollgate's `sds` names -> each provider cluster's composite -> SDS documents (the
    # ConfigMap mounted by the gateway patch) -> the Secret's files (mounted beside it), in the gateway's
    # namespace.
    pod = patch["spec"]["template"]["spec"]
    (proxy,) = pod["containers"]
    assert proxy["name"] == "istio-proxy"
    mounts = pod_mounts(pod["volumes"], proxy["volumeMounts"], secret, sds_docs)
    assert_keys_wired(plugin, {p: o["http_filters"] for p, o in opts.items()}, secret, sds_docs, mounts)
    assert secret["metadata"]["namespace"] == ef["metadata"]["namespace"]
    assert_nothing_from_env(plugin, [lc, *ups], proxy)
    # The module file comes from the image volume of the gateway patch, for both roles.
    assert {c["vm_config"]["code"]["local"]["filename"] for c in (lc, up)} == {f"{mounts['module']}/plugin.wasm"}
    # Each patched cluster is a provider host of the ServiceEntry, with TLS and SNI set by a DestinationRule
    # (the patch replaces HttpProtocolOptions, auto_sni included).
    (se,) = by_kind(routing, "ServiceEntry")
    drs = {d["spec"]["host"]: d for d in by_kind(routing, "DestinationRule")}
    hosts = {p["name"]: p["host"] for p in plugin["providers"]}
    assert {p["patch"]["value"]["metadata"]["filter_metadata"]["tollgate"]["provider"] for p in patches} == set(hosts)
    for p in patches:
        assert p["match"]["context"] == "GATEWAY" and p["patch"]["operation"] == "MERGE"
        c = p["match"]["cluster"]
        provider = p["patch"]["value"]["metadata"]["filter_metadata"]["tollgate"]["provider"]
        assert c["service"] == hosts[provider] and c["service"] in se["spec"]["hosts"]
        assert c["portNumber"] in [port["number"] for port in se["spec"]["ports"]]
        assert drs[c["service"]]["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "sni": c["service"]}
    (vs,) = by_kind(routing, "VirtualService")
    steer = [r for r in vs["spec"]["http"] if r.get("match")]
    for r in steer:
        provider = r["match"][0]["headers"]["x-tollgate-route"]["exact"]
        assert r["route"][0]["destination"]["host"] == hosts[provider]
    assert all({"429", "401", "402", "403"} <= set(r["retries"]["retryOn"].split(",")) for r in vs["spec"]["http"])


def test_envoy_config_istio_would_generate_passes_envoy_validate(tmp_path):
    ef, secret, sds_docs, patch, _ = istio_docs()
    listener, patches = istio_patches(ef)
    # INSERT_BEFORE the router of an HTTP connection manager as istiod generates it for the Gateway.
    http_filter = copy.deepcopy(listener["patch"]["value"])
    clusters = []
    for p in patches:
        c = p["match"]["cluster"]
        cluster = tls_cluster(f"outbound|{c['portNumber']}||{c['service']}", c["service"])
        cluster.update(copy.deepcopy(p["patch"]["value"]))  # MERGE: these fields were not set by Istio
        clusters.append(cluster)
    cfg = listener_bootstrap(http_filter, clusters, clusters[-1]["name"])
    cfg["node"] = NODE
    assert_roles_decide_first_and_reload(cfg)
    # Istio sets no buffer limit on a gateway's listener (Envoy's default is 1 MiB): without the
    # patches a prompt over 1 MiB never reaches tollgate.
    with pytest.raises(AssertionError, match="per_connection_buffer_limit_bytes"):
        assert_buffers_take_max_request(cfg)
    buffers = istio_buffer_patches(ef)
    (lst,) = cfg["static_resources"]["listeners"]
    lst.update(buffers["LISTENER"])
    for h in http_connection_managers(lst):
        for vh in h["route_config"]["virtual_hosts"]:
            vh.update(buffers["VIRTUAL_HOST"])
    assert_buffers_take_max_request(cfg)
    pod = patch["spec"]["template"]["spec"]
    mounts = pod_mounts(pod["volumes"], pod["containers"][0]["volumeMounts"], secret, sds_docs)
    root = tmp_path / "pod"
    assert_pod_config_passes_envoy_validate(in_pod(cfg, root, mounts, secret, sds_docs), root, mounts, tmp_path)


# ---------------------------------------------------------------------------------------------- envoy gateway

def eg_docs():
    (epp,) = load_all("deploy/envoy-gateway/patch-policy.yaml")
    assert epp["kind"] == "EnvoyPatchPolicy"
    proxy_docs = load_all("deploy/envoy-gateway/envoyproxy.yaml")
    routing = load_all("deploy/envoy-gateway/routing.yaml")
    (secret,), (sds_docs,), (proxy,) = (by_kind(proxy_docs, k) for k in ("Secret", "ConfigMap", "EnvoyProxy"))
    return epp, secret, sds_docs, proxy, routing


def eg_pod(proxy: dict) -> tuple[dict, dict]:
    """The Envoy container's and the pod's settings of an EnvoyProxy."""
    d = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    return d["container"], d["pod"]


LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def test_envoy_gateway_patch_policy_matches_the_crd_schema():
    epp, *_ = eg_docs()
    assert crd_errors("envoy-gateway/envoypatchpolicy-v1alpha1.json", epp) == []
    # CEL rule of the CRD.
    assert ("targetRef" in epp["spec"]) != bool(epp["spec"].get("targetRefs"))
    bad = copy.deepcopy(epp)
    bad["spec"]["jsonPatches"][0]["type"] = "Cluster"
    assert crd_errors("envoy-gateway/envoypatchpolicy-v1alpha1.json", bad) != []
    bad = copy.deepcopy(epp)
    bad["spec"]["jsonPatches"][0]["operation"]["jsonpath"] = bad["spec"]["jsonPatches"][0]["operation"].pop("jsonPath")
    assert any("jsonpath" in e for e in crd_errors("envoy-gateway/envoypatchpolicy-v1alpha1.json", bad))
    # Why the listener role is not an EnvoyExtensionPolicy Wasm extension: it has rootID, config, env,
    # code and failOpen, nothing for allow_on_headers_stop_iteration or failure_policy.
    eep = json.loads((SCHEMAS / "envoy-gateway/envoyextensionpolicy-v1alpha1.json").read_text())
    wasm = eep["properties"]["spec"]["properties"]["wasm"]["items"]["properties"]
    assert set(wasm) == {"name", "rootID", "code", "config", "env", "failOpen"}


def test_envoy_gateway_envoyproxy_matches_the_crd_schema():
    *_, proxy, _ = eg_docs()
    assert crd_errors("envoy-gateway/envoyproxy-v1alpha1.json", proxy) == []
    bad = copy.deepcopy(proxy)
    _, pod = eg_pod(bad)
    next(v for v in pod["volumes"] if "secret" in v)["secret"] = {"name": "tollgate-provider-keys"}  # a ConfigMap's field
    assert any("'name' was unexpected" in e for e in crd_errors("envoy-gateway/envoyproxy-v1alpha1.json", bad))
    bad = copy.deepcopy(proxy)
    container, _ = eg_pod(bad)
    container["volumeMount"] = container.pop("volumeMounts")
    assert any("'volumeMount' was unexpected" in e for e in crd_errors("envoy-gateway/envoyproxy-v1alpha1.json", bad))


def quantity_bytes(q) -> int:
    """A Kubernetes quantity as Envoy Gateway reads a bufferLimit (resource.Quantity.AsInt64)."""
    m = re.fullmatch(r"(\d+)([KMGTPE]i|[kMGTPE])?", str(q))
    assert m, q
    unit = m.group(2) or ""
    base, power = (1024, "KMGTPE".index(unit[0]) + 1) if unit.endswith("i") else (1000, "kMGTPE".index(unit) + 1 if unit else 0)
    return int(m.group(1)) * base ** power


def eg_buffer_limit(routing: list) -> int:
    """The listener buffer limit the ClientTrafficPolicy gives the Gateway's listeners."""
    (gw,) = by_kind(routing, "Gateway")
    (ctp,) = by_kind(routing, "ClientTrafficPolicy")
    assert ctp["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert ctp["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw["metadata"]["name"]}]
    return quantity_bytes(ctp["spec"]["connection"]["bufferLimit"])


def test_envoy_gateway_client_traffic_policy_matches_the_crd_schema():
    *_, routing = eg_docs()
    (ctp,) = by_kind(routing, "ClientTrafficPolicy")
    schema = "envoy-gateway/clienttrafficpolicy-v1alpha1.json"
    assert crd_errors(schema, ctp) == []
    assert eg_buffer_limit(routing) == 8 << 20
    bad = copy.deepcopy(ctp)
    bad["spec"]["connection"]["bufferLimits"] = bad["spec"]["connection"].pop("bufferLimit")
    assert any("bufferLimits" in e for e in crd_errors(schema, bad))
    bad = copy.deepcopy(ctp)
    bad["spec"]["connection"]["bufferLimit"] = "8MiB"
    assert any("8MiB" in e for e in crd_errors(schema, bad))


def test_envoy_gateway_listener_and_upstream_roles_agree():
    epp, secret, sds_docs, proxy, routing = eg_docs()
    assert_roles_decide_first_and_reload(epp)
    (gw,) = by_kind(routing, "Gateway")
    assert epp["spec"]["targetRef"] == {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw["metadata"]["name"]}
    assert epp["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert gw["spec"]["infrastructure"]["parametersRef"]["name"] == proxy["metadata"]["name"]
    # The listener role: inserted before the router of the Gateway listener (Envoy Gateway names the xDS
    # listener <namespace>/<gateway>/<listener>).
    listener_patches = [jp for jp in epp["spec"]["jsonPatches"] if jp["type"] == LISTENER_TYPE]
    (gl,) = gw["spec"]["listeners"]
    assert gl["protocol"] == "HTTP"
    (lp,) = listener_patches
    assert lp["name"] == f"{gw['metadata']['namespace']}/{gw['metadata']['name']}/{gl['name']}"
    assert lp["operation"]["op"] == "add" and "path" not in lp["operation"]
    assert lp["operation"]["jsonPath"] == f"..http_filters[?(@.name == '{ROUTER['name']}')]"
    (lc,) = wasm_configs(lp["operation"]["value"])
    assert lp["operation"]["value"]["name"] == lc["root_id"] == "tollgate.listener"
    plugin = json.loads(lc["configuration"]["value"])
    # The same consumers, providers and prices as on Istio.
    istio_listener, _ = istio_patches(load("deploy/istio/envoyfilter.yaml"))
    assert plugin == json.loads(wasm_configs(istio_listener)[0]["configuration"]["value"])
    # The clusters patched are the ones Envoy Gateway names after the route's rules, each for its provider.
    (route,) = by_kind(routing, "HTTPRoute")
    ns = route["metadata"]["namespace"]
    backends = {b["metadata"]["name"]: b["spec"]["endpoints"][0]["fqdn"]["hostname"] for b in by_kind(routing, "Backend")}
    hosts = {p["name"]: p["host"] for p in plugin["providers"]}
    rule_host = {f"httproute/{ns}/{route['metadata']['name']}/rule/{i}": backends[r["backendRefs"][0]["name"]]
                 for i, r in enumerate(route["spec"]["rules"])}
    patched: dict[str, dict] = {}
    for jp in epp["spec"]["jsonPatches"]:
        if jp["type"] == LISTENER_TYPE:
            continue
        assert jp["type"] == CLUSTER_TYPE and jp["operation"]["op"] == "add"
        patched.setdefault(jp["name"], {})[jp["operation"]["path"]] = jp["operation"]["value"]
    assert set(patched) == set(rule_host)
    container, pod = eg_pod(proxy)
    mounts = pod_mounts(pod["volumes"], container["volumeMounts"], secret, sds_docs)
    filters_by_provider, ups = {}, []
    for name, ops in patched.items():
        provider = ops["/metadata"]["filter_metadata"]["tollgate"]["provider"]
        assert hosts[provider] == rule_host[name]
        opts = ops["/typed_extension_protocol_options"]
        assert set(opts) == {HPO}
        (up,) = wasm_configs(opts)
        assert up["root_id"] == "tollgate.upstream" and up["vm_config"]["vm_id"]
        assert up["vm_config"]["code"]["local"]["filename"] == f"{mounts['module']}/plugin.wasm"
        filters_by_provider[provider] = opts[HPO]["http_filters"]
        ups.append(up)
    # Provider keys: tollgate's `sds` names -> each rule cluster's composite -> SDS documents (the ConfigMap
    # mounted by the EnvoyProxy) -> the Secret's files (mounted beside it).
    assert_keys_wired(plugin, filters_by_provider, secret, sds_docs, mounts)
    assert_nothing_from_env(plugin, [lc, *ups], container)
    # The same keys, SDS documents and module image as on Istio, mounted at the same paths.
    _, istio_secret, istio_sds, istio_patch, _ = istio_docs()
    istio_pod = istio_patch["spec"]["template"]["spec"]
    assert set(secret["stringData"]) == set(istio_secret["stringData"]) and sds_docs["data"] == istio_sds["data"]
    assert mounts == pod_mounts(istio_pod["volumes"], istio_pod["containers"][0]["volumeMounts"], istio_secret, istio_sds)
    assert image_reference(pod["volumes"]) == image_reference(istio_pod["volumes"])
    # The first rule is the steering rule for the second provider.
    steer = route["spec"]["rules"][0]["matches"][0]["headers"][0]
    assert steer["name"] == "x-tollgate-route" and hosts[steer["value"]] == rule_host[f"httproute/{ns}/llm/rule/0"]


def test_envoy_config_envoy_gateway_would_generate_passes_envoy_validate(tmp_path):
    epp, *_ = eg_docs()
    # What Envoy Gateway generates for the Gateway's HTTP listener (internal/xds/translator: the HTTP
    # connection manager in default_filter_chain, the router last) and for the route's rules, before the
    # patches.
    listeners, clusters = {}, {}
    plugin_hosts = {}
    for jp in epp["spec"]["jsonPatches"]:
        op = jp["operation"]
        if jp["type"] == LISTENER_TYPE:
            lst = listeners.setdefault(jp["name"], {
                "name": jp["name"], "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10080}},
                # Envoy Gateway's default buffer limit for a listener (internal/xds/translator/listener.go).
                "per_connection_buffer_limit_bytes": 32768,
                "default_filter_chain": {"filters": [{"name": HCM, "typed_config": hcm([copy.deepcopy(ROUTER)], "")}]}})
            pointers = json_path_pointers(lst, op["jsonPath"])
            assert len(pointers) == 1, pointers
            json_patch_add(lst, pointers[0] + op.get("path", ""), op["value"])
            (lc,) = wasm_configs(op["value"])
            plugin_hosts = {p["name"]: p["host"] for p in json.loads(lc["configuration"]["value"])["providers"]}
        else:
            c = clusters.setdefault(jp["name"], tls_cluster(jp["name"], "placeholder"))
            json_patch_add(c, op["path"], op["value"])
    for c in clusters.values():
        host = plugin_hosts[c["metadata"]["filter_metadata"]["tollgate"]["provider"]]
        walk(c, lambda d: d.update(address=host) if d.get("address") == "placeholder" else None)
        c["transport_socket"]["typed_config"]["sni"] = host
    (lst,) = listeners.values()
    http_filters = lst["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in http_filters] == ["tollgate.listener", ROUTER["name"]]
    walk(lst, lambda d: d.update(cluster=next(iter(clusters))) if d.get("cluster") == "" else None)
    cfg = bootstrap(lst, list(clusters.values()))
    cfg["node"] = NODE
    assert_roles_decide_first_and_reload(cfg)
    # Without the ClientTrafficPolicy a prompt over 32 KiB never reaches tollgate.
    with pytest.raises(AssertionError, match="per_connection_buffer_limit_bytes 32768"):
        assert_buffers_take_max_request(cfg)
    _, secret, sds_docs, proxy, routing = eg_docs()
    lst["per_connection_buffer_limit_bytes"] = eg_buffer_limit(routing)
    assert_buffers_take_max_request(cfg)
    container, pod = eg_pod(proxy)
    mounts = pod_mounts(pod["volumes"], container["volumeMounts"], secret, sds_docs)
    root = tmp_path / "pod"
    assert_pod_config_passes_envoy_validate(in_pod(cfg, root, mounts, secret, sds_docs), root, mounts, tmp_path)


# ---------------------------------------------------------------------------------------------- live

def demo_gateway(gateway, mocks):
    gw = gateway(demo_plugin())
    return gw, lambda cooldown_s=45: demo_traffic_module().run(
        gw.base_url, mocks["openai"].base_url, mocks["anthropic"].base_url,
        team_a_key="tg-demo-team-a", team_b_key=KEYS["TEAM_B_KEY"], cooldown_s=cooldown_s, log=lambda *_: None)


def test_dashboard_and_alert_queries_name_what_tollgate_exports(gateway, mocks):
    """After tests/demo_traffic.py, Envoy's /stats/prometheus has every metric, label and label value that
    a dashboard panel or an alert asks for."""
    gw, traffic = demo_gateway(gateway, mocks)
    t = traffic()
    statuses = {s for c in t.phases.values() for (s, _) in c}
    assert {200, 429, 401} <= statuses, t.phases
    exported = parse_prometheus(gw.admin("/stats/prometheus"))
    missing = []
    for title, expr in dashboard_exprs() + [(r["alert"], r["expr"]) for r in alert_rules()]:
        for metric, labels in promql_labels(expr).items():
            if metric not in exported:
                missing.append(f"{title}: {metric}")
                continue
            have = set().union(*(s.keys() for s in exported[metric]))
            missing += [f"{title}: {metric} has no label {label}" for label in labels - have]
        for (metric, label), values in promql_matcher_values(expr).items():
            seen = {s.get(label) for s in exported.get(metric, [])}
            missing += [f"{title}: {metric}{{{label}={v!r}}} never appeared" for v in values - seen]
    assert not missing, "\n".join(missing)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (Debian package `prometheus`)")
def test_every_dashboard_panel_moves_and_the_budget_alert_fires(gateway, mocks, tmp_path):
    """A real Prometheus scrapes the gateway while tests/demo_traffic.py runs: every panel query then
    returns non-zero data, and the 80% alert is firing."""
    gw, traffic = demo_gateway(gateway, mocks)
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    cfg = load("deploy/prometheus/prometheus.yml")
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(tmp_path / "alerts.yml")]
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{gw.admin_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    api = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list:
        url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())["data"]["result"]

    try:
        deadline = time.time() + 30
        while True:
            try:
                if query("up"):
                    break
            except OSError:
                pass
            assert time.time() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        # As `make demo-traffic` does: a first round makes tollgate define its metrics (a counter's first
        # sample gives Prometheus no rate), the second moves them; its cooldowns outlast the queries.
        traffic(cooldown_s=2)
        time.sleep(3)
        traffic(cooldown_s=45)
        time.sleep(4)  # a few scrapes and rule evaluations after the last request
        flat = []
        for title, expr in dashboard_exprs():
            result = query(expr.replace("$__rate_interval", "1m"))
            if not any(float(s["value"][1]) > 0 for s in result):
                flat.append(f"{title}: {expr} -> {result}")
        assert not flat, "panels without data:\n" + "\n".join(flat)
        firing = query('ALERTS{alertname="TollgateConsumerBudget80Percent",alertstate="firing"}')
        assert {s["metric"]["consumer"] for s in firing} >= {"team-a"}, firing
    finally:
        prom.terminate()
        prom.wait(10)


def test_makefile_demo_traffic_target_runs_the_script():
    r = subprocess.run(["make", "--no-print-directory", "-n", "demo-traffic"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == ".venv/bin/python tests/demo_traffic.py --gateway http://localhost:10000"
    r = subprocess.run([sys.executable, str(ROOT / "tests/demo_traffic.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--gateway" in r.stdout
