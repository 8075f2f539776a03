import logging

import pytest
import torch

from mtcls import precision as P

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, name, dtype, why", [
    ({"avx512f", "avx512_bf16"}, "bf16", torch.bfloat16, "avx512_bf16"),
    ({"amx_bf16", "amx_tile"}, "bf16", torch.bfloat16, "amx_bf16"),
    ({"avx512f", "avx512_vnni"}, "fp32", None, "no native bf16"),
    (set(), "fp32", None, "no native bf16"),
])
def test_auto_on_cpu_follows_the_cpu_flags(monkeypatch, flags, name, dtype, why):
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(flags))
    got = P.resolve_precision("auto", CPU)
    assert (got.name, got.autocast_dtype, got.quantized) == (name, dtype, False)
    assert why in got.reason and got.reason.startswith("auto")


def test_bf16_without_native_support_runs_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level(logging.WARNING, logger="mtcls.precision"):
        got = P.resolve_precision("bf16", CPU)
    assert got.autocast_dtype is torch.bfloat16 and "emulated" in got.reason
    assert any("slower than fp32" in r.message for r in caplog.records)
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtcls.precision"):
        assert P.resolve_precision("bf16", CPU).reason == "set in the config"
    assert not caplog.records


def test_int8_is_a_cpu_path_and_auto_never_picks_it(monkeypatch):
    assert P.resolve_precision("int8", CPU).quantized
    assert P.resolve_precision("int8", CPU).autocast_dtype is None
    with pytest.raises(ValueError, match="int8.*CPU"):
        P.resolve_precision("int8", torch.device("cuda"))
    for flags in (set(), {"avx512_bf16"}, {"amx_bf16"}):
        monkeypatch.setattr(P, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert not P.resolve_precision("auto", CPU).quantized
    with pytest.raises(ValueError, match="'fp8'"):
        P.resolve_precision("fp8", CPU)


def test_cpu_flags_reads_this_machine():
    flags = P.cpu_flags()
    assert isinstance(flags, frozenset)
    # On Linux x86 every CPU this project runs on reports at least SSE2.
    if flags:
        assert "sse2" in flags or "fp" in flags or "asimd" in flags
