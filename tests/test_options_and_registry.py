"""Pass registry, spec parsing and option validation."""

from __future__ import annotations

import dataclasses

import pytest

from torchkiln.compiler.options import option
from torchkiln.compiler.passes import (
    _REGISTRY,
    Pass,
    PassConfig,
    PassResult,
    get_pass,
    parse_pass,
    parse_pipeline,
    register_pass,
    registered_passes,
)
from torchkiln.errors import ConfigError


def test_builtin_passes_are_registered():
    assert {"cleanup", "fold_batchnorm"} <= set(registered_passes())


def test_spec_with_options_is_coerced_by_type():
    p = parse_pass("cleanup:fold_constants=false,max_constant_bytes=128")
    assert p.config.fold_constants is False
    assert p.config.max_constant_bytes == 128
    assert p.spec == "cleanup:fold_constants=false,max_constant_bytes=128"


def test_unknown_pass_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        parse_pass("fold_bn")
    assert "unknown pass 'fold_bn'" in str(info.value)
    assert "cleanup" in info.value.hint and "fold_batchnorm" in info.value.hint


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        parse_pass("cleanup:fold=false")
    assert "unknown option 'fold'" in str(info.value)
    assert "fold_constants" in info.value.hint


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cleanup:max_constant_bytes=lots", "expected int"),
        ("cleanup:fold_constants=maybe", "expected bool"),
        ("cleanup:max_constant_bytes=-1", "must be >= 0"),
        ("cleanup:fold_constants", "write key=value"),
    ],
)
def test_bad_option_values(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_pass(spec)


def test_pipeline_string_keeps_options_with_their_pass():
    passes = parse_pipeline("cleanup:remove_noops=false,fold_constants=false,fold_batchnorm")
    assert [p.name for p in passes] == ["cleanup", "fold_batchnorm"]
    assert passes[0].config.remove_noops is False and passes[0].config.fold_constants is False


def test_pipeline_accepts_pass_objects_and_rejects_others():
    cleanup = get_pass("cleanup")()
    assert parse_pipeline([cleanup, "fold_batchnorm"])[0] is cleanup
    with pytest.raises(ConfigError):
        parse_pipeline([42])


def test_config_declares_types_defaults_and_docs():
    rows = {
        name: (type_, default, doc) for name, type_, default, doc in get_pass("cleanup").Config.describe()
    }
    assert rows["max_constant_bytes"][:2] == ("int", "65536")
    assert rows["remove_noops"][2]


def test_register_pass_rejects_bad_and_duplicate_names():
    @dataclasses.dataclass(frozen=True)
    class Cfg(PassConfig):
        ratio: float = option(0.5, "a ratio")

        def validate(self) -> None:
            if not 0 <= self.ratio < 1:
                self.fail("ratio", f"must be in [0, 1), got {self.ratio}")

    class Good(Pass):
        name = "test_only_good"
        Config = Cfg

        def run(self, program):
            return PassResult(False)

    register_pass(Good)
    try:
        with pytest.raises(ConfigError, match=r"must be in \[0, 1\), got 1.5"):
            parse_pass("test_only_good:ratio=1.5")

        class Clash(Good):
            pass

        with pytest.raises(TypeError, match="already registered"):
            register_pass(Clash)

        class BadName(Good):
            name = "Bad-Name"

        with pytest.raises(TypeError, match="snake_case"):
            register_pass(BadName)
    finally:
        _REGISTRY.pop("test_only_good")
