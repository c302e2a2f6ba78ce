"""rotator.export: each config field's Kubernetes mapping, the notes, names and images.

Pure: configs are parsed from text, manifests read back with yaml. Schema validation of
whole fleets is in tests/integration/test_export_cli.py.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator import export
from rotator.config import Config, ConfigError
from rotator.configfile import parse

IMAGE = "registry.example/app:1.0"
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def config_of(text: str, tmp_path: Path) -> Config:
    return parse(textwrap.dedent(text), tmp_path / "rotator.yaml")


def fleet(tmp_path: Path, components: str, top: str = "") -> Config:
    return config_of(
        top + "components:\n" + textwrap.indent(textwrap.dedent(components), "  "), tmp_path
    )


HERMES = """\
hermes:
  listen: 127.0.0.1:8001
  ports: 18001-18010
  command: run --port {port}
"""


def documents(result: export.Export, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment, service = yaml.safe_load_all(result.files[f"{name}.yaml"])
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    return deployment, service


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_a_component_becomes_a_deployment_that_rotates(tmp_path: Path) -> None:
    config = fleet(
        tmp_path,
        HERMES
        + """\
  health: {path: /ready, interval: 2s, timeout: 3s, start_timeout: 1m, unhealthy_threshold: 4}
  drain_timeout: 20s
  stop_timeout: 7s
""",
    )
    deployment, _ = documents(export.kubernetes(config, IMAGE), "hermes")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "minReadySeconds" not in spec  # verify is off
    assert spec["progressDeadlineSeconds"] == 60 + export.SCHEDULE_SECONDS
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 27  # drain_timeout + stop_timeout
    assert pod["enableServiceLinks"] is False
    assert "initContainers" not in pod
    main = container(deployment)
    assert main["image"] == IMAGE
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    probe = {
        "httpGet": {"path": "/ready", "port": "http"},
        "periodSeconds": 2,
        "timeoutSeconds": 3,
        "failureThreshold": 4,
    }
    assert main["readinessProbe"] == probe
    assert main["livenessProbe"] == probe  # rotator replaces an instance failing 4 checks
    assert main["startupProbe"] == probe | {"failureThreshold": 30}  # 30 x 2s = start_timeout
    assert main["lifecycle"] == {"preStop": {"sleep": {"seconds": export.PRESTOP_SECONDS}}}
    assert "workingDir" not in main  # the config's directory means nothing in an image
    labels = deployment["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels == spec["template"]["metadata"]["labels"]


def test_the_service_keeps_the_public_port(tmp_path: Path) -> None:
    deployment, service = documents(export.kubernetes(fleet(tmp_path, HERMES), IMAGE), "hermes")
    assert service["metadata"]["name"] == "hermes"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8001, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_command_and_env_placeholders(tmp_path: Path) -> None:
    config = fleet(
        tmp_path,
        """\
hermes:
  listen: 127.0.0.1:8001
  ports: 18001-18010
  command: ["{python}", -m, app, --bind, "{host}:{port}", --name, "{name}", "{x}"]
  env: {GREETING: hello, SELF: "{python} at {host}:{port}"}
