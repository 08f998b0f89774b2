"""Options are validated when the backend is built, with messages that list the valid ones."""

from __future__ import annotations

import pytest
import torch

import fxpress


def test_unknown_option_lists_valid_ones():
    with pytest.raises(fxpress.OptionError) as e:
        fxpress.backend(tagret="cpu")
    assert "tagret" in str(e.value) and "target" in str(e.value) and "strict" in str(e.value)


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(target="tpu"), "target"),
        (dict(strict="yes"), "strict"),
        (dict(passes=[42]), "passes"),
        (dict(disable="cse"), "disable"),
        (dict(check=1), "check"),
    ],
)
def test_ill_typed_option_is_refused(options, named):
    with pytest.raises(fxpress.OptionError, match=f"option {named}="):
        fxpress.backend(**options)


def test_pass_without_opts_keyword_is_refused():
    def my_pass(gm):
        return gm

    with pytest.raises(fxpress.OptionError, match="must accept \\(gm, \\*, opts\\)"):
        fxpress.backend(passes=[my_pass])


def test_pass_anchor_must_exist():
    def my_pass(gm, *, opts):
        raise AssertionError("never runs")

    with pytest.raises(fxpress.OptionError, match="'no_such_pass'"):
        fxpress.backend(passes=[fxpress.Pass(my_pass, before="no_such_pass")])
    with pytest.raises(fxpress.OptionError, match="names no pass"):
        fxpress.backend(disable=["no_such_pass"])


def test_options_reach_backend_through_torch_compile():
    # Dynamo wraps backend errors in BackendCompilerFailed; the message is ours.
    with pytest.raises(Exception, match="unknown fxpress option"):
        torch.compile(lambda x: x + 1, backend="fxpress", options={"bogus": 1})(torch.ones(2))


def test_compile_modes_other_than_reduce_overhead_are_refused():
    with pytest.raises(Exception, match="'default' and 'reduce-overhead'"):
        torch.compile(lambda x: x + 1, backend="fxpress", mode="max-autotune")(torch.ones(2))


def test_options_are_frozen():
    opts = fxpress.Options()
    with pytest.raises(Exception):
        opts.strict = True
