"""The format registry: every format module meets the written contract, and a new format is
one module (`toy_raw_format`) plus one `register_format` call, end to end."""

from __future__ import annotations

import doctest
import inspect as pyinspect
import os
import types

import numpy as np
import pytest
import toy_raw_format

import weightbridge.io as wio
from weightbridge import api
from weightbridge.errors import UnknownFormatError
from weightbridge.io.base import PlacingWriter, Reader

# The members of `ShardWriter` (and the methods of `FormatModule`), as a runtime check can see them.
WRITER_METHODS = ("write", "copy_from", "close", "abort")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, wio.FormatEntry]:
    """A private copy of the registry, so a test's registrations end with the test."""
    formats = dict(wio.FORMATS)
    monkeypatch.setattr(wio, "FORMATS", formats)
    return formats


def test_docstring_examples() -> None:
    from weightbridge.io import base

    for module in (wio, base):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
    assert doctest.testmod(wio).attempted > 0


@pytest.mark.parametrize("name", list(wio.FORMATS))
def test_every_registered_module_meets_the_format_protocol(name: str) -> None:
    entry = wio.FORMATS[name]
    module = wio._module(name)
    assert name == module.NAME
    assert isinstance(module.SUFFIXES, tuple) and module.SUFFIXES
    assert all(isinstance(s, str) and s.startswith(".") for s in module.SUFFIXES)
    assert list(pyinspect.signature(module.detect).parameters)[:2] == ["path", "head"]
    assert "path" in pyinspect.signature(module.open_reader).parameters
    if entry.output_names:
        writer = module.Writer  # type: ignore[attr-defined]
        assert isinstance(writer.suffix, str) and writer.suffix.startswith(".")
        for method in WRITER_METHODS:
            assert callable(getattr(writer, method)), f"{name}.Writer lacks {method}"
        params = list(pyinspect.signature(writer).parameters)
        assert params[:3] == ["path", "tensors", "metadata"]
    for suffix in entry.write_suffixes:
        assert wio._suffix_format("model" + suffix) in entry.output_names


def test_detection_of_another_format_returns_false(tmp_path) -> None:
    """`detect` never raises on a file of another format (detection asks every module)."""
    path = str(tmp_path / "m.safetensors")
    wio.write_checkpoint(path, {"w": np.zeros(2, np.float32)})
    with open(path, "rb") as f:
        head = f.read(64)
    for name in wio.FORMATS:
        if name != "safetensors":
            assert wio._module(name).detect(path, head) is False, name


def test_readers_and_writers_are_what_the_protocols_say(tmp_path) -> None:
    path = str(tmp_path / "m.safetensors")
    wio.write_checkpoint(path, {"w": np.zeros(2, np.float32)})
    with wio.open_reader(path) as reader:
        assert isinstance(reader, Reader)
    for format, placing in (("safetensors", True), ("npz", False)):
        writer = wio.writer_class(format)(str(tmp_path / f"out.{format}"), [], None)
        try:
            assert isinstance(writer, PlacingWriter) is placing, format
        finally:
            writer.abort()


@pytest.mark.parametrize("how", ["module", "import string"])
def test_a_registered_toy_format_converts_end_to_end(
    registry: dict[str, wio.FormatEntry], how: str, tmp_path
) -> None:
    module = toy_raw_format if how == "module" else "toy_raw_format"
    wio.register_format("toyraw", module, output_names=("toyraw",), write_suffixes=(".raw",))
    rng = np.random.default_rng(0)
    arrays = {
        "layer.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "layer.bias": rng.standard_normal(3).astype(np.float16),
        "step": np.array(7, np.int64),
    }
    src = str(tmp_path / "src.safetensors")
    wio.write_checkpoint(src, arrays)

    api.convert(src, str(tmp_path / "raw"), format="toyraw")
    [shard] = [e for e in os.listdir(tmp_path / "raw") if e.endswith(".raw")]
    raw = str(tmp_path / "raw" / shard)
    assert wio.detect_format(raw) == "toyraw"
    assert api.inspect(raw) == api.inspect(src)
    with wio.open_reader(raw) as reader:
        for name, want in arrays.items():
            np.testing.assert_array_equal(reader.read(name), want)

    api.convert(raw, str(tmp_path / "back"), format="safetensors")
    with wio.open_reader(str(tmp_path / "back")) as reader:
        for name, want in arrays.items():
            got = reader.read(name)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)

    path = str(tmp_path / "direct.raw")  # write_checkpoint picks the format by write suffix
    wio.write_checkpoint(path, arrays)
    assert wio.detect_format(path) == "toyraw"


def test_register_format_refuses_an_incomplete_module(registry) -> None:
    half = types.ModuleType("half_format")
    half.NAME = "half"  # type: ignore[attr-defined]
    half.detect = lambda path, head: False  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"lacks \['SUFFIXES', 'open_reader'\]"):
        wio.register_format("half", half)
    with pytest.raises(TypeError, match="Writer"):  # a writable format needs its Writer
        reader_only = types.ModuleType("reader_only")
        for member in ("NAME", "SUFFIXES", "detect", "open_reader"):
            setattr(reader_only, member, getattr(toy_raw_format, member))
        wio.register_format("toyraw", reader_only, output_names=("toyraw",))
    assert "half" not in wio.FORMATS and "toyraw" not in wio.FORMATS


def test_register_format_refuses_an_output_name_taken_by_another_format(registry) -> None:
    with pytest.raises(ValueError, match="'npz' already selects the numpy format"):
        wio.register_format("toyraw", toy_raw_format, output_names=("npz",))


def test_a_missing_format_library_names_what_to_install(registry, tmp_path) -> None:
    wio.register_format(
        "ghost", "weightbridge_no_such_module", install_hint="pip install ghost-format"
    )
    with pytest.raises(ImportError, match="to read or write ghost: pip install ghost-format"):
        wio.open_reader(str(tmp_path), format="ghost")
    path = tmp_path / "m.unknown"
    path.write_bytes(b"nothing anyone knows")
    with pytest.raises(UnknownFormatError, match="unavailable here: ghost .*pip install ghost"):
        wio.detect_format(str(path))