""",
    )
    main = container(documents(export.kubernetes(config, IMAGE), "hermes")[0])
    assert main["command"] == [
        *("python", "-m", "app", "--bind", "0.0.0.0:8080"),
        *("--name", "hermes", "{x}"),
    ]
    assert main["env"] == [
        {"name": "GREETING", "value": "hello"},
        {"name": "SELF", "value": "python at 0.0.0.0:8080"},
        {"name": "PORT", "value": "8080"},
        {"name": "HOST", "value": "0.0.0.0"},
    ]


def test_replicas_become_the_deployments(tmp_path: Path) -> None:
    config = fleet(tmp_path, HERMES + "  replicas: 3\n")
    result = export.kubernetes(config, IMAGE)
    deployment, _ = documents(result, "hermes")
    assert deployment["spec"]["replicas"] == 3
    # Rolled one at a time, as rotator rolls replicas.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "ROTATOR_REPLICA" not in {item["name"] for item in container(deployment)["env"]}
    assert result.notes == [
        "hermes: ROTATOR_REPLICA is not set: a Deployment's pods are alike, with no slot number"
    ]


def test_replicas_auto_says_what_it_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    zeus = "zeus:\n  listen: 127.0.0.1:8002\n  ports: 18011-18020\n  command: run\n"
    config = fleet(tmp_path, HERMES + zeus, "defaults:\n  replicas: auto\n")
    result = export.kubernetes(config, IMAGE)
    assert [documents(result, name)[0]["spec"]["replicas"] for name in ("hermes", "zeus")] == [8, 8]
    assert result.notes == [
        "every component: replicas: auto is 8 on this machine; set a number for the cluster",
        "every component: ROTATOR_REPLICA is not set: a Deployment's pods are alike, with no"
        " slot number",
    ]
    # auto on a one-core machine is one replica, and still a choice to make for a cluster.
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    result = export.kubernetes(fleet(tmp_path, HERMES + "  replicas: auto\n"), IMAGE)
    assert documents(result, "hermes")[0]["spec"]["replicas"] == 1
    assert result.notes == [
        "hermes: replicas: auto is 1 on this machine; set a number for the cluster"
    ]


def test_the_replica_placeholder_is_0_in_every_pod(tmp_path: Path) -> None:
    config = fleet(
        tmp_path,
        HERMES.replace("run --port {port}", "run --port {port} --slot {replica}")
        + "  env: {LOG: 'app.{replica}.log'}\n"
        + "  health: {exec: 'probe {port} {replica}'}\n",
    )
    result = export.kubernetes(config, IMAGE)
    main = container(documents(result, "hermes")[0])
    assert main["command"] == ["run", "--port", "8080", "--slot", "0"]
    assert main["env"] == [
        {"name": "LOG", "value": "app.0.log"},
        {"name": "PORT", "value": "8080"},
        {"name": "HOST", "value": "0.0.0.0"},
    ]
    assert main["readinessProbe"]["exec"]["command"] == ["probe", "8080", "0"]
    assert result.notes == [
        "hermes: {replica} became 0 in every pod, and ROTATOR_REPLICA is not set: a"
        " Deployment's pods are alike, with no slot number"
    ]


def test_dollars_survive_kubernetes_expansion(tmp_path: Path) -> None:
    # Kubernetes expands $(VAR) and turns $$ into $ in command and env; rotator does not.
    config = fleet(
        tmp_path,
        """\
hermes:
  listen: 127.0.0.1:8001
  ports: 18001-18010
  command: ["sh", "-c", "echo $$ $(HOME) $PORT"]
  env: {A: "$(B)"}
""",
    )
    main = container(documents(export.kubernetes(config, IMAGE), "hermes")[0])
    assert main["command"][2] == "echo $$$$ $$(HOME) $$PORT"
    assert main["env"][0] == {"name": "A", "value": "$$(B)"}


@pytest.mark.parametrize(
    ("drain", "stop", "grace"),
    [("30s", "10s", 40), ("0s", "10s", 15), ("2.5s", "1s", 6), ("500ms", "250ms", 6)],
)
def test_grace_period_covers_the_drain_and_the_stop(
    drain: str, stop: str, grace: int, tmp_path: Path
) -> None:
    # The preStop pause is the first part of the drain, so never less than PRESTOP_SECONDS.
    config = fleet(tmp_path, HERMES + f"  drain_timeout: {drain}\n  stop_timeout: {stop}\n")
    pod = documents(export.kubernetes(config, IMAGE), "hermes")[0]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace


def test_verify_becomes_min_ready_seconds(tmp_path: Path) -> None:
    config = fleet(tmp_path, HERMES + "  verify: 2.5s\n")
    result = export.kubernetes(config, IMAGE)
    spec = documents(result, "hermes")[0]["spec"]
    assert spec["minReadySeconds"] == 3
    assert spec["progressDeadlineSeconds"] == 30 + 3 + export.SCHEDULE_SECONDS
    assert result.notes == [
        "hermes: verify 2.5s became minReadySeconds 3; a rollout that fails it stops but is"
        " not rolled back: kubectl rollout undo deployment/hermes"
    ]


def test_cwd_set_in_the_config_becomes_working_dir(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    result = export.kubernetes(fleet(tmp_path, HERMES + "  cwd: app\n"), IMAGE)
    assert container(documents(result, "hermes")[0])["workingDir"] == str(tmp_path / "app")
    assert result.notes == [
        f"hermes: cwd became workingDir {tmp_path / 'app'}: the image must hold the code there"
    ]


def test_depends_on_becomes_init_containers_that_wait_for_health(tmp_path: Path) -> None:
    config = fleet(
        tmp_path,
        HERMES
        + """\
  health: {path: /up, timeout: 3s, start_timeout: 10s}
