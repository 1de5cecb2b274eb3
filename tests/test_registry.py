"""Registry: decorator and lazy entries, direct paths, entry-point plugins, no torch on import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eqbench.errors import EqbenchError, UnknownNameError
from eqbench.registry import MODELS, SYSTEMS, TASKS, Entry, PluginWarning, Registry

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a uniquely named module into tmp_path (on sys.path) and return its name.

    Unique names keep tests independent of each other's ``sys.modules``; the modules are
    removed again afterwards.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(source: str) -> str:
        name = f"eqb_test_mod_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)


@pytest.fixture
def make_plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Create a real installed-looking distribution (``*.dist-info`` on sys.path) with entry points.

    Returns a fresh, test-only entry-point group so nothing global is disturbed.
    """
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dist_name: str, entry_points: str) -> str:
        group = f"eqbench.test_{uuid.uuid4().hex[:10]}"
        info = tmp_path / f"{dist_name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[{group}]\n{textwrap.dedent(entry_points)}")
        return group

    return make


def test_decorator_registers_and_returns_object_unchanged() -> None:
    reg: Registry[object] = Registry("model")

    @reg.register("tiny-flow", description="a tiny flow")
    def build(system: object, config: object) -> str:
        """Docstring first line."""
        return "built"

    assert build(None, None) == "built"  # the decorator returned the function itself
    assert reg.get("tiny-flow") is build
    assert "tiny-flow" in reg and "other" not in reg
    assert reg.names() == ["tiny-flow"] == list(reg)
    assert len(reg) == 1
    (entry,) = reg.entries()
    assert entry == Entry("tiny-flow", f"{__name__}:{build.__qualname__}", __name__, "a tiny flow")


def test_decorator_description_defaults_to_docstring() -> None:
    reg: Registry[object] = Registry("system")

    @reg.register("dw")
    class DoubleWell:
        """Double-well potential.

        More text.
        """

    assert reg.entry("dw").description == "Double-well potential."
    assert reg.get("dw") is DoubleWell


def test_lazy_entry_is_not_imported_until_get(make_module: Callable[[str], str]) -> None:
    mod = make_module(
        """
        def build(system, config):
            '''A lazily imported builder.'''
            return ("built", system)
        """
    )
    reg: Registry[object] = Registry("model")
    assert reg.register("lazy-flow", f"{mod}:build", description="lazy") is None

    assert reg.names() == ["lazy-flow"]
    assert reg.entries() == [Entry("lazy-flow", f"{mod}:build", mod, "lazy")]
    assert "lazy-flow" in reg
    assert mod not in sys.modules  # listing and membership import nothing

    builder = reg.get("lazy-flow")
    assert mod in sys.modules
    assert builder("dw4", None) == ("built", "dw4")
    assert reg.get("lazy-flow") is builder  # cached


def test_builtin_origin_is_eqbench() -> None:
    reg: Registry[object] = Registry("task")
    reg.register("de", "eqbench.tasks.density_estimation:run")
    assert reg.entry("de").origin == "eqbench"


def test_unknown_name_lists_close_match_and_valid_names() -> None:
    reg: Registry[object] = Registry("model")
    reg.register("kernel-flow", "eqbench.flows.kernel_flow:build")
    reg.register("real-nvp", "eqbench.flows.real_nvp:build")

    with pytest.raises(UnknownNameError) as info:
        reg.get("kernel-flwo")
    message = str(info.value)
    assert "unknown model 'kernel-flwo'" in message
    assert "did you mean 'kernel-flow'" in message
    assert "valid: kernel-flow, real-nvp" in message
    assert isinstance(info.value, EqbenchError)

    with pytest.raises(UnknownNameError):
        reg.entry("nope")


def test_direct_module_attr_path_without_registering(make_module: Callable[[str], str]) -> None:
    mod = make_module(
        """
        class Flows:
            @staticmethod
            def build(system, config):
                return "direct"
        """
    )
    reg: Registry[object] = Registry("model")
    builder = reg.get(f"{mod}:Flows.build")
    assert builder(None, None) == "direct"
    assert reg.names() == []  # a direct path is not added to the listing


