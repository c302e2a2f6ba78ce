"""`rotator export kubernetes` through the real CLI: the bundled configs become manifests
that validate against the Kubernetes schemas (kubernetes-validate ships them, so this
runs offline), notes go to stderr and NOTES.md, and bad invocations exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rotator import export
from tests.conftest import cli, component, write_config

CONFIGS = Path(__file__).resolve().parents[2] / "config"
IMAGE = "registry.example/tekton:1.0"
# The oldest Kubernetes the manifests are written for (preStop `sleep`), and the newest
# schemas this kubernetes-validate ships.
VERSIONS = (export.MIN_VERSION, kubernetes_validate.latest_version())


def validate(document: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


def components_of(config: Path) -> list[str]:
    return list(yaml.safe_load(config.read_text())["components"])


@pytest.mark.parametrize("name", ["example.yaml", "tekton.yaml"])
def test_bundled_config_exports_valid_manifests(name: str, tmp_path: Path) -> None:
    config = CONFIGS / name
    out = tmp_path / "k8s"
    result = cli(config, "export", "kubernetes", "--image", IMAGE, "-o", str(out))
    assert result.returncode == 0, result.stderr
    components = components_of(config)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{c}.yaml" for c in components] + ["NOTES.md"]
    )
    for component_name in components:
        deployment, service = yaml.safe_load_all((out / f"{component_name}.yaml").read_text())
        validate(deployment)
        validate(service)
        assert deployment["metadata"]["name"] == service["metadata"]["name"] == component_name
    # Each note is one stderr line and one NOTES.md item.
    notes = result.stderr.splitlines()
    assert notes, "the bundled configs use {python}: that must be reported"
    items = [line[2:] for line in (out / "NOTES.md").read_text().splitlines() if line[:2] == "- "]
    assert items == notes
    assert str(out) in result.stdout and "kubectl apply -f" in result.stdout


def test_tekton_dependencies_wait_for_their_services(tmp_path: Path) -> None:
    result = cli(CONFIGS / "tekton.yaml", "export", "kubernetes", "--image", IMAGE)
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    assert len(documents) == 2 * 15
    for document in documents:
        validate(document)
    ports = {d["metadata"]["name"]: d["spec"]["ports"][0]["port"] for d in documents[1::2]}
    core = next(d for d in documents if d["metadata"]["name"] == "tekton-core")
    waits = core["spec"]["template"]["spec"]["initContainers"]
    assert [w["name"] for w in waits] == ["wait-for-hermes", "wait-for-engram"]
    assert f"http://hermes:{ports['hermes']}/health" in waits[0]["command"][2]
    assert f"http://engram:{ports['engram']}/health" in waits[1]["command"][2]


def test_a_mistyped_field_fails_validation() -> None:
    # The check above can fail: strict schemas refuse what Kubernetes would drop.
    result = cli(CONFIGS / "example.yaml", "export", "kubernetes", "--image", IMAGE)
    deployment = next(yaml.safe_load_all(result.stdout))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_images_and_namespace_from_the_config(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"hermes": component(), "Athena_2": component(stop_signal="INT", verify="5s")},
        export={
            "kubernetes": {"image": "base:1", "images": {"hermes": "own:2"}, "namespace": "shop"}
        },
    )
    result = cli(config, "export", "kubernetes", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    images = {}
    for path in (tmp_path / "out").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            validate(document)
            assert document["metadata"]["namespace"] == "shop"
            if document["kind"] == "Deployment":
                [main] = document["spec"]["template"]["spec"]["containers"]
                images[document["metadata"]["name"]] = main["image"]
    assert images == {"hermes": "own:2", "athena-2": "base:1"}
    stderr = result.stderr
    assert "Athena_2: renamed athena-2" in stderr
    assert "Athena_2: stop_signal INT has no Kubernetes equivalent" in stderr
    assert "Athena_2: verify 5s became minReadySeconds 5" in stderr
    # the test config's 200ms interval, set in its defaults: one line for both
    assert "every component: health.interval 200ms rounded up" in stderr


def test_a_second_export_removes_components_that_are_gone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    two = write_config(tmp_path, {"hermes": component(), "athena": component()})
    assert cli(two, "export", "kubernetes", "--image", IMAGE, "-o", str(out)).returncode == 0
    (out / "mine.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")  # not ours: kept
    one = write_config(tmp_path, {"hermes": component()})
    result = cli(one, "export", "kubernetes", "--image", IMAGE, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "hermes.yaml", "mine.yaml"]
    assert f"rotator: removed {out / 'athena.yaml'}" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kubernetes"], "rotator: no image for hermes, athena, apollo: "),
        (["kubernetes", "--image", ""], "rotator: --image '' is not an image name"),
        (["kubernetes", "--image", "a b"], "rotator: --image 'a b' is not an image name"),
        (["docker", "--image", IMAGE], "invalid choice: 'docker'"),
        ([], "the following arguments are required: target"),
    ],
)
def test_bad_invocations_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(CONFIGS / "example.yaml", "export", *args, "-o", str(out))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_bad_export_section_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"hermes": component()}, export={"kubernetes": {"images": {"hermse": "a:1"}}}
    )
    result = cli(config, "export", "kubernetes")
    assert result.returncode == 2
    assert "export.kubernetes.images.hermse: unknown component 'hermse'" in result.stderr
    assert "did you mean 'hermes'?" in result.stderr
    assert result.stdout == ""


def test_an_unwritable_output_fails_with_exit_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli(
        CONFIGS / "example.yaml",
        "export",
        "kubernetes",
        "--image",
        IMAGE,
        "-o",
        str(blocker / "out"),
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()[-1:]
    assert line.startswith("rotator: cannot write the export to ")
