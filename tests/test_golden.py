"""Golden files (xDSL's filecheck style, compared as whole files): IR text in, the verified
module or the exact one-line error out; and the generated CUDA, HIP, OpenCL, TT-Metalium and
TT-Lang source of a handful of kernels. `pytest tests/test_golden.py --regen-golden` rewrites
the expected files on purpose; review the diff before committing it."""
from pathlib import Path

import pytest

from concordia_ir import ConcordiaError
from concordia_ir.parser import parse_file
from concordia_ir.printer import print_module
from concordia_ir.verifier import verify_module
from concordia.lowering import render_source
from concordia.lowering.tt_lang import plan_tiles
from concordia.lowering.tt_metalium import render_metalium
from concordia_ir.errors import TileRefusal

GOLDEN = Path(__file__).parent / "golden"
IR_INPUTS = sorted((GOLDEN / "ir").glob("*.ir"))
SOURCE_INPUTS = sorted((GOLDEN / "source").glob("*.ir"))
RENDERERS = {
    "cu": lambda k: render_source(k, "cuda"),
    "hip": lambda k: render_source(k, "hip"),
    "cl": lambda k: render_source(k, "opencl"),
    "metalium.cpp": render_metalium,
    "ttlang": lambda k: plan_tiles(k).source,   # TT-Lang (Python) text, or the refusal
}


def check(path: Path, actual: str, request):
    if request.config.getoption("--regen-golden"):
        path.write_text(actual)
        return
    assert path.exists(), f"no golden file {path.name}: run pytest with --regen-golden"
    assert actual == path.read_text(), f"{path.name} differs (regenerate with --regen-golden)"


def ir_outcome(path: Path) -> str:
    try:
        return print_module(verify_module(parse_file(str(path))))
    except ConcordiaError as e:
        return f"error: {str(e).replace(str(path), path.name)}\n"


@pytest.mark.parametrize("path", IR_INPUTS, ids=lambda p: p.stem)
def test_ir_text_gives_the_expected_module_or_error(path, request):
    check(path.with_suffix(".expected"), ir_outcome(path), request)


def test_every_invalid_input_fails_with_a_location():
    for path in IR_INPUTS:
        if path.stem.startswith("err_"):
            assert ir_outcome(path).startswith(f"error: {path.name}:"), path.name


@pytest.mark.parametrize("ext", RENDERERS)
@pytest.mark.parametrize("path", SOURCE_INPUTS, ids=lambda p: p.stem)
def test_generated_source_matches_the_golden_file(path, ext, request):
    kernel = parse_file(str(path)).kernels[0]
    try:
        text = RENDERERS[ext](kernel)
    except TileRefusal as e:
        text = f"refused by the tile tier: {e}\n"
    check(path.with_suffix("." + ext), text, request)
