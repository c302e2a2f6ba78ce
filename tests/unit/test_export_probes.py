"""rotator.export for issue 20's options: tcp and exec health checks as tcpSocket and
exec probes (and the init containers that wait for such a dependency), env files
inlined, log rotation reported. Pure: configs parsed from text, manifests read back."""

from __future__ import annotations

from pathlib import Path

from rotator import export
from tests.unit.test_export import IMAGE, container, documents, fleet


def probes(deployment: dict[str, object]) -> list[object]:
    main = container(deployment)  # type: ignore[arg-type]
    return [main[key] for key in ("startupProbe", "readinessProbe", "livenessProbe")]


def test_tcp_and_exec_checks_become_tcp_socket_and_exec_probes(tmp_path: Path) -> None:
    config = fleet(
        tmp_path,
        """\
        db:
          listen: 127.0.0.1:8001
          ports: 18001-18010
          command: run --port {port}
          health: {tcp: true, interval: 2s}
        worker:
          listen: 127.0.0.1:8002
          ports: 18011-18020
          command: run --port {port}
          health:
            exec: ["{python}", ready.py, "--url", "http://{host}:{port}/", "$HOME"]
        front:
          listen: 127.0.0.1:8003
          ports: 18021-18030
          command: run --port {port}
          depends_on: [db, worker]
        """,
    )
    result = export.kubernetes(config, IMAGE)
    for probe in probes(documents(result, "db")[0]):
        assert probe["tcpSocket"] == {"port": export.PORT_NAME}  # type: ignore[index]
        assert "httpGet" not in probe and probe["periodSeconds"] == 2  # type: ignore[operator,index]
    for probe in probes(documents(result, "worker")[0]):
        # Run by the kubelet inside the container; no $(VAR) expansion, so no $$.
        assert probe["exec"] == {  # type: ignore[index]
            "command": ["python", "ready.py", "--url", "http://127.0.0.1:8080/", "$HOME"]
        }
    waits = documents(result, "front")[0]["spec"]["template"]["spec"]["initContainers"]
    assert "nc -z -w 2 db 8001;" in waits[0]["command"][2]
    assert "nc -z -w 2 worker 8002;" in waits[1]["command"][2]


def test_env_files_are_inlined_and_log_rotation_is_reported(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TOKEN=from-file\nMODE=file\n")
    config = fleet(
        tmp_path,
        """\
        hermes:
          listen: 127.0.0.1:8001
          ports: 18001-18010
          command: run --port {port}
          env_file: .env
          env: {MODE: env}
          logs: {max_size: 10MiB}
        """,
    )
    result = export.kubernetes(config, IMAGE)
    env = container(documents(result, "hermes")[0])["env"]
    assert env[:2] == [{"name": "TOKEN", "value": "from-file"}, {"name": "MODE", "value": "env"}]
    assert result.notes == [
        "hermes: env_file .env: the variables were read now and written into the Deployment's"
        " env; move secrets to a Secret (envFrom: secretRef)",
        "hermes: logs.max_size 10MiB has no per-pod equivalent: the kubelet rotates container"
        " logs by its containerLogMaxSize and containerLogMaxFiles (10Mi and 5 by default)",
    ]
