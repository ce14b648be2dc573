"""Adapter weight files: both layouts, strict loading and layout detection, the finiteness check, atomic writes, the
weight file of a checkpoint folder, and the full-size key/shape contract (docs/ARCHITECTURE.md §5)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from train.models.adapter import StyleAdapter
from train.models.checkpoint_io import (
    AdapterFileError, adapter_state, atomic_write, atomic_write_text, check_finite, load_adapter_file, read_adapter_file,
    resolve_adapter_file, save_adapter_file, to_official,
)
from train.models.tiny import build_flux_transformer


def _perturbed(adapter):
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    return adapter


def _assert_same(a, b):
    sa, sb = adapter_state(a), adapter_state(b)
    for part in sa:
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k}"


@pytest.fixture()
def adapters():
    torch.manual_seed(0)
    transformer = build_flux_transformer("tiny")
    make = lambda: StyleAdapter.for_transformer(transformer, style_dim=32, num_tokens=8)  # noqa: E731
    return _perturbed(make()), make()


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_round_trip_is_bit_exact(tmp_path, adapters, layout):
    src, dst = adapters
    path = tmp_path / "w.bin"
    save_adapter_file(src, path, layout=layout)
    raw = torch.load(path, weights_only=True)
    expected = {"ours": {"image_proj", "ip_adapter"},
                "official": {"image_proj_mlp", "image_proj_qformer", "attn_adapter"}}[layout]
    assert set(raw) == expected
    load_adapter_file(dst, path)
    _assert_same(src, dst)


def test_official_export_of_our_file_is_identical_weights(tmp_path, adapters):
    src, _ = adapters
    save_adapter_file(src, tmp_path / "ours.bin")
    save_adapter_file(read_adapter_file(tmp_path / "ours.bin"), tmp_path / "official.bin", layout="official")
    a, b = read_adapter_file(tmp_path / "ours.bin"), read_adapter_file(tmp_path / "official.bin")
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def _write(path, obj):
    torch.save(obj, path)
    return path


def test_missing_key_is_named(tmp_path, adapters):
    src, dst = adapters
    state = adapter_state(src)
    del state["ip_adapter"]["1.to_v_ip.weight"]
    with pytest.raises(AdapterFileError, match=r"missing keys in 'ip_adapter': \['1.to_v_ip.weight'\]"):
        load_adapter_file(dst, _write(tmp_path / "w.bin", state))


def test_unexpected_key_is_named(tmp_path, adapters):
    src, dst = adapters
    state = adapter_state(src)
    state["image_proj"]["mlp.extra"] = torch.zeros(1)
    with pytest.raises(AdapterFileError, match=r"unexpected keys in 'image_proj': \['mlp.extra'\]"):
        load_adapter_file(dst, _write(tmp_path / "w.bin", state))


def test_shape_mismatch_is_named_and_all_problems_reported_together(tmp_path, adapters):
    src, dst = adapters
    official = to_official(adapter_state(src))
    official["attn_adapter"]["0.to_k_ip.weight"] = torch.zeros(5, 5)
    del official["image_proj_qformer"]["query_embeds"]
    with pytest.raises(AdapterFileError) as err:
        load_adapter_file(dst, _write(tmp_path / "w.bin", official))
    msg = str(err.value)
    assert "shape mismatch for 'ip_adapter.0.to_k_ip.weight': file (5, 5), model (32, 32)" in msg
    assert "missing keys in 'image_proj': ['qformer.query_embeds']" in msg


def test_unknown_layout_names_the_keys(tmp_path, adapters):
    _, dst = adapters
    with pytest.raises(AdapterFileError, match=r"unknown layout with top-level keys \['state_dict'\]"):
        load_adapter_file(dst, _write(tmp_path / "w.bin", {"state_dict": {}}))


def test_corrupt_and_missing_files(tmp_path, adapters):
    _, dst = adapters
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterFileError, match="cannot be read as a torch checkpoint"):
        load_adapter_file(dst, bad)
    with pytest.raises(AdapterFileError, match="adapter file not found"):
        load_adapter_file(dst, tmp_path / "nope.bin")


def test_failed_load_leaves_weights_untouched(tmp_path, adapters):
    src, dst = adapters
    before = adapter_state(dst)
    state = adapter_state(src)
    state["ip_adapter"]["0.to_k_ip.weight"] = torch.zeros(1, 1)
    with pytest.raises(AdapterFileError):
        load_adapter_file(dst, _write(tmp_path / "w.bin", state))
    after = adapter_state(dst)
    assert all(torch.equal(before[p][k], after[p][k]) for p in before for k in before[p])


def test_full_size_export_matches_the_released_checkpoint_layout():
    """FLUX.1-Fill-dev (19 double + 38 single blocks, 3072 hidden, 4096 T5) + SigLIP-so400m (1152), on meta."""
    from train.models.tiny import build_siglip

    with torch.device("meta"):
        transformer = build_flux_transformer("full", device="meta")
        siglip = build_siglip("full", device="meta")
        adapter = StyleAdapter.for_transformer(transformer, style_dim=siglip.config.hidden_size, num_tokens=128)
    assert siglip.config.hidden_size == 1152 and transformer.config.joint_attention_dim == 4096
    # Meta tensors carry shapes only, so take the state dicts as they are (no CPU copy).
    official = to_official({"image_proj": adapter.image_proj.state_dict(), "ip_adapter": adapter.ip_adapter.state_dict()})
    E, D, N, H = 1152, 4096, 128, 3072
    mlp = {"proj.0.weight": (2 * E, E), "proj.0.bias": (2 * E,), "proj.2.weight": (D * N, 2 * E),
           "proj.2.bias": (D * N,), "norm.weight": (D,), "norm.bias": (D,)}
    qformer = {"query_embeds": (N, D), "id_proj.0.weight": (2 * E, E), "id_proj.0.bias": (2 * E,),
               "id_proj.2.weight": (D * 32, 2 * E), "id_proj.2.bias": (D * 32,),
               "cross_attn.in_proj_weight": (3 * D, D), "cross_attn.in_proj_bias": (3 * D,),
               "cross_attn.out_proj.weight": (D, D), "cross_attn.out_proj.bias": (D,),
               "cross_attn_norm.weight": (D,), "cross_attn_norm.bias": (D,), "norm.weight": (D,), "norm.bias": (D,)}
    attn = {f"{i}.to_{kv}_ip.weight": (H, D) for i in range(57) for kv in "kv"}
    got = {part: {k: tuple(v.shape) for k, v in sd.items()} for part, sd in official.items()}
    assert got == {"image_proj_mlp": mlp, "image_proj_qformer": qformer, "attn_adapter": attn}
    n_mlp = sum(torch.Size(s).numel() for s in mlp.values())
    n_qf = sum(torch.Size(s).numel() for s in qformer.values())
    n_kv = sum(torch.Size(s).numel() for s in attn.values())
    # docs/ARCHITECTURE.md §13: MLP 1.21 B, Q-Former 0.37 B, 57 x K/V 1.43 B, about 3.02 B in all.
    assert (round(n_mlp / 1e9, 2), round(n_qf / 1e9, 2), round(n_kv / 1e9, 2)) == (1.21, 0.37, 1.43)
    assert round((n_mlp + n_qf + n_kv) / 1e9, 2) == 3.02


def test_a_transposed_weight_is_a_shape_mismatch(tmp_path, adapters):
    src, dst = adapters
    state = adapter_state(src)
    state["image_proj"]["mlp.proj.0.weight"] = state["image_proj"]["mlp.proj.0.weight"].t().contiguous()
    with pytest.raises(AdapterFileError, match=r"shape mismatch for 'image_proj.mlp.proj.0.weight': file \(32, 64\)"):
        load_adapter_file(dst, _write(tmp_path / "w.bin", state))


@pytest.mark.parametrize("keys", [("image_proj", "ip_adapter", "optimizer"), ("image_proj",),
                                  ("image_proj", "ip_adapter", "attn_adapter"), ("image_proj_mlp", "attn_adapter"),
                                  ("image_proj_mlp", "image_proj_qformer", "attn_adapter", "ip_adapter")])
def test_a_file_with_more_fewer_or_mixed_top_level_keys_is_no_known_layout(tmp_path, adapters, keys):
    src, dst = adapters
    both = {**adapter_state(src), **to_official(adapter_state(src)), "optimizer": {}}
    with pytest.raises(AdapterFileError, match=r"unknown layout with top-level keys"):
        load_adapter_file(dst, _write(tmp_path / "w.bin", {k: both[k] for k in keys}))


@pytest.mark.parametrize("raw, expect", [
    ([torch.zeros(1)], "expected a dict of state dicts, found list"),
    ({"image_proj": [torch.zeros(1)], "ip_adapter": {}}, "'image_proj' is not a state dict of tensors"),
    ({"image_proj": {}, "ip_adapter": {"0.to_k_ip.weight": torch.zeros(1), "step": 3}},
     "'ip_adapter' is not a state dict of tensors"),
])
def test_a_file_that_is_not_dicts_of_tensors_is_named(tmp_path, adapters, raw, expect):
    _, dst = adapters
    with pytest.raises(AdapterFileError, match=expect):
        load_adapter_file(dst, _write(tmp_path / "w.bin", raw))


class Payload:
    """Stands for any pickled object other than tensors: unpickling it could run code."""


def test_only_tensors_are_unpickled_and_a_folder_is_no_file(tmp_path, adapters):
    _, dst = adapters
    with pytest.raises(AdapterFileError, match="cannot be read as a torch checkpoint"):
        load_adapter_file(dst, _write(tmp_path / "w.bin", {"image_proj": Payload(), "ip_adapter": {}}))
    (tmp_path / "folder.bin").mkdir()
    with pytest.raises(AdapterFileError, match="adapter file not found"):
        load_adapter_file(dst, tmp_path / "folder.bin")


def test_non_finite_weights_are_named_with_their_counts(adapters):
    src, _ = adapters
    state = adapter_state(src)
    check_finite(state)  # finite weights pass
    t = state["ip_adapter"]["1.to_v_ip.weight"]  # in the second part, one entry among finite ones
    t[0, 0], t[1, :2] = float("nan"), float("inf")
    with pytest.raises(AdapterFileError, match=r"tensor 'ip_adapter.1.to_v_ip.weight' holds 1 NaN and 2 inf values"):
        check_finite(state, "w.bin")


def test_the_state_is_a_copy_and_a_wrapped_adapter_saves_and_loads_its_module(tmp_path, adapters):
    src, dst = adapters
    state = adapter_state(src)
    with torch.no_grad():
        for p in src.parameters():
            p.zero_()
    assert all(t.abs().sum() > 0 for part in state.values() for t in part.values())  # untouched by the change

    class Wrapped(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_adapter_file(state, tmp_path / "w.bin")
    load_adapter_file(Wrapped(dst), tmp_path / "w.bin")
    save_adapter_file(Wrapped(dst), tmp_path / "again.bin")
    again = read_adapter_file(tmp_path / "again.bin")
    assert all(torch.equal(again[p][k], state[p][k]) for p in state for k in state[p])


def test_an_unknown_layout_name_writes_nothing(tmp_path, adapters):
    src, _ = adapters
    with pytest.raises(ValueError, match="unknown layout 'offical'"):
        save_adapter_file(src, tmp_path / "w.bin", layout="offical")
    assert not list(tmp_path.iterdir())


def test_atomic_writes_create_the_folder_take_the_umask_and_leave_the_old_file_on_failure(tmp_path):
    old = os.umask(0o027)
    try:
        path = tmp_path / "new" / "file.txt"
        atomic_write_text(path, "old")
        assert path.read_text() == "old" and stat.S_IMODE(path.stat().st_mode) == 0o640

        def half_then_fail(f):
            f.write(b"half")
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            atomic_write(path, half_then_fail)
    finally:
        os.umask(old)
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_a_checkpoint_folder_resolves_to_its_live_or_ema_weights(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "ip-adapter.bin").write_bytes(b"live")
    with pytest.raises(AdapterFileError, match="has no ip-adapter-ema.bin: the run was trained without --use_ema"):
        resolve_adapter_file(folder, ema=True)
    (folder / "ip-adapter-ema.bin").write_bytes(b"ema")
    assert resolve_adapter_file(folder) == folder / "ip-adapter.bin"
    assert resolve_adapter_file(folder, ema=True) == folder / "ip-adapter-ema.bin"
    assert resolve_adapter_file(folder / "ip-adapter-ema.bin", ema=True) == folder / "ip-adapter-ema.bin"
    with pytest.raises(AdapterFileError, match="--ema needs a checkpoint-N folder"):
        resolve_adapter_file(folder / "ip-adapter.bin", ema=True)  # live weights where the EMA was asked for
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="has no ip-adapter.bin; pass a checkpoint-N folder"):
        resolve_adapter_file(tmp_path / "empty")
    with pytest.raises(AdapterFileError, match="adapter path not found"):
        resolve_adapter_file(tmp_path / "nope.bin")
