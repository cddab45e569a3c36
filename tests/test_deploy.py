"""The deployment files say only what is true of this project.

docker-compose.yml follows the Compose Specification; every command it runs is a real
`aligndiff` command or a real tool of its image; every setting it passes is a real setting;
every port agrees with what the services listen on; the api image installs no torch; and the
worker image's two scripts (the GPU claim and the health check) do what compose relies on.
There is no Docker engine here: the images themselves are not built by these tests.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import redis
import yaml
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from service.cli import app as aligndiff_cli
from service.db import make_engine
from service.migrate import upgrade
from service.models import WorkerHeartbeat, utcnow
from service.settings import Settings
from tests.serve_support import free_port
from tests.worker_support import load_worker_healthcheck

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
ML_PACKAGES = {"torch", "diffusers", "transformers", "accelerate"}
# Services that run once and exit; every other service runs on and needs a health check.
ONE_SHOT = {"migrate", "minio-setup"}
# What the third-party images run, as their documentation names it (no engine to ask here).
IMAGE_TOOLS = {
    "postgres": {"postgres", "pg_isready"},
    "redis": {"redis-server", "redis-cli"},
    "quay.io/minio/minio": {"server", "mc"},  # the image's entry point is `minio`
    "quay.io/minio/mc": {"/bin/sh", "mc"},
}
# `mc`'s built-in alias `local` (used by `mc ready local`) is this address.
MC_LOCAL_ALIAS = "http://localhost:9000"


# --- reading the files --------------------------------------------------------------------


@dataclass
class Dockerfile:
    """A Dockerfile's instructions, continuation lines joined and comments dropped."""

    path: Path
    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        current = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            keyword, _, rest = (current + line).partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
        return cls(path, instructions)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def exec_form(self, keyword: str) -> list[str] | None:
        found = self.all(keyword)
        return json.loads(found[-1]) if found else None

    def args(self) -> dict[str, str | None]:
        args: dict[str, str | None] = {}
        for rest in self.all("ARG"):
            name, sep, default = rest.partition("=")
            args[name] = default if sep else None
        return args

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value
        return env

    def copies(self) -> dict[str, list[str]]:
        """Destination → sources of the COPY instructions that take files from the context."""
        copies: dict[str, list[str]] = {}
        for rest in self.all("COPY"):
            words = rest.split()
            if any(word.startswith("--from") for word in words):
                continue
            *sources, destination = [word for word in words if not word.startswith("--")]
            copies[destination] = sources
        return copies

    def pip_installs(self) -> list[list[str]]:
        """The arguments of every `pip install` in RUN instructions."""
        found = []
        for run in self.all("RUN"):
            for command in re.split(r"&&|;", run):
                words = shlex.split(command)
                for i in range(len(words) - 1):
                    if words[i].endswith("pip") and words[i + 1] == "install":
                        found.append(words[i + 2 :])
        return found

    def user(self) -> str | None:
        users = self.all("USER")
        return users[-1] if users else None


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def read_env_example() -> tuple[dict[str, str], dict[str, str]]:
    """.env.example's variables (name → value), and those it documents commented out."""
    values: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            values[match[1]] = match[2]
        elif match := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=(.*)", line):
            commented[match[1]] = match[2]
    return values, commented


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolated_names(text: str) -> set[str]:
    return {m[1] for m in _INTERPOLATION.finditer(text) if m[1]}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, and $$ for a $."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, operator, argument = match[1], match[2], match[3]
        current = env.get(name, "")
        if operator in (":-", "-") and not current:
            return str(argument)
        if operator in (":?", "?") and not current:
            raise KeyError(f"{name}: {argument}")
        return current

    return _INTERPOLATION.sub(one, value)


def filled_env_example() -> dict[str, str]:
    """.env.example with its empty secrets filled in, as an operator leaves it."""
    values, _ = read_env_example()
    return {name: value or f"secret{len(name)}" for name, value in values.items()}


