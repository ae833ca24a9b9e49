"""k8s/: the kustomize base and its overlays, checked without a cluster.

1. ``kubectl kustomize k8s/overlays/{cpu,gpu}`` renders each overlay, as shipped and with the
   optional preview server (k8s/components/preview) added the way its comment says;
2. ``kubernetes-validate`` (bundled OpenAPI schemas, strict: unknown fields fail) accepts every
   built-in kind for the oldest and newest Kubernetes versions checked; KEDA's ScaledObject and
   TriggerAuthentication (CRDs, no bundled schema) against tests/deploy/schemas/keda-v1alpha1.json,
   a small hand-written schema of the documented fields (strict as well);
3. semantics: GPUs, probes on the health endpoints, environment names the code reads,
   commands the CLI accepts, the experiment ConfigMap is a valid config scored by the reward
   Service, KEDA watches the sample queue's Redis list, grace periods cover a task, pods meet
   Pod Security "restricted", every referenced ConfigMap/Secret/PVC/Service exists, the preview
   server serves the trainer's experiment with the token and only Prometheus may reach it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from tests.deploy.composefile import ROOT

OVERLAYS = ["cpu", "gpu"]
# Optional Components an overlay adds by uncommenting `components: [../../components/<name>]`.
COMPONENTS = ["preview"]
# Each overlay as shipped, and with each component: "gpu+preview" is k8s/overlays/gpu with it.
VARIANTS = [*OVERLAYS, *(f"{o}+{c}" for o in OVERLAYS for c in COMPONENTS)]
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest and newest Kubernetes minor the manifests are checked against
GPU_WORKLOADS = {"flowrl-reward", "flowrl-sampler", "flowrl-trainer", "flowrl-preview"}
KEDA_SCHEMA = json.loads((ROOT / "tests/deploy/schemas/keda-v1alpha1.json").read_text())
WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet"}


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed (it renders the kustomize overlays): install kubectl >= 1.27 "
                    "(kustomize v5) from your distribution or the Kubernetes release")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    out = {}
    for variant in VARIANTS:
        overlay, _, component = variant.partition("+")
        root = ROOT / "k8s"
        if component:  # a copy of k8s/ with the overlay's commented `components:` lines uncommented
            root = tmp_path_factory.mktemp(variant) / "k8s"
            shutil.copytree(ROOT / "k8s", root)
            kustomization = root / "overlays" / overlay / "kustomization.yaml"
            line = f"components:\n  - ../../components/{component}\n"
            commented = line.replace("components:", "# components:").replace("  - ", "#   - ")
            text = kustomization.read_text()
            assert commented in text, f"k8s/overlays/{overlay} does not offer the {component} component"
            kustomization.write_text(text.replace(commented, line))
        result = subprocess.run([_kubectl(), "kustomize", str(root / "overlays" / overlay)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"kubectl kustomize k8s/overlays/{variant} failed:\n{result.stderr}"
        out[variant] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def _flavour(variant: str) -> str:
    """"cpu" or "gpu": the overlay a variant builds on."""
    return variant.partition("+")[0]


def _by(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOAD_KINDS}


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _flowrl_containers(docs: list[dict]):
    for name, workload in _workloads(docs).items():
        for container in _pod(workload)["containers"]:
            if container["image"].split(":")[0].rsplit("/", 1)[-1] == "flowrl":
                yield name, workload, container


def _env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then env (values, or secret:NAME/KEY)."""
    configmaps = _by(docs, "ConfigMap")
    env = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return env


# --- 1 + 2: render and validate --------------------------------------------------------------


@pytest.mark.parametrize("overlay", VARIANTS)
def test_every_resource_is_valid(rendered, overlay):
    import kubernetes_validate

    kinds = set()
    for doc in rendered[overlay]:
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, {**KEDA_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"})
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                            f"{version}: {e.message} at {'/'.join(map(str, e.path))}")
    assert {"Deployment", "Job", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    assert ("ScaledObject" in kinds) == (_flavour(overlay) == "gpu"), "KEDA scales the samplers of the gpu overlay only"


def test_keda_schema_rejects_a_typo(rendered):
    """The vendored schema really constrains: a misspelt field fails."""
    scaled = json.loads(json.dumps(_by(rendered["gpu"], "ScaledObject")["flowrl-sampler"]))
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = scaled["spec"]["triggers"][0]["metadata"].pop("listName")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, {**KEDA_SCHEMA, "$ref": "#/$defs/ScaledObject"})


