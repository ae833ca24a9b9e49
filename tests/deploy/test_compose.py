"""docker-compose.yml and docker-compose.cpu.yml, checked without a Docker engine.

1. Both files (the main one alone, and merged with the CPU override) are valid against the
   Compose Specification's JSON schema (``check-jsonschema --builtin-schema vendor.compose-spec``).
2. Semantics the schema cannot see: healthchecks behind every ``service_healthy`` dependency,
   one GPU per GPU service, nothing published beyond 127.0.0.1, environment names the code
   reads (QueueSettings, RewardServerSettings, SamplerServerSettings), commands the CLI accepts,
   the trainer's experiment is a valid config, healthcheck ports match the commands, secrets
   required, the optional preview server stays behind its profile, hardened and token-protected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.composefile import (ROOT, MissingVariable, environment, interpolate, load, merge,
                                      sequence_paths)

MAIN, CPU = "docker-compose.yml", "docker-compose.cpu.yml"
# What an operator puts in .env; the values only need to be non-empty.
SECRETS = {"REDIS_PASSWORD": "0123abcd", "FLOWRL_API_TOKEN": "token-123", "GRAFANA_ADMIN_PASSWORD": "admin-123"}
GPU_SERVICES = {"reward", "sampler", "trainer"}  # one GPU each, each its own by default
# Monitors every GPU of the box and computes nothing, so it is the one exception to "one GPU".
GPU_MONITORS = {"dcgm-exporter"}
# Optional GPU services that reserve one GPU but share another service's by default.
SHARED_GPU = {"preview": "sampler"}
PUBLISHED = {"prometheus", "grafana", "preview"}  # the only services that publish ports at all
# flowrl services that use neither Redis nor the blob store, so get no FLOWRL_QUEUE_* (and no
# broker password).
NO_QUEUE = {"preview"}
# Behind a compose profile: `docker compose up` without `--profile` does not start them.
OPTIONAL = {"preview": "preview", "dcgm-exporter": "dcgm"}


def _check_jsonschema() -> str:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    if not Path(exe).exists():
        pytest.fail("check-jsonschema is not installed: `pip install -e '.[dev]'` (or `make venv`)")
    return exe


def _run_schema(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def main_raw() -> dict:
    return load(MAIN)


@pytest.fixture(scope="module")
def cpu_raw() -> dict:
    return load(CPU)


@pytest.fixture(scope="module")
def merged_raw(main_raw, cpu_raw) -> dict:
    return merge(main_raw, cpu_raw)


@pytest.fixture(scope="module")
def variants(main_raw, merged_raw) -> dict[str, dict]:
    """Both deployments after interpolation with only the required secrets set (defaults used)."""
    return {"gpu": interpolate(main_raw, SECRETS), "cpu": interpolate(merged_raw, SECRETS)}


def _flowrl_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if (s.get("command") or [None])[0] == "flowrl"}


def _gpu_devices(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if "gpu" in (d.get("capabilities") or [])]


# --- 1. schema ---------------------------------------------------------------------------------


def test_schema_accepts_main_file_and_cpu_merge(tmp_path, merged_raw):
    merged = tmp_path / "docker-compose.merged.json"
    merged.write_text(json.dumps(merged_raw))
    result = _run_schema(ROOT / MAIN, merged)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_rejects_a_broken_gpu_reservation(tmp_path, main_raw):
    """The validator really runs: a GPU reservation without `capabilities` (required by the
    spec; compose would refuse it) fails."""
    broken = json.loads(json.dumps(main_raw))
    del broken["services"]["sampler"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = _run_schema(path)
    assert result.returncode != 0 and "capabilities" in result.stdout + result.stderr, result.stdout


def test_cpu_override_only_overrides_mappings_and_scalars(cpu_raw):
    """Compose appends some sequences when merging; the override sets none, so the merge in
    composefile.py (key by key, replace the rest) is exactly compose's."""
    assert sequence_paths(cpu_raw["services"]) == []


