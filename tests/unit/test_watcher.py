"""Restart on save without processes: the `watch` keys as the file states them (a path
that does not exist is an error at its line), which changed paths concern a component
(Matcher, watch_roots), and when it rotates (Coalescer, driven with given times)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rotator.config import WATCH_IGNORE, ConfigError, Problem, WatchSpec, watch_base
from rotator.configfile import parse
from rotator.fleet import plan_reload
from rotator.watcher import Coalescer, files_phrase
from rotator.watcher_process import Matcher, glob_pattern, watch_roots
from tests.unit.test_config import HERMES

# Line 2 is `hermes:`; cases append keys to it (line 6 on).


def parsed(text: str, tmp_path: Path) -> WatchSpec:
    return parse(textwrap.dedent(text), tmp_path / "rotator.yaml").components[0].watch


def problems_of(text: str, tmp_path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), tmp_path / "rotator.yaml")
    return info.value.problems


# -- the config keys -------------------------------------------------------------------------


def test_watch_is_off_by_default_and_its_keys_read_as_written(tmp_path: Path) -> None:
    assert parsed(HERMES, tmp_path) == WatchSpec()
    assert WatchSpec().paths == () and WatchSpec().debounce == 0.3
    (tmp_path / "src").mkdir()
    (tmp_path / "app.py").touch()
    spec = parsed(
        HERMES
        + "    watch: [app.py, 'src/**/*.py', '*.toml']\n"
        + "    watch_ignore: '*.log'\n"
        + "    watch_debounce: 50ms\n",
        tmp_path,
    )
    assert spec.paths == ("app.py", "src/**/*.py", "*.toml")
    assert spec.ignore == (*WATCH_IGNORE, "*.log")  # the defaults stay
    assert spec.debounce == 0.05


def test_defaults_give_watch_to_every_component_and_a_component_replaces_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "app.py").touch()
    text = "defaults:\n  watch: src\n  watch_debounce: 1s\n" + HERMES + "    watch: [app.py]\n"
    text += "  zeus:\n    listen: 127.0.0.1:8002\n    ports: 18011-18020\n    command: run\n"
    hermes, zeus = parse(text, tmp_path / "rotator.yaml").components
    assert hermes.watch.paths == ("app.py",) and hermes.watch.debounce == 1.0
    assert zeus.watch.paths == ("src",) and zeus.watch.debounce == 1.0


def test_a_watch_path_that_does_not_exist_is_an_error_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "app.py").touch()
    problems = problems_of(
        HERMES + "    watch:\n      - app.py\n      - nothere.py\n      - 'gone/*.py'\n",
        tmp_path,
    )
    assert [str(p) for p in problems] == [
        f"{tmp_path}/rotator.yaml:8: components.hermes.watch[1]: "
        f"{tmp_path}/nothere.py does not exist",
        f"{tmp_path}/rotator.yaml:9: components.hermes.watch[2]: "
        f"{tmp_path}/gone (the directory of the glob) does not exist",
    ]


def test_a_default_watch_path_missing_in_one_components_cwd_names_it(tmp_path: Path) -> None:
    (tmp_path / "there").mkdir()
    text = "defaults:\n  watch: [app.py]\n" + HERMES + "    cwd: there\n"
    [problem] = problems_of(text, tmp_path)
    assert str(problem) == (
        f"{tmp_path}/rotator.yaml:2: defaults.watch[0]: "
        f"{tmp_path}/there/app.py does not exist (in the cwd of hermes)"
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("    watch: ['']\n", "6: components.hermes.watch[0]: is empty"),
        ("    watch: [{a: 1}]\n", "6: components.hermes.watch[0]: must be a single value"),
        ("    watch_ignore: [~]\n", "6: components.hermes.watch_ignore[0]: needs a value"),
        ("    watch_debounce: soon\n", "6: components.hermes.watch_debounce: "),
        ("    watch_debounce: -1s\n", "6: components.hermes.watch_debounce: "),
        ("    wach: [app.py]\n", "did you mean 'watch'"),
    ],
)
def test_bad_watch_values_are_errors_at_their_line(
    lines: str, expected: str, tmp_path: Path
) -> None:
    [problem] = problems_of(HERMES + lines, tmp_path)
    assert expected in str(problem), str(problem)


def test_a_reload_that_changes_watch_updates_in_place_without_rotating(tmp_path: Path) -> None:
    (tmp_path / "app.py").touch()
    old = parse(HERMES, tmp_path / "rotator.yaml")
    new = parse(HERMES + "    watch: [app.py]\n", tmp_path / "rotator.yaml")
    plan = plan_reload(old, new)
    assert plan.updated == ("hermes",) and not plan.rotated


# -- which paths matter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.py", "app.py", True),
        ("*.py", "src/app.py", False),  # `*` stays within one name
        ("src/*.py", "src/app.py", True),
        ("src/*.py", "src/a/app.py", False),
        ("src/**/*.py", "src/app.py", True),  # `**/` spans none or more directories
        ("src/**/*.py", "src/a/b/app.py", True),
        ("src/**", "src/a/b", True),
        ("app.p?", "app.py", True),
        ("[ab].py", "b.py", True),
        ("[!ab].py", "b.py", False),
        ("a+b(c).py", "a+b(c).py", True),  # regex characters are literal
    ],
)
def test_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_pattern(pattern).fullmatch(path)) is matches


def test_watch_base_is_the_directory_before_the_first_wildcard() -> None:
    assert watch_base("src/**/*.py") == "src"
    assert watch_base("*.py") == ""
    assert watch_base("a/b[0-9]/c") == "a"
    assert watch_base("src/app.py") == "src/app.py"


def test_the_matcher_keeps_what_watch_names_and_drops_what_is_ignored() -> None:
    spec = WatchSpec(
        paths=("app.py", "src", "templates/*.html"),
        ignore=(*WATCH_IGNORE, "*.log", "src/generated/"),
    )
    m = Matcher("/srv/hermes", spec)
    yes = [
        "/srv/hermes/app.py",
        "/srv/hermes/src/models/user.py",
        "/srv/hermes/templates/index.html",
    ]
    no = [
        "/srv/hermes/app.pyc",  # a path, not a prefix of names
        "/srv/hermes/other.py",
        "/srv/hermes/templates/a/index.html",
        "/srv/hermes/src/__pycache__/user.cpython-311.pyc",
        "/srv/hermes/src/.user.py.swp",
        "/srv/hermes/src/user.py~",
        "/srv/hermes/src/4913",
        "/srv/hermes/src/.git/index",
        "/srv/hermes/src/node_modules/x/index.js",
        "/srv/hermes/src/debug.log",
        "/srv/hermes/src/generated/schema.py",  # an ignore with `/`: from cwd
        "/srv/zeus/app.py",
    ]
    assert [p for p in yes + no if m.matches(p)] == yes
    assert m.relative("/srv/hermes/src/models/user.py") == "src/models/user.py"
    assert m.relative("/etc/hermes.conf") == "/etc/hermes.conf"


def test_watch_roots_are_directories_none_inside_another() -> None:
    spec = WatchSpec(paths=("app.py", "src", "src/models", "templates/*.html", "/etc/hermes"))
    dirs = {"/srv/hermes/src", "/srv/hermes/src/models", "/etc/hermes"}
    roots = watch_roots("/srv/hermes", spec, dirs.__contains__)
    # app.py: its directory (an editor may replace the file); the glob: its directory.
    assert roots == ["/etc/hermes", "/srv/hermes"]
    assert watch_roots("/srv/hermes", WatchSpec(paths=("src",)), dirs.__contains__) == [
        "/srv/hermes/src"
    ]


def test_files_phrase_names_three() -> None:
    assert files_phrase(["app.py"]) == "app.py"
    assert files_phrase(["a", "b", "c"]) == "a, b, c"
    assert files_phrase(list("abcdefg")) == "a, b, c and 4 more"
    assert files_phrase(list("abc"), more=500) == "a, b, c and 500 more"


# -- when to rotate --------------------------------------------------------------------------


def test_a_change_rotates_once_the_debounce_passed_without_another() -> None:
    c = Coalescer(0.3)
    assert c.due_in(0.0) is None
    c.change(["app.py"], 10.0)
    assert c.due_in(10.1) == pytest.approx(0.2)
    c.change(["app.py", "b.py"], 10.2)  # a burst: the quiet time starts again
    assert c.due_in(10.4) == pytest.approx(0.1)
    assert c.due_in(10.5) == 0.0
    assert c.begin() == "app.py, b.py"
    assert c.due_in(11.0) is None


def test_changes_during_a_rotation_give_exactly_one_more_after_it() -> None:
    c = Coalescer(0.3)
    c.change(["app.py"], 0.0)
    assert c.begin() == "app.py"
    for i in range(10):  # saves while the rotation runs: none starts another
        c.change([f"f{i}.py"], 1.0 + i / 10, more=100 if i == 9 else 0)
        assert c.due_in(1.0 + i / 10) is None
    c.end()
    assert c.due_in(2.0) == pytest.approx(0.2)
    assert c.due_in(2.2) == 0.0
    assert c.begin() == "f0.py, f1.py, f2.py and 107 more"  # one rotation for them all
    c.end()
    assert c.due_in(5.0) is None  # and no more


def test_a_held_component_drops_its_changes_and_says_why_once() -> None:
    c = Coalescer(0.0)
    c.change(["a.py"], 0.0)
    assert c.hold("stopped on purpose") == ("a.py", True)
    assert c.due_in(1.0) is None
    c.change(["b.py"], 1.0)
    assert c.hold("stopped on purpose") == ("b.py", False)  # said already
    c.change(["c.py"], 2.0)
    assert c.hold("a canary is running") == ("c.py", True)  # news
    c.change(["d.py"], 3.0)
    c.begin()
    c.end()
    c.change(["e.py"], 4.0)
    assert c.hold("a canary is running") == ("e.py", True)  # a rotation ran since