def test_kubernetes_validate_is_strict(rendered):
    import kubernetes_validate

    deployment = json.loads(json.dumps(_by(rendered["gpu"], "Deployment")["flowrl-sampler"]))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 660  # should be ...Seconds
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# --- 3: semantics ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", VARIANTS)
def test_gpu_requests(rendered, overlay):
    for name, workload in _workloads(rendered[overlay]).items():
        for container in _pod(workload)["containers"]:
            limits = (container.get("resources") or {}).get("limits") or {}
            gpus = limits.get("nvidia.com/gpu")
            if _flavour(overlay) == "gpu" and name in GPU_WORKLOADS:
                assert gpus == 1, f"{name}: expected one nvidia.com/gpu, got {gpus}"
                tolerations = _pod(workload).get("tolerations") or []
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{name}: no GPU toleration"
            else:
                assert gpus is None, f"{overlay}/{name} requests a GPU"


@pytest.mark.parametrize("overlay", VARIANTS)
def test_probes_use_the_health_endpoints(rendered, overlay):
    from trainer.cli import _parser

    workloads = _workloads(rendered[overlay])
    sampler = _pod(workloads["flowrl-sampler"])["containers"][0]
    args = _parser().parse_args(sampler["args"][1:])
    ports = {p["name"]: p["containerPort"] for p in sampler["ports"]}
    assert ports["http"] == args.http_port and args.http_host == "0.0.0.0"
    assert sampler["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert sampler["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert sampler["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sampler[probe]["httpGet"]["port"] == "http"

    worker = _pod(workloads["flowrl-reward-worker"])["containers"][0]
    args = _parser().parse_args(worker["args"][1:])
    assert {p["name"]: p["containerPort"] for p in worker["ports"]}["http"] == args.http_port
    assert args.http_host == "0.0.0.0"
    for probe, path in [("startupProbe", "/health/live"), ("readinessProbe", "/health/ready"),
                        ("livenessProbe", "/health/live")]:
        assert worker[probe]["httpGet"] == {"path": path, "port": "http"}, probe

    reward = _pod(workloads["flowrl-reward"])["containers"][0]
    port = reward["args"][reward["args"].index("--port") + 1]
    assert {p["name"]: p["containerPort"] for p in reward["ports"]}["http"] == int(port)
    assert reward["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert reward["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ready = reward["readinessProbe"]["exec"]["command"]
    assert ready[-1] == f"http://127.0.0.1:{port}/v2/health/ready"
    assert ready[1].startswith("/app/") and (ROOT / ready[1].removeprefix("/app/")).is_file(), \
        "the probe runs the image's copy of deploy/healthcheck.py (WORKDIR /app)"
    assert "FLOWRL_API_TOKEN" in _env(reward, rendered[overlay]), "the readiness check needs the token"
    containers = [sampler, reward]

    if "flowrl-preview" in workloads:
        from services.sampler.cli import _parser as sampler_parser

        preview = _pod(workloads["flowrl-preview"])["containers"][0]
        args = sampler_parser().parse_args(_parser().parse_args(preview["args"][1:]).args)
        assert {p["name"]: p["containerPort"] for p in preview["ports"]}["http"] == args.port
        for probe in ("startupProbe", "livenessProbe"):  # /health/live: no token needed
            assert preview[probe]["httpGet"] == {"path": "/health/live", "port": "http"}, probe
        ready = preview["readinessProbe"]["exec"]["command"]
        assert ready[-1] == f"http://127.0.0.1:{args.port}/health/ready"
        assert ready[1].startswith("/app/") and (ROOT / ready[1].removeprefix("/app/")).is_file()
        assert "FLOWRL_API_TOKEN" in _env(preview, rendered[overlay]), "the readiness check needs the token"
        containers.append(preview)
    for container in containers:  # a slow model load must not restart the pod
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("overlay", VARIANTS)
def test_commands_and_environment_match_the_code(rendered, overlay):
    from services.reward.cli import _parser as reward_parser
    from services.reward.settings import RewardServerSettings
    from services.sampler.cli import _parser as sampler_parser
    from services.sampler.settings import SamplerServerSettings
    from shared.queue import QueueSettings
    from trainer.cli import _parser

    docs = rendered[overlay]
    queue_keys = {f"FLOWRL_QUEUE_{k.upper()}" for k in QueueSettings.model_fields}
    reward_keys = {f"FLOWRL_REWARD_{k.upper()}" for k in RewardServerSettings.model_fields}
    sampler_keys = {f"FLOWRL_SAMPLER_{k.upper()}" for k in SamplerServerSettings.model_fields}
    redis = _by(docs, "Service")["flowrl-redis"]
    for name, workload, container in _flowrl_containers(docs):
        assert "command" not in container, f"{name}: `command` would replace the image's tini entrypoint; use args"
        assert container["args"][0] == "flowrl"
        args = _parser().parse_args(container["args"][1:])
        if args.command == "serve":
            {"reward": reward_parser, "sampler": sampler_parser}[args.service]().parse_args(args.args)
        env = _env(container, docs)
        for key in env:
            if key.startswith("FLOWRL_QUEUE_"):
                assert key in queue_keys, f"{name}: {key} is not a QueueSettings field"
            elif key.startswith("FLOWRL_REWARD_"):
                assert key in reward_keys, f"{name}: {key} is not a RewardServerSettings field"
            elif key.startswith("FLOWRL_SAMPLER_"):
                assert key in sampler_keys, f"{name}: {key} is not a SamplerServerSettings field"
            else:
                assert key in {"FLOWRL_API_TOKEN", "REDIS_PASSWORD"}, f"{name}: {key} is read by nothing"
        if args.command in ("worker", "serve"):  # admin routes (drain, load) and /metrics need the token
            assert env.get("FLOWRL_API_TOKEN") == "secret:flowrl-secrets/api-token", \
                f"{name}: without FLOWRL_API_TOKEN its admin routes answer anyone"
        assert _pod(workload).get("enableServiceLinks") is False, \
            f"{name}: service links would inject FLOWRL_REWARD_PORT=tcp://... into the reward server's settings"
        if args.command == "serve":
            continue  # the reward and preview servers need no queue
        names = [item["name"] for item in container["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("FLOWRL_QUEUE_BROKER_URL"), "$(REDIS_PASSWORD) must be defined first"
        assert env["REDIS_PASSWORD"] == "secret:flowrl-secrets/redis-password"
        port = redis["spec"]["ports"][0]["port"]
        assert env["FLOWRL_QUEUE_BROKER_URL"] == f"redis://:$(REDIS_PASSWORD)@{redis['metadata']['name']}:{port}/0"
        settings = QueueSettings(**{k.removeprefix("FLOWRL_QUEUE_").lower(): v for k, v in env.items()
                                    if k.startswith("FLOWRL_QUEUE_")})
        assert settings.store_url == "file:///data/blobs"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "flowrl-data"
    reward = next(c for n, _, c in _flowrl_containers(docs) if n == "flowrl-reward")
    expected = "cpu" if _flavour(overlay) == "cpu" else "cuda"
    assert _env(reward, docs)["FLOWRL_REWARD_DEVICE"] == expected
    for n, _, c in _flowrl_containers(docs):
        if n == "flowrl-preview":
            assert _env(c, docs)["FLOWRL_SAMPLER_DEVICE"] == expected


@pytest.mark.parametrize("overlay", VARIANTS)
def test_experiment_configmap_is_a_valid_config_scored_by_the_reward_service(rendered, overlay):
    from shared.config import apply_overrides, parse_config
    from trainer.cli import _parser

    docs = rendered[overlay]
    trainer = _workloads(docs)["flowrl-trainer"]
    container = _pod(trainer)["containers"][0]
    args = _parser().parse_args(container["args"][1:])
    mount = next(m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in _pod(trainer)["volumes"] if v["name"] == mount["name"])
    data = _by(docs, "ConfigMap")[volume["configMap"]["name"]]["data"]
    raw = yaml.safe_load(data[args.config.removeprefix(mount["mountPath"] + "/")])
    cfg = parse_config(apply_overrides(json.loads(json.dumps(raw)), args.overrides))  # (it edits in place)
    assert cfg.output_dir.startswith("/data/")
    (spec,) = cfg.rewards
    service = _by(docs, "Service")["flowrl-reward"]
    assert spec.reward_model == "remote" and spec.url == f"http://flowrl-reward:{service['spec']['ports'][0]['port']}"
    reward = next(c for n, _, c in _flowrl_containers(docs) if n == "flowrl-reward")
    assert spec.model in _env(reward, docs)["FLOWRL_REWARD_REWARDS"].split(",")
    # The copy in k8s/base stays the toy experiment: only the reward and the output folder differ.
    toy = yaml.safe_load((ROOT / "examples/toy/nft.yaml").read_text())
    assert {k: v for k, v in raw.items() if k not in ("rewards", "output_dir")} == \
           {k: v for k, v in toy.items() if k not in ("rewards", "output_dir")}


def test_keda_scales_samplers_on_the_sample_queue(rendered):
    from shared.protocol import QUEUE_SAMPLE
    from shared.queue import QueueSettings

    docs = rendered["gpu"]
    scaled = _by(docs, "ScaledObject")["flowrl-sampler"]
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] in _by(docs, "Deployment") and target.get("kind", "Deployment") == "Deployment"
    sampler = _pod(_workloads(docs)[target["name"]])["containers"][0]
    assert sampler["args"][:3] == ["flowrl", "worker", "sampler"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    namespace = _env(sampler, docs)["FLOWRL_QUEUE_NAMESPACE"]
    assert meta["listName"] == QueueSettings(namespace=namespace).queue(QUEUE_SAMPLE)
    redis = _by(docs, "Service")["flowrl-redis"]
    host, port = meta["address"].split(":")
    assert host in (f"{redis['metadata']['name']}.{redis['metadata']['namespace']}.svc.cluster.local",
                    f"{redis['metadata']['name']}.{redis['metadata']['namespace']}.svc"), \
        "KEDA's operator lives in another namespace: the address must be fully qualified"
    assert int(port) == redis["spec"]["ports"][0]["port"]
    assert meta.get("databaseIndex", "0") == "0"  # the broker URL's /0
    auth = _by(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password" and ref["key"] in _by(docs, "Secret")[ref["name"]]["stringData"]
    assert scaled["spec"]["minReplicaCount"] >= 1, "scale-to-zero would add a model load to every idle period"
    assert "replicas" not in _workloads(docs)[target["name"]]["spec"], \
        "KEDA owns the sampler count: a Deployment naming replicas is scaled back to it by every kubectl apply"
    policies = {n: p for n, p in _by(docs, "NetworkPolicy").items() if p["spec"]["podSelector"].get("matchLabels", {}).get(
        "app.kubernetes.io/component") == "redis"}
    sources = [s for p in policies.values() for rule in p["spec"].get("ingress", []) for s in rule["from"]]
    assert any(s.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "keda"
               for s in sources), "the NetworkPolicy must let KEDA's operator reach Redis"


@pytest.mark.parametrize("overlay", VARIANTS)
def test_workers_finish_a_task_before_being_killed(rendered, overlay):
    docs = rendered[overlay]
    for name in ("flowrl-sampler", "flowrl-reward-worker"):
        workload = _workloads(docs)[name]
        limit = float(_env(_pod(workload)["containers"][0], docs)["FLOWRL_QUEUE_TASK_TIME_LIMIT_S"])
        assert _pod(workload)["terminationGracePeriodSeconds"] > limit, name
    trainer = _workloads(docs)["flowrl-trainer"]
    assert trainer["kind"] == "Job" and _pod(trainer)["restartPolicy"] == "Never"
    # a replaced pod continues the run from its checkpoint; a config error (exit 2) is not retried
    from trainer.cli import _parser

    assert trainer["spec"]["backoffLimit"] >= 1
    assert _parser().parse_args(_pod(trainer)["containers"][0]["args"][1:]).resume == "auto"
    rules = {r["action"]: r for r in trainer["spec"]["podFailurePolicy"]["rules"]}
    assert rules["FailJob"]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [2]}
    assert rules["Ignore"]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert _pod(trainer)["terminationGracePeriodSeconds"] >= 120, "time to finish an epoch and checkpoint"


@pytest.mark.parametrize("overlay", VARIANTS)
def test_trainer_runs_one_process_per_gpu_of_the_pod_with_shared_memory(rendered, overlay):
    from trainer.cli import _parser

    pod = _pod(_workloads(rendered[overlay])["flowrl-trainer"])
    container = pod["containers"][0]
    assert _parser().parse_args(container["args"][1:]).processes == "auto"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory", "NCCL between the processes needs a RAM-backed /dev/shm"


@pytest.mark.parametrize("overlay", VARIANTS)
def test_pods_meet_pod_security_restricted(rendered, overlay):
    docs = rendered[overlay]
    (namespace,) = _by(docs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, workload in _workloads(docs).items():
        pod = _pod(workload)
        assert workload["metadata"]["namespace"] == namespace["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, f"{name} needs no Kubernetes API token"
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], name
            assert ctx.get("readOnlyRootFilesystem") is True, name
            assert "memory" in container["resources"]["limits"], f"{name}: no memory limit"


@pytest.mark.parametrize("overlay", VARIANTS)
def test_references_resolve(rendered, overlay):
    docs = rendered[overlay]
    configmaps, secrets = _by(docs, "ConfigMap"), _by(docs, "Secret")
    claims = _by(docs, "PersistentVolumeClaim")
    for name, workload in _workloads(docs).items():
        pod = _pod(workload)
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{name}: {volume}"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume}"
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, f"{name}: {source}"
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], f"{name}: {ref}"
                for var in re.findall(r"\$\((\w+)\)", item.get("value", "")):
                    assert var in [e["name"] for e in container["env"]], f"{name}: $({var}) is not defined"
    workloads = _workloads(docs)
    for name, service in _by(docs, "Service").items():
        selector = service["spec"]["selector"]
        pods = [w for w in workloads.values()
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service {name} selects {len(pods)} workloads"
        ports = {p["name"] for c in _pod(pods[0])["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port named {port['targetPort']}"
    for name, secret in secrets.items():  # placeholders are recognisable, so Redis can refuse them
        assert all(v.startswith("CHANGE-ME") for v in secret["stringData"].values()), name


def _trainer_config(docs: list[dict]):
    """The trainer Job's experiment as the container parses it (ConfigMap + --set overrides)."""
    from shared.config import apply_overrides, parse_config
    from trainer.cli import _parser

    trainer = _workloads(docs)["flowrl-trainer"]
    container = _pod(trainer)["containers"][0]
    args = _parser().parse_args(container["args"][1:])
    mount = next(m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in _pod(trainer)["volumes"] if v["name"] == mount["name"])
    data = _by(docs, "ConfigMap")[volume["configMap"]["name"]]["data"]
    raw = yaml.safe_load(data[args.config.removeprefix(mount["mountPath"] + "/")])
    return parse_config(apply_overrides(raw, args.overrides))


@pytest.mark.parametrize("overlay", VARIANTS)
def test_every_metrics_endpoint_is_annotated_opened_and_admitted(rendered, overlay):
    """Each flowrl pod with /metrics carries prometheus.io annotations naming the port its
    command opens on all interfaces, and the NetworkPolicies admit Prometheus to that port."""
    from trainer.cli import _parser

    docs = rendered[overlay]
    workloads = _workloads(docs)
    opened = {}
    for name in ("flowrl-sampler", "flowrl-reward-worker"):
        args = _parser().parse_args(_pod(workloads[name])["containers"][0]["args"][1:])
        assert args.http_host == "0.0.0.0", name
        opened[name] = args.http_port
    cfg = _trainer_config(docs)
    assert cfg.metrics_host == "0.0.0.0", "the trainer's metrics_host must listen beyond loopback"
    opened["flowrl-trainer"] = cfg.metrics_port
    reward = _pod(workloads["flowrl-reward"])["containers"][0]["args"]
    opened["flowrl-reward"] = int(reward[reward.index("--port") + 1])
    if "flowrl-preview" in workloads:
        preview = _pod(workloads["flowrl-preview"])["containers"][0]["args"]
        assert preview[preview.index("--host") + 1] == "0.0.0.0", "Prometheus scrapes the preview server"
        opened["flowrl-preview"] = int(preview[preview.index("--port") + 1])
    policies = [p["spec"] for p in _by(docs, "NetworkPolicy").values()]
    for name, port in opened.items():
        template = workloads[name]["spec"]["template"]
        notes = template["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true" and notes.get("prometheus.io/path") == "/metrics", name
        assert notes["prometheus.io/port"] == str(port), f"{name}: annotated {notes['prometheus.io/port']}, opens {port}"
        container_ports = [p["containerPort"] for c in _pod(workloads[name])["containers"] for p in c.get("ports", [])]
        assert port in container_ports, f"{name}: declare containerPort {port}"
        labels = template["metadata"]["labels"]

        def selects(selector: dict) -> bool:
            if not selector.get("matchLabels", {}).items() <= labels.items():
                return False
            return all(labels.get(e["key"]) in e["values"] if e["operator"] == "In" else False
                       for e in selector.get("matchExpressions", []))

        admitted = any(
            selects(spec["podSelector"]) and port in [p["port"] for p in rule.get("ports", [])]
            and any(s.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    == "monitoring" for s in rule["from"])
            for spec in policies for rule in spec.get("ingress", []))
        assert admitted, f"{name}: no NetworkPolicy admits Prometheus (namespace monitoring) to port {port}"


@pytest.mark.parametrize("overlay", VARIANTS)
def test_preview_is_optional_and_serves_the_trainers_experiment(rendered, overlay):
    """The preview server exists only where its Component is added; it builds the model of the
    trainer's experiment (the same ConfigMap), reads checkpoints from the shared volume, listens
    beyond the loopback only with the token, and its NetworkPolicy admits Prometheus alone."""
    from services.sampler.cli import _parser as sampler_parser
    from trainer.cli import _parser

    docs = rendered[overlay]
    workloads = _workloads(docs)
    if not overlay.endswith("+preview"):
        assert "flowrl-preview" not in workloads and "flowrl-preview" not in _by(docs, "Service"), \
            "the preview server is optional: only its Component adds it"
        return
    assert workloads["flowrl-preview"]["spec"]["strategy"]["type"] == "Recreate", \
        "a rollout must not wait for a second GPU"
    pod = _pod(workloads["flowrl-preview"])
    (container,) = pod["containers"]
    args = _parser().parse_args(container["args"][1:])
    assert (args.command, args.service) == ("serve", "sampler")
    serve = sampler_parser().parse_args(args.args)
    assert serve.host == "0.0.0.0" and serve.token is None, "the token comes from the Secret, not the command line"
    env = _env(container, docs)
    assert env["FLOWRL_API_TOKEN"] == "secret:flowrl-secrets/api-token", "beyond the loopback only with the token"
    assert pod.get("enableServiceLinks") is False
    # the trainer's experiment: the same ConfigMap, the file the trainer reads
    trainer = _pod(workloads["flowrl-trainer"])
    trainer_config = _parser().parse_args(trainer["containers"][0]["args"][1:]).config

    def configmap_of(pod: dict, container: dict, path: str) -> tuple[str, str]:
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        return volume["configMap"]["name"], path.removeprefix(mount["mountPath"] + "/")

    name, key = configmap_of(pod, container, env["FLOWRL_SAMPLER_CONFIG"])
    assert (name, key) == configmap_of(trainer, trainer["containers"][0], trainer_config)
    assert key in _by(docs, "ConfigMap")[name]["data"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "flowrl-data", \
        "checkpoints are read from the shared volume"
    service = _by(docs, "Service")["flowrl-preview"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(serve.port, "http")]
    # who may reach it: Prometheus (namespace monitoring) on its port, nobody else
    labels = workloads["flowrl-preview"]["spec"]["template"]["metadata"]["labels"]
    rules = []
    for policy in _by(docs, "NetworkPolicy").values():
        selector = policy["spec"]["podSelector"]
        if not selector or not selector.get("matchLabels", {}).items() <= labels.items():
            continue  # the default deny, or a policy for other pods
        if any(e["key"] == "app.kubernetes.io/component" and labels["app.kubernetes.io/component"] not in e["values"]
               for e in selector.get("matchExpressions", [])):
            continue
        for rule in policy["spec"].get("ingress", []):
            rules.append(rule)
            assert [p["port"] for p in rule["ports"]] == [serve.port], policy["metadata"]["name"]
            monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            assert rule["from"] == [monitoring], \
                f"{policy['metadata']['name']} admits more than Prometheus to the preview server"
    assert rules, "no NetworkPolicy admits Prometheus to the preview server"
