"""Each module imports on its own (no hidden cycles), and the lower layers stay free of
the upper ones: the CLI must not drag the daemon stack in for commands that only
talk to the admin API."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import rotator

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(rotator.__path__, "rotator.")
    if m.name != "rotator.__main__"
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_cli_does_not_load_the_daemon_stack() -> None:
    loaded = loaded_after("import rotator.cli")
    assert not loaded & {
        "aiohttp",
        "httptools",
        "rotator.daemon",
        "rotator.proxy.protocol",
        "psutil",
    }


@pytest.mark.parametrize(
    "pure",
    ["rotator.config", "rotator.configfile", "rotator.ports", "rotator.events", "rotator.printer"],
)
def test_pure_modules_stay_below_the_side_effects(pure: str) -> None:
    loaded = loaded_after(f"import {pure}")
    upper = {
        "rotator.component",
        "rotator.daemon",
        "rotator.admin",
        "rotator.instance",
        "rotator.proxy.protocol",
    }
    assert not loaded & upper


def test_the_config_model_does_not_load_the_file_reader() -> None:
    # Modules that only read specs must not pay for the YAML parser (see rotator/config.py).
    assert not loaded_after("import rotator.config") & {"rotator.configfile", "yaml"}


def test_the_spawner_process_loads_only_what_it_needs() -> None:
    """It runs for the daemon's whole life: asyncio alone would add 8 MiB to it."""
    loaded = loaded_after("import rotator.spawner_process")
    assert not loaded & {"asyncio", "psutil", "yaml", "aiohttp", "rotator.spawner"}
    assert {m for m in loaded if m.startswith("rotator.")} == {"rotator.spawner_process"}