def test_direct_path_failures_are_one_line_eqbench_errors(
    make_module: Callable[[str], str],
) -> None:
    reg: Registry[object] = Registry("model")
    with pytest.raises(
        EqbenchError, match=r"cannot load model 'eqb_no_such_module_xyz:build'.*ModuleNotFoundError"
    ):
        reg.get("eqb_no_such_module_xyz:build")

    mod = make_module("x = 1\n")
    with pytest.raises(EqbenchError, match="AttributeError") as info:
        reg.get(f"{mod}:missing")
    assert "\n" not in str(info.value)

    with pytest.raises(EqbenchError, match="expected 'package.module:attr'"):
        reg.get("a:b:c")


def test_duplicate_and_invalid_registrations_raise() -> None:
    reg: Registry[object] = Registry("model")
    reg.register("flow", "eqbench.flows.a:build")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("flow", "eqbench.flows.b:build")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("flow")(lambda: None)
    with pytest.raises(ValueError, match="reserved"):
        reg.register("has:colon", "eqbench.flows.a:build")
    with pytest.raises(ValueError, match="module:attr"):
        reg.register("no-attr", "eqbench.flows.a")
    assert reg.names() == ["flow"]


def test_entry_point_plugin_is_listed_with_origin_and_loaded_lazily(
    make_module: Callable[[str], str], make_plugin_dist: Callable[[str, str], str]
) -> None:
    mod = make_module("def build(system, config):\n    return 'from plugin'\n")
    group = make_plugin_dist("eqb-test-plugin", f"my-flow = {mod}:build\n")
    reg: Registry[object] = Registry("model", group)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy plugin lists without warnings
        assert reg.names() == ["my-flow"]
        assert reg.entries(describe_plugins=False) == [Entry("my-flow", f"{mod}:build", "plugin eqb-test-plugin", "")]
    assert mod not in sys.modules  # discovered and listed without descriptions: never imported

    assert reg.get("my-flow")(None, None) == "from plugin"
    assert mod in sys.modules


def test_broken_plugin_lists_fine_and_fails_cleanly_at_get(
    make_module: Callable[[str], str], make_plugin_dist: Callable[[str, str], str]
) -> None:
    good = make_module("def build(system, config):\n    return 'ok'\n")
    group = make_plugin_dist(
        "eqb-broken-plugin",
        f"good = {good}:build\nbroken = eqb_missing_plugin_module_xyz:build\n",
    )
    reg: Registry[object] = Registry("model", group)

    assert reg.names() == ["broken", "good"]  # names import nothing, so they cannot crash
    with pytest.warns(PluginWarning, match="'broken'.*ModuleNotFoundError"):
        entries = reg.entries()  # describing loads the plugins: the broken one warns, is still listed
    assert [e.name for e in entries] == ["broken", "good"]
    with pytest.raises(EqbenchError) as info:
        reg.get("broken")
    message = str(info.value)
    assert "'broken'" in message and "plugin eqb-broken-plugin" in message
    assert "ModuleNotFoundError" in message and "eqb_missing_plugin_module_xyz" in message
    assert "\n" not in message
    assert reg.get("good")(None, None) == "ok"  # one broken plugin does not affect the others


def test_plugin_clashing_with_registered_name_warns_and_builtin_wins(
    make_module: Callable[[str], str], make_plugin_dist: Callable[[str, str], str]
) -> None:
    plugin_mod = make_module("def build(system, config):\n    return 'plugin'\n")
    group = make_plugin_dist(
        "eqb-clash-plugin", f"kernel-flow = {plugin_mod}:build\nbad:name = {plugin_mod}:build\n"
    )
    reg: Registry[object] = Registry("model", group)

    @reg.register("kernel-flow")
    def build(system: object, config: object) -> str:
        return "builtin"

    with pytest.warns(PluginWarning) as caught:
        names = reg.names()
    assert names == ["kernel-flow"]
    text = " ".join(str(w.message) for w in caught)
    assert "kernel-flow" in text and "takes precedence" in text
    assert "bad:name" in text
    assert reg.get("kernel-flow") is build
    assert reg.entry("kernel-flow").origin == __name__


