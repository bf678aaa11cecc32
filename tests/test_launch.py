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


class _Compiled:
    """Stands in for Triton's compiled kernel: ``compiled[(x, y, z)](*every_parameter)``."""

    def __init__(self, owner, fail=False):
        self.owner, self.fail = owner, fail

    def __getitem__(self, grid):
        def run(*values):
            if self.fail:
                raise TypeError("launch() takes other arguments")
            self.owner.direct.append((grid, values))
        return run


class _Param:
    def __init__(self, name, default):
        self.name, self.default = name, default


class _JitKernel:
    """Stands in for a @triton.jit kernel ``k(X, n, s, BLOCK: constexpr, FLAG: constexpr = 7)`` on a
    GPU: its launch returns the compiled kernel, which later launches may call directly."""

    def __init__(self, fail=False):
        import inspect

        self.params = [_Param("X", inspect.Parameter.empty), _Param("n", inspect.Parameter.empty),
                       _Param("s", inspect.Parameter.empty), _Param("BLOCK", inspect.Parameter.empty), _Param("FLAG", 7)]
        self.slow, self.direct, self.fail = [], [], fail

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **constexprs):
            self.slow.append((grid, args, constexprs))
            return _Compiled(self, self.fail)
        return run


@pytest.fixture
def _fast_path():
    launch._COMPILED.clear()
    launch.FAST_LAUNCH = True
    yield
    launch._COMPILED.clear()
    launch.FAST_LAUNCH = True


def test_fast_launch_reuses_the_compiled_kernel(_fast_path):
    """The second launch of a configuration with arguments Triton specialises alike calls the compiled
    kernel directly, with every parameter in order (constexprs, then defaults), the grid made 3-D."""
    k = _JitKernel()
    x = torch.zeros(64)
    for n in (48, 4096):  # both multiples of 16, neither 1: specialised alike
        launch._launch(k, (5,), (x, n, 2.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=64)
    assert len(k.slow) == 1 and k.direct == [((5, 1, 1), (x, 4096, 2.0, 64, 7))]
    # what Triton specialises on differently takes its own path (and is remembered apart)
    for n in (1, 40, 2**31, 2**64):  # equal to 1; not a multiple of 16; past int32; past int64
        launch._launch(k, (5,), (x, n, 2.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=64)
    launch._launch(k, (5,), (x[1:], 48, 2.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=64)  # 4-byte aligned
    launch._launch(k, (5,), (x.half(), 48, 2.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=64)  # dtype
    launch._launch(k, (5,), (x, 48, 2.0), torch.device("cpu"), num_warps=8, num_stages=2, BLOCK=64)  # warps
    launch._launch(k, (5,), (x, 48, 2.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=32)  # constexpr
    launch._launch(k, (5,), (x, 48, 2.0), torch.device("cpu"), num_warps=4, num_stages=2, maxnreg=128, BLOCK=64)
    assert len(k.slow) == 10 and len(k.direct) == 1
    y = x[1:]
    launch._launch(k, (2, 3), (y, 32, 1.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=64)
    assert len(k.slow) == 10 and len(k.direct) == 2
    grid, values = k.direct[-1]
    assert grid == (2, 3, 1) and values[0] is y and values[1:] == (32, 1.0, 64, 7)
    assert launch._arg_key((object(),)) is None  # an unknown kind of argument: never cached


def test_fast_launch_table_is_bounded(_fast_path, monkeypatch):
    monkeypatch.setattr(launch, "_MAX_COMPILED", 2)
    k = _JitKernel()
    for block in (16, 32, 64):
        launch._launch(k, (1,), (torch.zeros(4), 16, 1.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=block)
    assert len(launch._COMPILED) == 1  # cleared when full, then the newest entered


def test_fast_launch_off_and_its_fallbacks(_fast_path):
    k = _JitKernel()
    launch.FAST_LAUNCH = False
    for _ in range(2):
        launch._launch(k, (1,), (torch.zeros(4), 16, 1.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=64)
    assert len(k.slow) == 2 and k.direct == [] and launch._COMPILED == {}
    # a compiled kernel that refuses the direct call's arguments (another Triton): Triton's path, then off
    launch.FAST_LAUNCH = True
    bad = _JitKernel(fail=True)
    for _ in range(3):
        launch._launch(bad, (1,), (torch.zeros(4), 16, 1.0), torch.device("cpu"), num_warps=4, num_stages=2, BLOCK=64)
    assert len(bad.slow) == 3 and launch.FAST_LAUNCH is False and launch._COMPILED == {}
    # a parameter with neither a value nor a default: nothing cached
    launch.FAST_LAUNCH = True
    for _ in range(2):
        launch._launch(k, (1,), (torch.zeros(4), 16, 1.0), torch.device("cpu"), num_warps=4, num_stages=2)
    assert len(k.slow) == 4 and launch._COMPILED == {}


def test_fast_launch_off_from_the_environment():
    import subprocess
    import sys

    code = "from kernels import launch; print(launch.FAST_LAUNCH)"
    for value, expected in (("0", "False"), ("1", "True"), (None, "True")):
        env = {k: v for k, v in __import__("os").environ.items() if k != "MASKDSL_FAST_LAUNCH"}
        if value is not None:
            env["MASKDSL_FAST_LAUNCH"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