# --- 2. semantics ------------------------------------------------------------------------------


def test_secrets_are_required_not_defaulted(main_raw):
    for name in SECRETS:
        env = {k: v for k, v in SECRETS.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            interpolate(main_raw, env)


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_service_healthy_dependencies_have_healthchecks(variants, variant):
    services = variants[variant]["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                check = services[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), \
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"


def test_each_gpu_service_reserves_exactly_one_gpu(variants):
    services = variants["gpu"]["services"]
    for name, service in services.items():
        devices = _gpu_devices(service)
        if name in GPU_MONITORS:
            continue
        if name in GPU_SERVICES or name in SHARED_GPU:
            assert len(devices) == 1, f"{name}: expected one GPU reservation, got {devices}"
            (device,) = devices
            assert device.get("driver") == "nvidia" and "count" not in device, device
            assert len(device.get("device_ids") or []) == 1, f"{name}: reserve one device id, got {device}"
        else:
            assert not devices, f"{name} reserves a GPU but is not a GPU service"
    gpus = [_gpu_devices(services[s])[0]["device_ids"][0] for s in sorted(GPU_SERVICES)]
    assert len(set(gpus)) == len(gpus), f"default device ids must differ (one GPU per process): {gpus}"
    for name, host in SHARED_GPU.items():
        assert _gpu_devices(services[name])[0]["device_ids"] == _gpu_devices(services[host])[0]["device_ids"], \
            f"{name} shares {host}'s GPU by default"


def test_preview_gpu_follows_the_sampler_unless_set(main_raw):
    def preview_gpu(env):
        return _gpu_devices(interpolate(main_raw, {**SECRETS, **env})["services"]["preview"])[0]["device_ids"]

    assert preview_gpu({"FLOWRL_SAMPLER_GPU": "0"}) == ["0"]
    assert preview_gpu({"FLOWRL_SAMPLER_GPU": "0", "FLOWRL_PREVIEW_GPU": "3"}) == ["3"]


def test_cpu_variant_reserves_no_gpu_and_uses_the_cpu_image(variants):
    for name, service in variants["cpu"]["services"].items():
        if name in GPU_MONITORS:
            assert service.get("profiles"), f"{name} must stay behind a profile (it needs GPUs)"
            continue
        assert not _gpu_devices(service), f"{name} still reserves a GPU in the CPU variant"
    for name, service in _flowrl_services(variants["cpu"]).items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile.cpu", name
        assert service["image"].endswith("-cpu"), name
    assert variants["cpu"]["services"]["reward"]["environment"]["FLOWRL_REWARD_DEVICE"] == "cpu"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_nothing_published_beyond_loopback(variants, variant):
    for name, service in variants[variant]["services"].items():
        ports = service.get("ports") or []
        if name not in PUBLISHED:
            assert not ports, f"{name} publishes {ports}; it should only `expose` on the compose network"
        for port in ports:
            if isinstance(port, dict):
                host_ip = port.get("host_ip", "0.0.0.0")
            else:
                parts = str(port).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"  # "8080:80" binds every interface
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} on {host_ip}, not on 127.0.0.1"


def test_environment_names_are_read_by_the_code(variants):
    from services.reward.settings import RewardServerSettings
    from services.sampler.settings import SamplerServerSettings
    from shared.queue import QueueSettings

    queue_keys = {f"FLOWRL_QUEUE_{k.upper()}" for k in QueueSettings.model_fields}
    reward_keys = {f"FLOWRL_REWARD_{k.upper()}" for k in RewardServerSettings.model_fields} | {"FLOWRL_API_TOKEN"}
    sampler_keys = {f"FLOWRL_SAMPLER_{k.upper()}" for k in SamplerServerSettings.model_fields}
    other = {"FLOWRL_API_TOKEN", "OMP_NUM_THREADS"}
    for variant, compose in variants.items():
        for name, service in _flowrl_services(compose).items():
            env = environment(service)
            for key in env:
                if key.startswith("FLOWRL_QUEUE_"):
                    assert key in queue_keys, f"{variant}/{name}: {key} is not a QueueSettings field"
                elif key.startswith("FLOWRL_REWARD_"):
                    assert key in reward_keys, f"{variant}/{name}: {key} is not a RewardServerSettings field"
                elif key.startswith("FLOWRL_SAMPLER_"):
                    assert key in sampler_keys, f"{variant}/{name}: {key} is not a SamplerServerSettings field"
                else:
                    assert key in other, f"{variant}/{name}: {key} is read by nothing in flowrl"
            for key in ("FLOWRL_QUEUE_BROKER_URL", "FLOWRL_QUEUE_STORE_URL", "FLOWRL_QUEUE_NAMESPACE"):
                if name in NO_QUEUE:
                    assert key not in env, f"{variant}/{name} uses no queue: drop {key}"
                else:
                    assert key in env, f"{variant}/{name} lacks {key}"


def test_queue_settings_parse_and_point_at_the_shared_volume(variants, monkeypatch):
    from shared.queue import QueueSettings

    for variant, compose in variants.items():
        for name, service in _flowrl_services(compose).items():
            mounts = {v.split(":")[1] for v in service["volumes"] if isinstance(v, str)}
            assert "/data" in mounts, f"{variant}/{name} does not mount the shared volume at /data"
            if name in NO_QUEUE:
                continue
            env = environment(service)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            settings = QueueSettings()  # from FLOWRL_QUEUE_* exactly as the container reads them
            assert settings.broker_url == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
            assert settings.store_url == "file:///data/blobs"
            for key in env:
                monkeypatch.delenv(key)


def test_commands_are_accepted_by_the_cli(variants):
    from services.reward.cli import _parser as reward_parser
    from services.sampler.cli import _parser as sampler_parser
    from trainer.cli import _parser

    for variant, compose in variants.items():
        for name, service in _flowrl_services(compose).items():
            args = _parser().parse_args(service["command"][1:])  # SystemExit on an unknown command/flag
            if args.command == "serve":
                {"reward": reward_parser, "sampler": sampler_parser}[args.service]().parse_args(args.args)


def test_trainer_experiment_is_a_valid_config_scored_by_the_reward_server(variants):
    from shared.config import load_config
    from shared.rewards import REWARDS
    from trainer.cli import _parser

    compose = variants["gpu"]
    args = _parser().parse_args(compose["services"]["trainer"]["command"][1:])
    assert args.command == "trainer"
    cfg = load_config(ROOT / args.config, args.overrides)
    assert cfg.output_dir.startswith("/data/"), "runs and checkpoints belong on the shared volume"
    (spec,) = cfg.rewards
    assert spec.reward_model == "remote" and spec.url == "http://reward:8000"
    served = environment(compose["services"]["reward"])["FLOWRL_REWARD_REWARDS"].split(",")
    assert spec.model in served, f"the trainer asks the server for {spec.model}, it serves {served}"
    for reward in served:
        assert reward in REWARDS, f"the reward server would fail: {reward} is not a registered reward"


def test_every_config_the_cpu_file_offers_loads_and_is_served(merged_raw):
    """The configs docker-compose.cpu.yml's header offers for FLOWRL_CONFIG, each with the variables
    its line sets, load with the trainer command's overrides and call a reward the server serves
    (tiny_grpo was offered bare: the server's toy_geneval rejected its brightness prompts, every
    reward task was dead-lettered and the trainer restarted in a loop)."""
    from shared.config import load_config
    from trainer.cli import _parser

    offers = [dict(pair.split("=", 1) for pair in line.removeprefix("#").split())
              for line in (ROOT / CPU).read_text().splitlines() if line.startswith("#   FLOWRL_CONFIG=")]
    assert len(offers) >= 4 and {"examples/toy/tiny_grpo.yaml"} <= {o["FLOWRL_CONFIG"] for o in offers}
    for offer in offers:
        compose = interpolate(merged_raw, {**SECRETS, **offer})
        args = _parser().parse_args(compose["services"]["trainer"]["command"][1:])
        assert args.config == offer["FLOWRL_CONFIG"]
        cfg = load_config(ROOT / args.config, args.overrides)
        served = environment(compose["services"]["reward"])["FLOWRL_REWARD_REWARDS"].split(",")
        assert cfg.rewards[0].model in served, f"{offer}: the trainer asks for {cfg.rewards[0].model}, served: {served}"
        local = load_config(ROOT / args.config).rewards[0].reward_model
        assert local in served, f"{offer}: the config was written for {local}, the server scores with {served}"


def test_trainer_runs_one_process_per_visible_gpu_with_shared_memory_for_nccl(variants):
    from trainer.cli import _parser
    from trainer.launch import resolve_processes

    for variant, compose in variants.items():
        trainer = compose["services"]["trainer"]
        args = _parser().parse_args(trainer["command"][1:])
        assert args.processes == "auto", f"{variant}: the trainer should use every GPU it is given"
        assert resolve_processes(args.processes, 0) == 1  # the CPU variant: one process
        assert trainer["shm_size"] == "4gb", f"{variant}: NCCL needs more than Docker's 64 MB of /dev/shm"


def test_healthchecks_probe_the_ports_the_commands_open(variants):
    from trainer.cli import _parser

    for variant, compose in variants.items():
        services = compose["services"]
        sampler = _parser().parse_args(services["sampler"]["command"][1:])
        assert f"127.0.0.1:{sampler.http_port}/health/ready" in " ".join(services["sampler"]["healthcheck"]["test"])
        assert sampler.http_host == "0.0.0.0", "Prometheus scrapes the sampler from another container"
        reward = services["reward"]["command"]
        port = reward[reward.index("--port") + 1]
        assert f"127.0.0.1:{port}/v2/health/ready" in " ".join(services["reward"]["healthcheck"]["test"])
        worker = _parser().parse_args(services["reward-worker"]["command"][1:])
        assert f"127.0.0.1:{worker.http_port}/health/ready" in " ".join(services["reward-worker"]["healthcheck"]["test"])
        assert worker.http_host == "0.0.0.0", "Prometheus scrapes the reward worker from another container"
        preview = services["preview"]["command"]
        port = preview[preview.index("--port") + 1]
        assert f"127.0.0.1:{port}/health/ready" in " ".join(services["preview"]["healthcheck"]["test"])
        for name in ("sampler", "reward", "reward-worker", "preview"):
            test = services[name]["healthcheck"]["test"]
            script = test[test.index("python") + 1]
            assert script.startswith("/app/") and (ROOT / script.removeprefix("/app/")).is_file(), \
                f"{name}: {script} is not the image's copy of deploy/healthcheck.py (WORKDIR /app)"
        assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
        assert "REDISCLI_AUTH" in services["redis"]["environment"], "redis-cli needs the password to PING"


def test_redis_requires_the_password_the_services_use(variants):
    redis = variants["gpu"]["services"]["redis"]
    script = " ".join(redis["command"])
    assert "requirepass" in script and "$REDIS_PASSWORD" in script  # `$$` in the file: the container's shell expands it
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert "noeviction" in script, "kombu bindings must never be evicted"


def test_workers_get_time_to_finish_a_task_on_stop(variants):
    def seconds(text: str) -> float:
        units = {"s": 1, "m": 60, "h": 3600}
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)

    for name in ("sampler", "reward-worker"):
        service = variants["gpu"]["services"][name]
        limit = float(environment(service)["FLOWRL_QUEUE_TASK_TIME_LIMIT_S"])
        assert seconds(service["stop_grace_period"]) > limit, \
            f"{name}: stop_grace_period must exceed the task time limit ({limit} s)"
    # a failed run restarts and continues from its checkpoint; a finished one is not restarted
    trainer = variants["gpu"]["services"]["trainer"]
    assert trainer["restart"].startswith("on-failure"), "a finished run must not start again"
    from trainer.cli import _parser

    assert _parser().parse_args(trainer["command"][1:]).resume == "auto", "a restart must continue the run"
    assert seconds(trainer["stop_grace_period"]) >= 120, "trainer: time to finish an epoch and checkpoint"