def test_builtin_registered_after_discovery_shadows_plugin(
    make_module: Callable[[str], str], make_plugin_dist: Callable[[str, str], str]
) -> None:
    plugin_mod = make_module("def build(system, config):\n    return 'plugin'\n")
    group = make_plugin_dist("eqb-late-plugin", f"late = {plugin_mod}:build\n")
    reg: Registry[object] = Registry("model", group)
    assert reg.entry("late").origin == "plugin eqb-late-plugin"

    with pytest.warns(PluginWarning, match="shadowed"):
        reg.register("late", "eqbench.flows.late:build")
    assert reg.entry("late").target == "eqbench.flows.late:build"
    assert len(reg) == 1


def test_module_level_registries() -> None:
    assert (SYSTEMS.kind, SYSTEMS.entry_point_group) == ("system", None)
    assert (MODELS.kind, MODELS.entry_point_group) == ("model", "eqbench.models")
    assert (TASKS.kind, TASKS.entry_point_group) == ("task", "eqbench.tasks")


def test_listing_describes_plugins_and_imports_no_builtin(
    make_module: Callable[[str], str], make_plugin_dist: Callable[[str, str], str]
) -> None:
    """``entries()`` (what ``eqbench list`` prints) shows each plugin's description: the one
    ``model_builder`` declares, else the docstring's first line; built-ins stay unimported."""
    declared = make_module(
        """
        from eqbench.capabilities import model_builder

        @model_builder(capabilities=["trainable"], description="a declared description")
        def build(system, config):
            '''Docstring that the declared description wins over.'''
        """
    )
    documented = make_module("def build(system, config):\n    '''First line.\n\n    More.'''\n")
    group = make_plugin_dist(
        "eqb-described-plugin",
        f"declared = {declared}:build\ndocumented = {documented}:build\nbroken = eqb_missing_xyz:build\n",
    )
    builtin = make_module("def build(system, config):\n    '''never imported'''\n")
    reg: Registry[object] = Registry("model", group)
    reg.register("builtin", f"{builtin}:build", description="built-in")

    with pytest.warns(PluginWarning) as caught:
        entries = {e.name: e for e in reg.entries()}
    assert [str(w.message) for w in caught if "broken" in str(w.message)], "a failing plugin must warn"
    assert entries["declared"].description == "a declared description"
    assert entries["documented"].description == "First line."
    assert entries["broken"].origin == "plugin eqb-described-plugin"  # still listed, with its reason
    assert entries["builtin"].description == "built-in"
    assert builtin not in sys.modules  # only plugin targets are loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # described once: a second listing neither loads nor warns again
        assert {e.name: e.description for e in reg.entries()} == {n: e.description for n, e in entries.items()}


def test_cli_list_prints_plugin_description(tmp_path: Path) -> None:
    """``python -m eqbench list models`` with an installed-looking plugin prints its description."""
    (tmp_path / "eqb_listed_plugin.py").write_text(textwrap.dedent(
        """
        from eqbench.capabilities import model_builder

        @model_builder(capabilities=["trainable", "exact-density"], description="listed with its words")
        def build(system, config):
            raise NotImplementedError
        """
    ))
    info = tmp_path / "eqb_listed_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eqb-listed-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[eqbench.models]\nlisted-flow = eqb_listed_plugin:build\nbroken-flow = eqb_no_such_mod:build\n")
    out = subprocess.run([sys.executable, "-m", "eqbench", "list", "models"], capture_output=True, text=True,
                         cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO_ROOT}"}, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(row for row in out.stdout.splitlines() if row.startswith("listed-flow"))
    assert "plugin eqb-listed-plugin" in line and "listed with its words" in line
    assert any(row.startswith("broken-flow") for row in out.stdout.splitlines())
    assert "broken-flow" in out.stderr and "ModuleNotFoundError" in out.stderr  # the warning
    assert any(row.startswith("gaussian") and "baseline" in row for row in out.stdout.splitlines())