def service_environment(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """The variables a service's container gets: pass-through ones only when `env` sets them."""
    resolved: dict[str, str] = {}
    for name, value in (service.get("environment") or {}).items():
        if value is None:
            if env.get(name):
                resolved[name] = env[name]
        else:
            resolved[name] = interpolate(str(value), env)
    return resolved


def dockerfile_of(compose: dict[str, Any], name: str) -> Dockerfile | None:
    """The Dockerfile a service's image is built from: its own build, or another service's
    build of the same image."""
    service = compose["services"][name]
    for candidate in [service, *compose["services"].values()]:
        build = candidate.get("build")
        if build and candidate.get("image") == service.get("image"):
            return Dockerfile.read(ROOT / build["context"] / build["dockerfile"])
    return None


def command_of(compose: dict[str, Any], name: str) -> list[str]:
    service = compose["services"][name]
    if "command" in service:
        return list(service["command"])
    dockerfile = dockerfile_of(compose, name)
    assert dockerfile is not None, f"{name} has no command and no Dockerfile"
    command = dockerfile.exec_form("CMD")
    assert command is not None, f"{dockerfile.path} has no CMD in exec form"
    return command


def entrypoint_of(compose: dict[str, Any], name: str) -> list[str] | None:
    service = compose["services"][name]
    if "entrypoint" in service:
        return list(service["entrypoint"])
    dockerfile = dockerfile_of(compose, name)
    return dockerfile.exec_form("ENTRYPOINT") if dockerfile else None


def image_name(service: dict[str, Any]) -> str:
    return str(service["image"]).rsplit(":", 1)[0]


def settings_variables() -> set[str]:
    return {f"ALIGNDIFF_{name.upper()}" for name in Settings.model_fields}


def uvicorn_options(args: list[str]) -> dict[str, Any]:
    """Parse uvicorn's command line as uvicorn does; an unknown option raises."""
    import uvicorn  # noqa: F401  (loads uvicorn.main)

    command = sys.modules["uvicorn.main"].main
    return dict(command.make_context("uvicorn", list(args)).params)


def assert_real_aligndiff_command(args: list[str]) -> None:
    done = CliRunner().invoke(aligndiff_cli, [*args, "--help"])
    assert done.exit_code == 0, f"`aligndiff {' '.join(args)}` is not a command: {done.output}"


# --- the compose file ---------------------------------------------------------------------


def test_the_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    compose = load_compose()

    errors = [
        f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(compose)
    ]

    assert errors == []
    # and the schema rejects what Compose rejects, so the pass above means something
    misspelt = copy.deepcopy(compose)
    misspelt["services"]["api"]["healthcheck"]["intervals"] = "5s"
    wrong_condition = copy.deepcopy(compose)
    wrong_condition["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_done"
    assert not validator.is_valid(misspelt)
    assert not validator.is_valid(wrong_condition)


def test_migrations_run_once_before_the_api_and_the_workers() -> None:
    services = load_compose()["services"]

    assert command_of(load_compose(), "migrate") == ["aligndiff", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_every_long_running_service_has_a_health_check_and_restarts() -> None:
    services = load_compose()["services"]

    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
            continue
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service["restart"] == "unless-stopped", name


def test_named_volumes_are_declared_and_used() -> None:
    compose = load_compose()
    used = {
        volume.split(":", 1)[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if not volume.startswith((".", "/"))
    }

    assert used == set(compose["volumes"])


def test_every_command_is_a_real_aligndiff_command_or_a_tool_of_its_image() -> None:
    compose = load_compose()

    for name, service in compose["services"].items():
        command = command_of(compose, name)
        if dockerfile_of(compose, name) is None:
            tools = IMAGE_TOOLS[image_name(service)]
            entrypoint = entrypoint_of(compose, name)
            assert (entrypoint or command)[0] in tools, name
            continue
        if command[0] == "aligndiff":
            assert_real_aligndiff_command(command[1:])
        else:
            assert command[0] == "uvicorn", f"{name} runs {command[0]}"
            options = uvicorn_options(command[1:])
            assert options["factory"], "create_app is a factory"
            module, _, attribute = options["app"].partition(":")
            __import__(module)
            assert callable(getattr(sys.modules[module], attribute))


def test_commands_in_the_docs_are_real_aligndiff_commands() -> None:
    deploying = (ROOT / "docs" / "operations" / "deploying.md").read_text()
    documented = [
        match[1]
        for text in (COMPOSE_FILE.read_text(), deploying)
        for match in re.finditer(
            r"docker compose (?:run --rm|exec) \w[\w-]* aligndiff ([^\n`#]*)", text
        )
    ]

    assert len(documented) >= 2
    for args in documented:
        assert_real_aligndiff_command(shlex.split(args))


def test_the_images_own_scripts_exist_where_compose_runs_them() -> None:
    compose = load_compose()
    worker = Dockerfile.read(ROOT / "docker" / "worker.Dockerfile")
    copied = worker.copies()

    entrypoint = entrypoint_of(compose, "worker")
    health = compose["services"]["worker"]["healthcheck"]["test"]

    assert entrypoint is not None and len(entrypoint) == 1
    for path in (entrypoint[0], health[-1]):
        (source,) = copied[path]
        assert (ROOT / source).is_file(), source
    assert os.access(ROOT / copied[entrypoint[0]][0], os.X_OK)
    assert health[1:] == ["python", "/opt/aligndiff/worker_healthcheck.py"]
    api_probe = compose["services"]["api"]["healthcheck"]["test"]
    assert api_probe[1:3] == ["python", "-c"]
    compile(api_probe[3], "api healthcheck", "exec")


def test_third_party_commands_use_real_options() -> None:
    postgres = shutil.which("postgres") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))), None
    )
    if postgres is None:
        pytest.skip("no postgres binary to list its settings")
    command = command_of(load_compose(), "postgres")
    settings = {
        line.split("\t", 1)[0]
        for line in subprocess.run(
            [str(postgres), "--describe-config"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()
    }

    options = [command[i + 1] for i, word in enumerate(command) if word == "-c"]

    assert options, command
    for option in options:
        assert option.split("=", 1)[0] in settings, option


# --- settings and variables ---------------------------------------------------------------


def test_every_aligndiff_variable_is_a_real_setting() -> None:
    compose = load_compose()
    values, commented = read_env_example()
    named = {
        name
        for service in compose["services"].values()
        for name in (service.get("environment") or {})
    }
    named |= set(values) | set(commented)
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        named |= set(Dockerfile.read(dockerfile).env())

    unknown = {name for name in named if name.startswith("ALIGNDIFF_")} - settings_variables()

    assert unknown == set()


def test_the_example_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_compose()
    env = filled_env_example()
    for name in list(os.environ):
        if name.startswith("ALIGNDIFF_"):
            monkeypatch.delenv(name)

    for name in ("api", "worker", "migrate"):
        for variable, value in service_environment(compose["services"][name], env).items():
            monkeypatch.setenv(variable, value)
        settings = Settings()  # raises on a value of the wrong type

        assert settings.resolved_database_url.startswith("postgresql+psycopg://")
        assert settings.resolved_storage_url == f"s3://{env['S3_BUCKET']}/blobs"


def test_the_settings_shown_commented_out_show_their_real_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, commented = read_env_example()
    for name in list(os.environ):
        if name.startswith("ALIGNDIFF_"):
            monkeypatch.delenv(name)
    defaults = Settings()
    # (a line without a value documents a setting that is unset by default)
    shown = {
        name: value for name, value in commented.items() if name.startswith("ALIGNDIFF_") and value
    }

    assert len(shown) >= 5
    for name, value in shown.items():
        field = name.removeprefix("ALIGNDIFF_").lower()
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            assert getattr(Settings(), field) == getattr(defaults, field), name


def test_every_interpolated_variable_is_in_the_env_example_and_every_example_is_used() -> None:
    compose = load_compose()
    text = COMPOSE_FILE.read_text()
    values, commented = read_env_example()
    passed_through = {
        name
        for service in compose["services"].values()
        for name, value in (service.get("environment") or {}).items()
        if value is None
    }

    interpolated = interpolated_names(text)

    assert interpolated - set(values) == set()
    assert passed_through - set(values) - set(commented) == set()
    # Compose itself reads COMPOSE_PROFILES; every other example variable reaches something.
    assert set(values) - interpolated - passed_through == {"COMPOSE_PROFILES"}
    assert "minio" in values["COMPOSE_PROFILES"].split(",")


def test_build_arguments_are_the_dockerfiles_arguments() -> None:
    compose = load_compose()

    for name, service in compose["services"].items():
        build = service.get("build")
        if not build:
            continue
        dockerfile = Dockerfile.read(ROOT / build["context"] / build["dockerfile"])
        args = dockerfile.args()
        assert set(build.get("args", {})) <= set(args), name
        # and the compose defaults are the Dockerfile's, so both ways build the same image
        for arg, value in build.get("args", {}).items():
            assert interpolate(value, {}) == args[arg], arg


# --- ports and addresses ------------------------------------------------------------------


def test_health_checks_and_addresses_use_the_ports_the_services_listen_on() -> None:
    compose = load_compose()
    services = compose["services"]
    env = filled_env_example()
    api_env = service_environment(services["api"], env)

    # api: uvicorn's port, the probe's and the published one agree
    api_port = uvicorn_options(command_of(compose, "api")[1:])["port"]
    probe_url = re.search(r"http://[^']+", services["api"]["healthcheck"]["test"][-1])
    assert probe_url is not None and urlparse(probe_url[0]).port == api_port
    assert interpolate(services["api"]["ports"][0], env).endswith(f":{api_port}")

    # redis: the server's port, the probe's and the broker URL's
    redis_command = command_of(compose, "redis")
    redis_port = int(redis_command[redis_command.index("--port") + 1])
    redis_probe = services["redis"]["healthcheck"]["test"]
    assert int(redis_probe[redis_probe.index("-p") + 1]) == redis_port
    broker = urlparse(api_env["ALIGNDIFF_BROKER_URL"])
    assert (broker.hostname, broker.port) == ("redis", redis_port)

    # postgres: the probe's port and the database URL's (5432 is the image's port)
    assert "-p 5432" in services["postgres"]["healthcheck"]["test"][-1]
    database = urlparse(api_env["ALIGNDIFF_DATABASE_URL"])
    assert (database.hostname, database.port) == ("postgres", 5432)

    # minio: the server's address, `mc ready local`'s, the setup's and the service's endpoint
    minio_command = command_of(compose, "minio")
    minio_port = int(minio_command[minio_command.index("--address") + 1].lstrip(":"))
    assert services["minio"]["healthcheck"]["test"][1:] == ["mc", "ready", "local"]
    assert urlparse(MC_LOCAL_ALIAS).port == minio_port
    setup_script = services["minio-setup"]["command"][0]
    assert f"mc alias set store http://minio:{minio_port} " in setup_script
    endpoint = urlparse(api_env["ALIGNDIFF_S3_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("minio", minio_port)
    assert any(
        interpolate(port, env).endswith(f":{minio_port}") for port in services["minio"]["ports"]
    )
    # Presigned URLs name the public endpoint: MinIO's published host port, not compose's name.
    public = urlparse(api_env["ALIGNDIFF_S3_PUBLIC_ENDPOINT_URL"])
    published = {interpolate(port, env) for port in services["minio"]["ports"]}
    assert public.hostname != "minio" and f"{public.port}:{minio_port}" in published


def test_minio_setup_makes_the_bucket_and_the_user_the_service_uses() -> None:
    compose = load_compose()
    env = filled_env_example()
    services = compose["services"]
    api_env = service_environment(services["api"], env)
    setup_env = service_environment(services["minio-setup"], env)
    script = interpolate(services["minio-setup"]["command"][0], {})

    bucket = urlparse(api_env["ALIGNDIFF_STORAGE_URL"]).hostname
    assert setup_env["S3_BUCKET"] == bucket
    assert 'mc mb --ignore-existing "store/${S3_BUCKET}"' in script
    assert setup_env["AWS_ACCESS_KEY_ID"] == api_env["AWS_ACCESS_KEY_ID"]
    assert 'mc admin user add store "${AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY}"' in script
    assert env["AWS_ACCESS_KEY_ID"] != env["MINIO_ROOT_USER"]


def test_redis_keeps_the_queue_on_disk_and_never_evicts_it(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    command = command_of(load_compose(), "redis")
    port = free_port()
    args = list(command)
    args[args.index("--port") + 1] = str(port)

    # when: the compose command starts a Redis (on a free port, in a folder of its own)
    server = subprocess.Popen(
        [*args, "--dir", str(tmp_path), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        client.lpush("queue", "task")

        # then: it writes an append-only file and refuses writes rather than dropping tasks
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert any(path.name.startswith("appendonly") for path in tmp_path.iterdir())


# --- the images ---------------------------------------------------------------------------


def project_requirements() -> tuple[set[str], dict[str, set[str]], dict[str, list[str]]]:
    """The base requirement names, each extra's names, and each extra's raw requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}

    extras = project["optional-dependencies"]
    return (
        names(project["dependencies"]),
        {extra: names(reqs) for extra, reqs in extras.items()},
        extras,
    )


def test_the_api_image_installs_the_project_without_torch() -> None:
    api = Dockerfile.read(ROOT / "docker" / "api.Dockerfile")
    base, extras, raw_extras = project_requirements()

    installs = api.pip_installs()

    # the project alone, with no extra: its base requirements hold none of the ML packages
    assert installs == [["."]]
    assert base & ML_PACKAGES == set()
    assert not any("torch" in run for run in api.all("RUN"))
    # and the ML packages are the `ml` extra, which the development install includes
    assert ML_PACKAGES.issubset(extras["ml"])
    assert "aligndiff[ml]" in raw_extras["dev"]
    assert api.args()["PYTHON_IMAGE"] == "python:3.11-slim"
    assert api.user() not in (None, "root", "0")


def requirement_closure(requirements: list[str]) -> set[str]:
    """Every distribution `requirements` pull in, extras followed, read from the installed
    packages' metadata (this environment holds a superset of the api image's)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted: dict[str, set[str]] = {}
    todo = [Requirement(requirement) for requirement in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in wanted and extras <= wanted[name]:
            continue
        wanted[name] = wanted.get(name, set()) | extras
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            raise AssertionError(f"{name} is required but not installed") from None
        for need in map(Requirement, needs):
            marker = need.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(need)
    return set(wanted)


def test_nothing_the_api_installs_pulls_in_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    closure = requirement_closure(project["dependencies"])

    assert closure & ML_PACKAGES == set()
    # the extras were followed: uvicorn[standard] and psycopg[binary] bring these
    assert {"uvloop", "psycopg-binary", "fastapi", "celery"} <= closure
    assert ML_PACKAGES.issubset(requirement_closure(project["optional-dependencies"]["ml"]))


def test_the_worker_image_installs_a_pinned_cuda_torch_then_the_ml_extra() -> None:
    worker = Dockerfile.read(ROOT / "docker" / "worker.Dockerfile")
    args = worker.args()

    installs = worker.pip_installs()

    torch_install = ["torch==${TORCH_VERSION}", "--index-url", "${TORCH_INDEX_URL}"]
    assert installs[:2] == [torch_install, [".[ml]"]]
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(args["TORCH_VERSION"]))
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", str(args["TORCH_INDEX_URL"]))
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu[\d.]+", str(args["CUDA_IMAGE"]))
    assert cuda is not None and str(args["TORCH_INDEX_URL"]).endswith(f"cu{cuda[1]}{cuda[2]}")
    assert worker.exec_form("CMD") == ["aligndiff", "worker", "--pool", "solo"]
    assert worker.user() not in (None, "root", "0")


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if pattern.startswith("**/"):
            if any(fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_the_images_copy_files_that_exist_and_reach_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _ignored(".venv/bin/python", patterns) and _ignored("tests/test_deploy.py", patterns)

    for path in (ROOT / "docker").glob("*.Dockerfile"):
        for sources in Dockerfile.read(path).copies().values():
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name} copies a missing {source}"
                assert not _ignored(source, patterns), f".dockerignore hides {source}"


def test_the_worker_reserves_gpus_and_scales() -> None:
    compose = load_compose()
    worker = compose["services"]["worker"]
    image_env = Dockerfile.read(ROOT / "docker" / "worker.Dockerfile").env()
    mounts = dict(volume.split(":", 1) for volume in worker["volumes"])

    # `--scale worker=N` needs no fixed name and no host port
    assert "container_name" not in worker and "ports" not in worker
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    # the replicas of one machine share the GPU locks; models persist in their volume
    assert mounts["gpu-locks"] == image_env["GPU_LOCK_DIR"]
    assert Path(image_env["ALIGNDIFF_MODEL_CACHE_DIR"]).is_relative_to(mounts["models"])
    assert Path(image_env["HF_HOME"]).is_relative_to(mounts["models"])
    assert image_env["ALIGNDIFF_DEVICE"] == "cuda"


# --- the worker image's scripts -----------------------------------------------------------


CLAIM_GPU = ROOT / "docker" / "claim-gpu.sh"
GPU_UUIDS = ["GPU-0a1b2c3d-1111", "GPU-4e5f6a7b-2222"]


class GpuMachine:
    """Looks like a two-GPU worker container to claim-gpu.sh: an `nvidia-smi` that lists two
    GPUs, and an empty lock folder. `start` runs a worker replica there."""

    def __init__(self, folder: Path) -> None:
        bin_dir = folder / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(GPU_UUIDS) + "\n")
        fake.chmod(0o755)
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "GPU_LOCK_DIR": str(folder / "locks"),
            "ALIGNDIFF_DEVICE": "cuda",
        }
        self.replicas: list[subprocess.Popen[str]] = []

    def start(self, **env: str) -> tuple[subprocess.Popen[str], str]:
        """Start a replica whose command prints the GPU it sees and stays up; return it with
        its first line: `gpu=<id>`, or the claim's error when it exits instead."""
        replica = subprocess.Popen(
            [str(CLAIM_GPU), "sh", "-c", 'echo "gpu=${CUDA_VISIBLE_DEVICES:-none}"; exec sleep 60'],
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.replicas.append(replica)
        assert replica.stdout is not None
        first = replica.stdout.readline().strip()
        if first.startswith("claim-gpu: this worker runs on"):
            first = replica.stdout.readline().strip()
        return replica, first

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.poll() is None:
                replica.kill()
            replica.wait(timeout=10)
            if replica.stdout is not None:
                replica.stdout.close()


@pytest.fixture
def gpu_machine(tmp_path: Path) -> Iterator[GpuMachine]:
    machine = GpuMachine(tmp_path)
    yield machine
    machine.stop()


def test_each_worker_replica_claims_a_gpu_of_its_own(gpu_machine: GpuMachine) -> None:
    # when: three replicas start on a two-GPU machine
    first, first_gpu = gpu_machine.start()
    _, second_gpu = gpu_machine.start()
    third, third_said = gpu_machine.start()

    # then: the first two run on different GPUs, and the third says why it cannot run
    assert {first_gpu, second_gpu} == {f"gpu={uuid}" for uuid in GPU_UUIDS}
    assert third.wait(timeout=30) == 1
    assert "no free GPU" in third_said

    # when: a replica dies, the next one that starts takes its GPU
    first.kill()
    first.wait(timeout=10)
    _, replacement_gpu = gpu_machine.start()
    assert replacement_gpu == first_gpu


def test_claims_stay_within_the_gpus_named_and_cpu_workers_claim_none(
    gpu_machine: GpuMachine,
) -> None:
    _, named = gpu_machine.start(CUDA_VISIBLE_DEVICES="3")
    taken, refused = gpu_machine.start(CUDA_VISIBLE_DEVICES="3")
    _, cpu = gpu_machine.start(ALIGNDIFF_DEVICE="cpu")

    assert named == "gpu=3"
    assert taken.wait(timeout=30) == 1 and "no free GPU among [3]" in refused
    assert cpu == "gpu=none"


def test_the_worker_health_check_follows_this_containers_heartbeat(tmp_path: Path) -> None:
    healthcheck = load_worker_healthcheck()
    url = f"sqlite:///{tmp_path / 'aligndiff.db'}"
    upgrade(url)
    settings = Settings(database_url=url, worker_heartbeat_seconds=5)
    here, elsewhere = socket.gethostname(), "another-container"
    engine = make_engine(url)

    def beat(name: str, hostname: str, seconds_ago: float) -> None:
        seen = utcnow() - timedelta(seconds=seconds_ago)
        with Session(engine) as session, session.begin():
            session.merge(
                WorkerHeartbeat(
                    name=name, hostname=hostname, pid=1, started_at=seen, last_seen_at=seen
                )
            )

    # given: only another container's worker beats
    beat(f"aligndiff-1@{elsewhere}", elsewhere, 0)
    assert "no worker" in healthcheck.check(settings, here)

    # when: this container's worker beat a while ago, then just now
    beat(f"aligndiff-1@{here}", here, 60)
    stale = healthcheck.check(settings, here)
    beat(f"aligndiff-1@{here}", here, 1)
    fresh = healthcheck.check(settings, here)
    engine.dispose()

    # then: stale is unhealthy (3 intervals of 5 s), fresh is healthy
    assert stale is not None and "60 s old (limit 15 s)" in stale
    assert fresh is None
    # and as compose runs it: exit 0 now, 1 when the database cannot be read
    env = {**os.environ, "ALIGNDIFF_DATABASE_URL": url, "ALIGNDIFF_WORKER_HEARTBEAT_SECONDS": "5"}
    script = [sys.executable, str(ROOT / "docker" / "worker_healthcheck.py")]
    assert subprocess.run(script, env=env, capture_output=True, timeout=60).returncode == 0
    missing = {**env, "ALIGNDIFF_DATABASE_URL": f"sqlite:///{tmp_path / 'none' / 'x.db'}"}
    failed = subprocess.run(script, env=missing, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and failed.stderr.startswith("unhealthy:")


def test_a_real_workers_heartbeat_keeps_its_container_healthy_until_it_dies(
    tmp_path: Path,
) -> None:
    from tests.worker_support import WorkerProcess, private_redis, wait_for, worker_env

    url = f"sqlite:///{tmp_path / 'aligndiff.db'}"
    upgrade(url)
    script = [sys.executable, str(ROOT / "docker" / "worker_healthcheck.py")]
    probe_env = {
        **os.environ,
        "ALIGNDIFF_DATABASE_URL": url,
        "ALIGNDIFF_WORKER_HEARTBEAT_SECONDS": "0.5",
    }

    def healthy() -> bool:
        return (
            subprocess.run(script, env=probe_env, capture_output=True, timeout=60).returncode == 0
        )

    with private_redis(tmp_path) as broker:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=url,
            broker_url=broker,
            storage_url=f"file://{tmp_path / 'blobs'}",
        )
        env = worker_env(settings, tmp_path / "models", ALIGNDIFF_WORKER_HEARTBEAT_SECONDS="0.5")
        worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1)
        try:
            # when: a worker runs on this machine, the health check passes
            wait_for(healthy, timeout=90, what="a healthy worker", log=worker.log)

            # when: it is killed, its last heartbeat ages past 3 intervals and the check fails
            worker.kill()
            wait_for(lambda: not healthy(), timeout=30, what="an unhealthy worker")
        finally:
            worker.stop()