def test_monitoring_mounts_and_secrets_line_up(variants):
    import yaml

    services = variants["gpu"]["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    reward_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "flowrl-reward")
    secret = reward_job["authorization"]["credentials_file"]
    assert secret == f"/run/secrets/{services['prometheus']['secrets'][0]}"
    assert variants["gpu"]["secrets"]["flowrl_api_token"]["environment"] == "FLOWRL_API_TOKEN"
    preview_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "flowrl-preview")
    assert preview_job["authorization"] == reward_job["authorization"], "the preview server's /metrics needs the token"
    sampler_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "flowrl-sampler")
    assert sampler_job["dns_sd_configs"][0]["names"] == services["sampler"]["networks"]["default"]["aliases"]
    assert reward_job["dns_sd_configs"][0]["names"] == ["reward"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/flowrl.yaml").read_text())
    dashboards_mount = next(v for v in services["grafana"]["volumes"] if v.startswith("./deploy/grafana/dashboards"))
    assert dashboards_mount.split(":")[1] == provider["providers"][0]["options"]["path"]


def test_every_metrics_port_is_exposed_and_scraped_by_its_job(variants):
    """deploy/prometheus.yml's job for each flowrl service finds it by a compose DNS name and
    scrapes the port its command opens (and exposes) on all interfaces of the container."""
    import yaml

    from shared.config import load_config
    from trainer.cli import _parser

    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    jobs = {j["job_name"]: j["dns_sd_configs"][0] for j in prom["scrape_configs"] if "dns_sd_configs" in j}
    for variant, compose in variants.items():
        services = compose["services"]

        def names_of(service: str) -> set[str]:
            return {service, *services[service].get("networks", {}).get("default", {}).get("aliases", [])}

        ports = {}
        for service in ("sampler", "reward-worker"):
            args = _parser().parse_args(services[service]["command"][1:])
            assert args.http_host == "0.0.0.0", f"{variant}/{service}: Prometheus scrapes from another container"
            ports[service] = args.http_port
        args = _parser().parse_args(services["trainer"]["command"][1:])
        cfg = load_config(ROOT / args.config, args.overrides)
        assert cfg.metrics_host == "0.0.0.0", f"{variant}/trainer: metrics_host must listen beyond loopback"
        ports["trainer"] = cfg.metrics_port
        for service in ("reward", "preview"):
            command = services[service]["command"]
            ports[service] = int(command[command.index("--port") + 1])
            assert command[command.index("--host") + 1] == "0.0.0.0", \
                f"{variant}/{service}: Prometheus scrapes from another container"
        for service, job in [("sampler", "flowrl-sampler"), ("reward-worker", "flowrl-reward-worker"),
                             ("trainer", "flowrl-trainer"), ("reward", "flowrl-reward"),
                             ("preview", "flowrl-preview")]:
            assert jobs[job]["port"] == ports[service], f"{variant}: job {job} scrapes {jobs[job]['port']}, " \
                f"{service} listens on {ports[service]}"
            assert set(jobs[job]["names"]) <= names_of(service), \
                f"{variant}: job {job} looks up {jobs[job]['names']}, which do not name {service}"
            assert str(ports[service]) in [str(p) for p in services[service].get("expose", [])], \
                f"{variant}/{service}: expose its metrics port {ports[service]}"


def test_optional_services_stay_behind_their_profile(variants):
    """`docker compose up` starts no optional service: each sits in its profile, and nothing
    started without one depends on it."""
    for variant, compose in variants.items():
        services = compose["services"]
        assert {n for n, s in services.items() if s.get("profiles")} == set(OPTIONAL), variant
        for name, profile in OPTIONAL.items():
            assert services[name]["profiles"] == [profile], f"{variant}/{name}"
        for name, service in services.items():
            assert not set(service.get("depends_on") or {}) & set(OPTIONAL), \
                f"{variant}/{name} depends on an optional service: a plain `up` would start it"


def test_preview_is_hardened_like_its_neighbours_and_wants_the_token(variants, monkeypatch):
    """The preview server: the flowrl services' least privilege, listens beyond the loopback
    only with FLOWRL_API_TOKEN set (shared/serving.py warns otherwise), publishes on 127.0.0.1,
    and its settings (command + environment, as the container reads them) serve the trainer's
    experiment on the right device."""
    from services.sampler.cli import _parser as sampler_parser
    from services.sampler.settings import SamplerServerSettings
    from shared.config import load_config
    from shared.serving import is_loopback
    from trainer.cli import _parser

    for variant, compose in variants.items():
        services = compose["services"]
        preview, reward = services["preview"], services["reward"]
        for key in ("read_only", "tmpfs", "cap_drop", "security_opt", "volumes", "restart", "image", "build"):
            assert preview[key] == reward[key], f"{variant}/preview: {key} differs from the reward server's"
        assert preview["read_only"] is True and preview["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in preview["security_opt"]
        assert "depends_on" not in preview, "it needs no other service to start"
        args = _parser().parse_args(preview["command"][1:])
        assert (args.command, args.service) == ("serve", "sampler")
        cli = {k: v for k, v in vars(sampler_parser().parse_args(args.args)).items() if v is not None}
        env = environment(preview)
        assert env["FLOWRL_API_TOKEN"] == SECRETS["FLOWRL_API_TOKEN"]
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = SamplerServerSettings(**cli)  # as services/sampler/cli.py builds them
        for key in env:
            monkeypatch.delenv(key)
        assert settings.host == "0.0.0.0" and not is_loopback(settings.host)
        assert settings.token is not None and settings.token.get_secret_value() == SECRETS["FLOWRL_API_TOKEN"]
        assert settings.device == ("cpu" if variant == "cpu" else "cuda")
        assert not settings.checkpoint, "without FLOWRL_PREVIEW_CHECKPOINT it serves the base model"
        assert [f"127.0.0.1:{settings.port}:{settings.port}"] == preview["ports"]
        # the trainer's experiment: the model its checkpoints belong to
        trainer = _parser().parse_args(services["trainer"]["command"][1:])
        assert settings.config == trainer.config
        load_config(ROOT / settings.config, settings.overrides)  # a config error would stop the server
        # the trainer's output_dir, so `latest` finds its checkpoints on the shared volume
        outputs = [o for o in settings.overrides if o.startswith("output_dir=")]
        assert outputs == [o for o in (trainer.overrides or []) if o.startswith("output_dir=")] == ["output_dir=/data/runs"]


def test_preview_follows_the_trainer_config_and_takes_a_checkpoint(main_raw):
    env = {**SECRETS, "FLOWRL_CONFIG": "examples/toy/grpo.yaml",
           "FLOWRL_PREVIEW_CHECKPOINT": "/data/runs/toy_grpo/checkpoints/final"}
    services = interpolate(main_raw, env)["services"]
    preview = environment(services["preview"])
    assert preview["FLOWRL_SAMPLER_CONFIG"] == "examples/toy/grpo.yaml" == services["trainer"]["command"][2]
    assert preview["FLOWRL_SAMPLER_CHECKPOINT"] == env["FLOWRL_PREVIEW_CHECKPOINT"]
