"""The launchers' fallback for devices with less shared memory than the tuned tiles assume."""
from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from kernels import launch


class _Kernel:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, num_stages=..., ...)``, refusing
    (as Triton does before launching) any stage count whose shared memory exceeds ``limit``."""

    def __init__(self, per_stage: int, limit: int, resource: str = "shared memory"):
        self.per_stage, self.limit, self.resource = per_stage, limit, resource
        self.tried, self.ran = [], []

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **constexprs):
            self.tried.append(num_stages)
            if num_stages * self.per_stage > self.limit:
                raise OutOfResources(num_stages * self.per_stage, self.limit, self.resource)
            self.ran.append((grid, args, num_warps, num_stages, constexprs))
        return run


@pytest.fixture(autouse=True)
def _fresh_memo():
    launch._FITTED.clear()
    yield
    launch._FITTED.clear()


def test_fewer_stages_where_shared_memory_is_short():
    k = _Kernel(per_stage=60_000, limit=163 * 1024)  # 3 stages need 180 kB: an A100 has 163 KiB
    launch._launch(k, (7,), (1, 2), torch.device("cpu"), num_warps=8, num_stages=3, BLOCK_M=128, PRED=None)
    assert k.tried == [3, 2] and len(k.ran) == 1
    grid, args, warps, stages, constexprs = k.ran[0]
    assert (grid, args, warps, stages, constexprs) == ((7,), (1, 2), 8, 2, {"BLOCK_M": 128, "PRED": None})
    # remembered: the next launch of the same configuration goes straight to 2 stages
    launch._launch(k, (7,), (1, 2), torch.device("cpu"), num_warps=8, num_stages=3, BLOCK_M=128, PRED=None)
    assert k.tried == [3, 2, 2]
    # another configuration is judged on its own
    launch._launch(k, (7,), (1, 2), torch.device("cpu"), num_warps=8, num_stages=3, BLOCK_M=64, PRED=None)
    assert k.tried == [3, 2, 2, 3, 2]


def test_tuned_stages_kept_where_they_fit():
    k = _Kernel(per_stage=60_000, limit=227 * 1024)
    launch._launch(k, (1,), (), torch.device("cpu"), num_warps=8, num_stages=3, BLOCK_M=128)
    assert k.tried == [3]
    assert launch._FITTED == {}  # nothing to remember where the tuned stages fit


def test_other_resources_and_one_stage_still_fail():
    threads = _Kernel(per_stage=1, limit=0, resource="threads")
    with pytest.raises(OutOfResources, match="threads"):
        launch._launch(threads, (1,), (), torch.device("cpu"), num_warps=8, num_stages=3)
    assert threads.tried == [3]
    tiny = _Kernel(per_stage=300_000, limit=227 * 1024)  # not even one stage fits: Triton's own error
    with pytest.raises(OutOfResources, match="shared memory"):
        launch._launch(tiny, (1,), (), torch.device("cpu"), num_warps=4, num_stages=3)
    assert tiny.tried == [3, 2, 1]


def test_register_cap_reaches_the_compiler():
    """``TileConfig.maxnreg`` goes to the launch as Triton's ``maxnreg`` option (None: not passed),
    and the fewer-stages memo keeps capped and uncapped launches apart."""
    k = _Kernel(per_stage=60_000, limit=163 * 1024)
    launch._launch(k, (1,), (), torch.device("cpu"), num_warps=4, num_stages=3, maxnreg=128, BLOCK_M=64)
    launch._launch(k, (1,), (), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK_M=64)
    assert [r[4] for r in k.ran] == [{"BLOCK_M": 64, "maxnreg": 128}, {"BLOCK_M": 64}]
    assert list(launch._FITTED.values()) == [2] and "maxnreg" in str(next(iter(launch._FITTED)))


def test_tile_config_spelling():
    from kernels.configs import TileConfig

    assert TileConfig.parse("64x32x4x2") == TileConfig(64, 32, 4, 2)
    assert TileConfig.parse("64X32x4x2x168") == TileConfig(64, 32, 4, 2, maxnreg=168)
    for bad in ("64x32x4", "64x32x4x2x1x1", "64x32x0x2", "64xx4x2", "a"):
        with pytest.raises(ValueError, match="BLOCK_MxBLOCK_N"):
            TileConfig.parse(bad)


def test_one_launch_register_cap():
    """The one-launch backward takes a cap only where its dQ and dK/dV tiles name the same one."""
    from kernels.configs import TileConfig, fused_maxnreg

    capped, other, free = (TileConfig(64, 32, 4, 2, maxnreg=r) for r in (128, 168, None))
    assert fused_maxnreg(capped, capped) == 128
    assert fused_maxnreg(capped, other) is None and fused_maxnreg(free, capped) is None
    assert fused_maxnreg(free, free) is None


def test_tuned_register_caps_leave_room():
    """A tuned ``maxnreg`` lets at least two programs of its warps share a multiprocessor's 64 Ki
    registers and is one ptxas accepts (a multiple of 8, at least 24)."""
    from kernels import configs

    capped = [cfg for _, _, _, _, cfg in configs.CONFIGS if cfg.maxnreg is not None]
    assert capped, "the table caps registers somewhere (session 9)"
    for cfg in capped:
        assert 24 <= cfg.maxnreg <= 255 and cfg.maxnreg % 8 == 0, cfg
        assert 65536 // (cfg.maxnreg * 32 * cfg.num_warps) >= 2, cfg


def test_ragged_edge_stage_count():
    from kernels.configs import TileConfig, tile_config

    cfg = TileConfig(128, 64, 8, 3, ragged_stages=2)
    assert (cfg.stages(True), cfg.stages(False)) == (3, 2)
    assert TileConfig(64, 64, 4, 3).stages(False) == 3  # no ragged_stages: the same on both edges
    # the tuned D = 128 dense dK/dV tile carries a smaller stage count for the ragged edge (3 stages
    # of it do not fit there: python -m kernels.build_check builds both edges with these counts)
    tuned = tile_config("dkdv", 2, 128, "dense")
    assert tuned.stages(False) < tuned.stages(True)


def test_one_launch_backward_table():
    """Every FUSED_BWD entry names tiles that can share one launch (same warps), for masks of
    its kind; the plans of Full and of a sparse composition take their kinds' choice."""
    import maskdsl as md
    from kernels import configs

    for sizes, dims, kind, stages in configs.FUSED_BWD:
        assert stages >= 1
        for es in sizes:
            for d in dims:
                dq, kv = configs.tile_config("dq", es, d, kind), configs.tile_config("dkdv", es, d, kind)
                assert dq.num_warps == kv.num_warps, (es, d, kind, dq, kv)
                assert configs.fused_stages(es, d, kind) == stages
    assert configs.fused_stages(2, 128, "dense") == 2
    assert configs.fused_stages(2, 128, "sparse") is None
    assert configs.fused_stages(4, 128, "dense") is None  # float32: two launches
    full = md.prepare(md.Full(), 1024, 1024, device="cpu")
    sparse = md.prepare(md.Document([300, 400, 324]) & md.Causal(), 1024, 1024, device="cpu")
    assert (full.kind, sparse.kind) == ("dense", "sparse")
    assert full.fused_stages(2, 128) == 2 and sparse.fused_stages(2, 128) is None
