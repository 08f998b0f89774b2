"""User passes join the pipeline where asked; failures name the pass; checks catch broken graphs."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import fxpress
from fxpress.compiler.pipeline import build_pipeline


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


def _compile_and_run(model, **options):
    reports = []
    backend = fxpress.Backend(fxpress.Options.create(**options), on_report=reports.append)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        assert torch.allclose(out, model(x), atol=1e-6)
    return reports


def count_mm(gm, *, opts):
    fxpress.counters["count_mm"]["addmm seen"] += sum(
        1 for n in gm.graph.nodes if n.target is torch.ops.aten.addmm.default)
    return PassResult(gm, False)


def test_user_pass_runs_at_the_end_by_default():
    names = [name for name, _ in build_pipeline(fxpress.Options(passes=(count_mm,)))]
    assert names[-1] == "count_mm"
    reports = _compile_and_run(_mlp(), passes=[count_mm])
    record = reports[0].passes[-1]
    assert record.name == "count_mm" and record.counters == {"count_mm": {"addmm seen": 2}}


@pytest.mark.parametrize("where", ["before", "after"])
def test_user_pass_inserted_next_to_named_pass(where):
    user = fxpress.Pass(count_mm, **{where: "cse"})
    names = [name for name, _ in build_pipeline(fxpress.Options(passes=(user,)))]
    cse = names.index("cse")
    assert names.index("count_mm") == (cse - 1 if where == "before" else cse + 1)


def test_disable_skips_a_pass():
    names = [name for name, _ in build_pipeline(fxpress.Options(disable=("cse",)))]
    assert "cse" not in names and "fuse_rms_norm" in names


def test_failing_pass_is_named():
    def explode(gm, *, opts):
        raise ValueError("boom")

    with pytest.raises(Exception) as e:
        _compile_and_run(_mlp(), passes=[fxpress.Pass(explode, after="cse")])
    message = str(e.value)
    assert "'explode' failed with ValueError: boom" in message and "'cse'" in message


def test_pass_must_return_pass_result():
    def returns_gm(gm, *, opts):
        return gm

    with pytest.raises(Exception, match="'returns_gm' returned a GraphModule"):
        _compile_and_run(_mlp(), passes=[returns_gm])


def _breaks_metadata(gm: fx.GraphModule, *, opts) -> PassResult:
    """Swaps GELU for a sum: the recorded [3, 16] metadata no longer matches what the op computes."""
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.gelu.default:
            node.target = torch.ops.aten.sum.default
    gm.recompile()
    return PassResult(gm, True)


def test_check_catches_a_pass_that_breaks_metadata():
    with pytest.raises(Exception, match="'_breaks_metadata' left a broken graph: node gelu"):
        _compile_and_run(_mlp(), passes=[_breaks_metadata], check=True)


def test_builtin_passes_pass_the_check():
    from tests.tiny_models import tiny_llama, token_ids

    model, ids = tiny_llama(), token_ids()
    backend = fxpress.backend(check=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(ids).logits,
                                   model(ids).logits, atol=1e-5, rtol=0)


def test_dump_dir_gets_a_numbered_graph_per_changing_pass(tmp_path):
    from tests.tiny_models import tiny_llama, token_ids

    reports = []
    backend = fxpress.Backend(fxpress.Options(dump_dir=str(tmp_path)), on_report=reports.append)
    with torch.no_grad():
        torch.compile(tiny_llama(), backend=backend)(token_ids())
    (folder,) = tmp_path.iterdir()
    expected = {"000_captured.txt", "options.txt", "wrapper.py", "plan.json"} | {
        f"{i:03d}_{p.name}.txt" for i, p in enumerate(reports[0].passes, start=1) if p.modified
    }
    assert {p.name for p in folder.iterdir()} == expected
    rms_index = [p.name for p in reports[0].passes].index("fuse_rms_norm") + 1
    assert "fxpress.rms_norm" in (folder / f"{rms_index:03d}_fuse_rms_norm.txt").read_text()