athena:
  listen: 127.0.0.1:8002
  ports: 18011-18020
  command: run --port {port}
front:
  listen: 127.0.0.1:8003
  ports: 18021-18030
  command: run --port {port}
  depends_on: [hermes, athena]
""",
    )
    result = export.kubernetes(config, IMAGE)
    pod = documents(result, "front")[0]["spec"]["template"]["spec"]
    waits = pod["initContainers"]
    assert [w["name"] for w in waits] == ["wait-for-hermes", "wait-for-athena"]
    assert {w["image"] for w in waits} == {export.WAIT_IMAGE}
    hermes_wait = waits[0]["command"]
    assert hermes_wait[:2] == ["sh", "-c"]
    assert "wget -q -T 3 -O /dev/null http://hermes:8001/up" in hermes_wait[2]
    assert f"-ge {10 + export.SCHEDULE_SECONDS}" in hermes_wait[2]  # bounded, then exit 1
    assert "http://athena:8002/health" in waits[1]["command"][2]
    assert "initContainers" not in documents(result, "hermes")[0]["spec"]["template"]["spec"]
    assert result.notes == [
        "front: depends_on: start order kept (an init container waits for each dependency's"
        " health check); stop order is not: Kubernetes stops pods independently"
    ]


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("hermes", "hermes"),
        ("tekton-core", "tekton-core"),
        ("My_App", "my-app"),
        ("api.v2", "api-v2"),
        ("1api", "c-1api"),
        ("a" * 70, "a" * 63),
        ("x" * 62 + "_y", "x" * 62),
    ],
)
def test_names_become_dns_labels(name: str, label: str, tmp_path: Path) -> None:
    config = fleet(tmp_path, HERMES.replace("hermes:", f"{name}:", 1))
    result = export.kubernetes(config, IMAGE)
    deployment, service = documents(result, label)
    assert DNS_1035.fullmatch(label)
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == label
    assert container(deployment)["name"] == label
    renamed = [note for note in result.notes if "renamed" in note]
    assert renamed == (
        []
        if name == label
        else [f"{name}: renamed {label} (a Kubernetes name is lowercase letters, digits and '-')"]
    )


def test_names_that_collide_are_an_error(tmp_path: Path) -> None:
    config = fleet(
        tmp_path,
        HERMES.replace("hermes:", "a_b:")
        + "a.b:\n  listen: 127.0.0.1:8002\n  ports: 18011-18020\n  command: run\n",
    )
    with pytest.raises(export.ExportError, match=r"'a_b' and 'a\.b' would both be named 'a-b'"):
        export.kubernetes(config, IMAGE)


def test_images_from_the_config(tmp_path: Path) -> None:
    top = "export:\n  kubernetes:\n    image: base:1\n    images: {athena: own:2}\n"
    config = fleet(
        tmp_path,
        HERMES + "athena:\n  listen: 127.0.0.1:8002\n  ports: 18011-18020\n  command: run\n",
        top,
    )
    result = export.kubernetes(config)
    assert container(documents(result, "hermes")[0])["image"] == "base:1"
    assert container(documents(result, "athena")[0])["image"] == "own:2"
    # --image is every component's image, the config's per-component ones included
    forced = export.kubernetes(config, "cli:3")
    assert {container(documents(forced, n)[0])["image"] for n in ("hermes", "athena")} == {"cli:3"}


def test_components_without_an_image_are_named_in_one_line(tmp_path: Path) -> None:
    top = "export:\n  kubernetes:\n    images: {athena: own:2}\n"
    body = HERMES + "athena:\n  listen: 127.0.0.1:8002\n  ports: 18011-18020\n  command: run\n"
    body += "zeus:\n  listen: 127.0.0.1:8003\n  ports: 18021-18030\n  command: run\n"
    with pytest.raises(export.ExportError) as info:
        export.kubernetes(fleet(tmp_path, body, top))
    message = str(info.value)
    assert message.startswith("no image for hermes, zeus: ")
    assert "--image" in message and "\n" not in message


@pytest.mark.parametrize("image", ["", "two words", " "])
def test_a_bad_image_argument_is_an_error(image: str, tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="is not an image name"):
        export.kubernetes(fleet(tmp_path, HERMES), image)


def test_namespace_goes_on_every_object(tmp_path: Path) -> None:
    config = fleet(tmp_path, HERMES, "export:\n  kubernetes:\n    namespace: shop\n")
    for document in documents(export.kubernetes(config, IMAGE), "hermes"):
        assert document["metadata"]["namespace"] == "shop"
    plain = documents(export.kubernetes(fleet(tmp_path, HERMES), IMAGE), "hermes")
    assert all("namespace" not in document["metadata"] for document in plain)


def test_defaults_leave_nothing_to_report(tmp_path: Path) -> None:
    assert export.kubernetes(fleet(tmp_path, HERMES), IMAGE).notes == []


# (option as written under the component, the note's text after "hermes: ")
NOTES = [
    (
        "stop_signal: INT",
        "stop_signal INT has no Kubernetes equivalent (the kubelet sends SIGTERM):"
        " set STOPSIGNAL SIGINT in the image",
    ),
    (
        "hold_timeout: 30s",
        "hold_timeout 30s has no Kubernetes equivalent (rotator's proxy holds requests while"
        " no instance is ready): configure it on an Ingress or a service mesh",
    ),
    ("connect_timeout: 1s", "connect_timeout 1s has no Kubernetes equivalent"),
    ("read_timeout: 2m", "read_timeout 2m has no Kubernetes equivalent"),
    ("request_timeout: 90s", "request_timeout 1m30s has no Kubernetes equivalent"),
    ("keepalive_timeout: 500ms", "keepalive_timeout 500ms has no Kubernetes equivalent"),
    ("header_timeout: 2s", "header_timeout 2s has no Kubernetes equivalent"),
    ("trust_forwarded: true", "trust_forwarded true has no Kubernetes equivalent"),
    ("max_header_size: 128KiB", "max_header_size 128KiB has no Kubernetes equivalent"),
    ("max_headers: 50", "max_headers 50 has no Kubernetes equivalent"),
    ("max_connections: 200", "max_connections 200 has no Kubernetes equivalent"),
    (
        "max_restarts: 2",
        "max_restarts 2 has no Kubernetes equivalent (the kubelet restarts a crashed container"
        " forever, its backoff doubling from 10s to 5m)",
    ),
    (
        "max_restarts: 2\nrestart_window: 5m\nrestart_backoff: 1s\nrestart_backoff_max: 1m",
        "max_restarts 2, restart_window 5m, restart_backoff 1s, restart_backoff_max 1m have",
    ),
    (
        "health: {interval: 200ms, timeout: 1.5s}",
        "health.interval 200ms rounded up to periodSeconds 1 (probes count whole seconds)",
    ),
    ("health: {timeout: 1.5s}", "health.timeout 1.5s rounded up to timeoutSeconds 2"),
    ("command: '{python} app.py --port {port}'", "{python} became `python`: the image must"),
    (
        "max_memory: 512MiB\nrestart_every: 24h",
        "max_memory 512MiB, restart_every 24h have no Kubernetes equivalent that replaces a pod"
        " without downtime: a memory limit (resources.limits.memory) OOM-kills the container",
    ),
    ("restart_every: 90m", "restart_every 1h30m has no Kubernetes equivalent"),
    (
        "canary: {duration: 2m}",
        "canary.duration 2m has no Kubernetes equivalent (a Deployment's rollout does not"
        " judge traffic): Argo Rollouts or Flagger judge a canary by its metrics",
    ),
    (
        "canary: {min_requests: 50, max_error_rate: 0.25%, max_latency_ratio: 2}",
        "canary.min_requests 50, canary.max_error_rate 0.25%, canary.max_latency_ratio 2 have",
    ),
]


@pytest.mark.parametrize(("option", "note"), NOTES)
def test_each_option_without_an_equivalent_is_reported(
    option: str, note: str, tmp_path: Path
) -> None:
    component = HERMES
    if option.startswith("command"):
        component = component.replace("  command: run --port {port}\n", "")
    config = fleet(tmp_path, component + textwrap.indent(option, "  ") + "\n")
    notes = export.kubernetes(config, IMAGE).notes
    assert any(line.startswith(f"hermes: {note}") for line in notes), notes
    assert all("\n" not in line for line in notes)


def test_a_unix_component_is_reported_and_keeps_its_socket_placeholder(tmp_path: Path) -> None:
    config = fleet(
        tmp_path,
        "apollo:\n  listen: 127.0.0.1:8003\n  transport: unix\n"
        "  command: gunicorn --bind unix:{socket} app:app\n",
        f"state_dir: {tmp_path / 's'}\n",
    )
    result = export.kubernetes(config, IMAGE)
    assert container(documents(result, "apollo")[0])["command"][2] == "unix:{socket}"
    assert result.notes == [
        "apollo: transport unix has no Kubernetes equivalent (a Service reaches a pod over"
        " TCP): make the command listen on port 8080 ({socket} is left as written)"
    ]


def test_notes_shared_by_components_are_one_line(tmp_path: Path) -> None:
    body = HERMES + "athena:\n  listen: 127.0.0.1:8002\n  ports: 18011-18020\n  command: run\n"
    body += "zeus:\n  listen: 127.0.0.1:8003\n  ports: 18021-18030\n  command: run\n"
    body += "  max_headers: 10\n"
    every = fleet(tmp_path, body, "defaults:\n  hold_timeout: 30s\n")
    notes = export.kubernetes(every, IMAGE).notes
    assert [line.split(": ")[0] for line in notes] == ["every component", "zeus"]
    some = fleet(tmp_path, body.replace("  max_headers: 10\n", "  hold_timeout: 1s\n"))
    assert export.kubernetes(some, IMAGE).notes[0].startswith("zeus: hold_timeout 1s")


def test_output_is_one_file_per_component_and_a_stream(tmp_path: Path) -> None:
    body = HERMES + "athena:\n  listen: 127.0.0.1:8002\n  ports: 18011-18020\n  command: run\n"
    result = export.kubernetes(fleet(tmp_path, body), IMAGE)
    assert list(result.files) == ["hermes.yaml", "athena.yaml"]
    for text in result.files.values():
        assert text.startswith(export.GENERATED)
        assert "&id" not in text and "*id" not in text  # no YAML aliases
    stream = list(yaml.safe_load_all(result.stream()))
    assert [(d["kind"], d["metadata"]["name"]) for d in stream] == [
        ("Deployment", "hermes"),
        ("Service", "hermes"),
        ("Deployment", "athena"),
        ("Service", "athena"),
    ]


def test_notes_markdown(tmp_path: Path) -> None:
    quiet = export.kubernetes(fleet(tmp_path, HERMES), IMAGE).notes_markdown("rotator.yaml")
    assert quiet.startswith("# Notes on the Kubernetes export of rotator.yaml\n")
    assert "Every option set in the config maps to Kubernetes." in quiet
    loud = export.kubernetes(fleet(tmp_path, HERMES + "  verify: 5s\n"), IMAGE)
    assert f"- {loud.notes[0]}\n" in loud.notes_markdown("rotator.yaml")


# -- the export section of the config ----------------------------------------------------------

SECTION_ERRORS = [
    ("    imagee: a:1\n", "export.kubernetes.imagee", "unknown key (did you mean 'image'?)", 3),
    ("    image: 'a b'\n", "export.kubernetes.image", "'a b' is not an image name", 3),
    ("    image:\n", "export.kubernetes.image", "needs a value", 3),
    (
        "    images: {hermse: a:1}\n",
        "export.kubernetes.images.hermse",
        "unknown component 'hermse' (did you mean 'hermes'?)",
        3,
    ),
    ("    namespace: Shop\n", "export.kubernetes.namespace", "'Shop' is not a namespace name", 3),
    ("    namespace: " + "a" * 64 + "\n", "export.kubernetes.namespace", "is not a namespace", 3),
]


@pytest.mark.parametrize(("text", "path", "message", "line"), SECTION_ERRORS)
def test_export_section_errors(
    text: str, path: str, message: str, line: int, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        fleet(tmp_path, HERMES, "export:\n  kubernetes:\n" + text)
    [problem] = info.value.problems
    assert (problem.path, problem.line) == (path, line)
    assert message in problem.message


def test_export_section_top_level_typo(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        fleet(tmp_path, HERMES, "export:\n  kubernets: {}\n")
    [problem] = info.value.problems
    assert (problem.path, problem.line) == ("export.kubernets", 2)
    assert "did you mean 'kubernetes'?" in problem.message


def test_export_section_is_optional(tmp_path: Path) -> None:
    config = fleet(tmp_path, HERMES, "export:\n")
    assert config.kubernetes.image is None and dict(config.kubernetes.images) == {}
    assert config.kubernetes.image_of("hermes") is None
