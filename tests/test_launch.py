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
    assert configs.fused_stages(2, 64, "dense") == 2
    assert configs.fused_stages(2, 128, "dense") is None  # two launches at D = 128 since session 29
    assert configs.fused_stages(2, 64, "sparse") is None and configs.fused_stages(2, 128, "sparse") is None
    assert configs.fused_stages(4, 64, "dense") is None  # float32: two launches
    full = md.prepare(md.Full(), 1024, 1024, device="cpu")
    sparse = md.prepare(md.Document([300, 400, 324]) & md.Causal(), 1024, 1024, device="cpu")
    assert (full.kind, sparse.kind) == ("dense", "sparse")
    assert full.fused_stages(2, 64) == 2 and sparse.fused_stages(2, 64) is None
    assert full.fused_stages(2, 128) is None


class _Compiled:
    """Stands in for Triton's compiled kernel: ``compiled[(x, y, z)](*every_parameter)``, and, with
    ``launcher``, its launcher ``run(x, y, z, stream, function, packed_metadata, launch_metadata,
    enter_hook, exit_hook, *every_parameter)``."""

    def __init__(self, owner, fail=False, launcher=False):
        self.owner, self.fail = owner, fail
        if launcher:
            self.function, self.packed_metadata = "fn", "meta"

    def _init_handles(self):
        pass

    def __getitem__(self, grid):
        def run(*values):
            if self.fail:
                raise TypeError("launch() takes other arguments")
            self.owner.direct.append((grid, values))
        return run

    def run(self, x, y, z, stream, function, packed, launch_metadata, enter, exit_hook, *values):
        assert (function, packed, launch_metadata, enter, exit_hook) == ("fn", "meta", None, None, None)
        self.owner.launched.append(((x, y, z), stream, values))


class _Param:
    def __init__(self, name, default):
        self.name, self.default = name, default


class _JitKernel:
    """Stands in for a @triton.jit kernel ``k(X, n, s, BLOCK: constexpr, FLAG: constexpr = 7)`` on a
    GPU: its launch returns the compiled kernel, which later launches may call directly."""

    def __init__(self, fail=False, launcher=False, positional=("X", "n", "s")):
        import inspect

        self.params = [*(_Param(name, inspect.Parameter.empty) for name in positional),
                       _Param("BLOCK", inspect.Parameter.empty), _Param("FLAG", 7)]
        self.slow, self.direct, self.launched, self.fail, self.launcher = [], [], [], fail, launcher

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **constexprs):
            self.slow.append((grid, args, constexprs))
            return _Compiled(self, self.fail, self.launcher)
        return run


@pytest.fixture
def _fast_path():
    launch._SITES.clear()
    launch.FAST_LAUNCH = True
    yield
    launch._SITES.clear()
    launch.FAST_LAUNCH = True


def _go(k, grid, args, **kw):
    kw = {"num_warps": 4, "num_stages": 2, "BLOCK": 64, **kw}
    launch._launch(k, grid, args, torch.device("cpu"), **kw)


def test_fast_launch_reuses_the_compiled_kernel(_fast_path):
    """A launch of a configuration with the arguments of an earlier one calls the kernel compiled then
    directly, with every parameter in order (constexprs, then defaults), the grid made 3-D."""
    k = _JitKernel()
    x = torch.zeros(64)
    _go(k, (5,), (x, 48, 2.0))
    _go(k, (5,), (torch.ones(64), 48, 2.0))  # another tensor of the same dtype and alignment
    assert len(k.slow) == 1 and k.direct == [((5, 1, 1), (k.direct[0][1][0], 48, 2.0, 64, 7))]
    assert k.direct[0][1][0] is not x
    # anything Triton could specialise on differently takes its own path (and is remembered apart): every
    # integer value (1; not a multiple of 16; past int32; past int64), a float, a tensor's alignment and
    # dtype, the warps, a constexpr, the register cap
    for args in ((x, 1, 2.0), (x, 40, 2.0), (x, 2**31, 2.0), (x, 2**64, 2.0), (x, 48, 3.0), (x, 64, 2.0),
                 (x[1:], 48, 2.0), (x.half(), 48, 2.0)):
        _go(k, (5,), args)
    _go(k, (5,), (x, 48, 2.0), num_warps=8)
    _go(k, (5,), (x, 48, 2.0), BLOCK=32)
    _go(k, (5,), (x, 48, 2.0), maxnreg=128)
    assert len(k.slow) == 12 and len(k.direct) == 1
    y = x[1:]
    _go(k, (2, 3), (y, 48, 2.0))  # remembered too: a 4-byte aligned tensor
    assert len(k.slow) == 12 and len(k.direct) == 2
    grid, values = k.direct[-1]
    assert grid == (2, 3, 1) and values[0] is y and values[1:] == (48, 2.0, 64, 7)
    # an argument of an unknown kind, or a tensor where the first launch had a number: never cached
    # nor an argument of another type than at the configuration's first launch (a float for an integer)
    for args in ((x, object(), 2.0), (x, object(), 2.0), (x, x, 2.0), (x, x, 2.0), (48, x, 2.0), (48, x, 2.0),
                 (x, 48.5, 2.0), (x, 48.5, 2.0)):
        _go(k, (5,), args)
    assert len(k.slow) == 20 and len(k.direct) == 2


def test_fast_launch_calls_the_launcher_where_hooks_are_idle(_fast_path, monkeypatch):
    """With Triton's launch hooks unset, a cached launch calls the compiled kernel's launcher with the
    stream of the current device; with a hook set (a profiler), ``compiled[grid]``, which runs it."""
    if launch._knobs is None:
        pytest.skip("a Triton without launch hooks (before 3.4): the launcher is never called directly")
    monkeypatch.setattr(launch, "_stream_source", lambda: (lambda: 3, lambda dev: 1000 + dev))
    k = _JitKernel(launcher=True)
    x = torch.zeros(64)
    for _ in range(2):
        _go(k, (5, 2), (x, 48, 2.0))
    assert len(k.slow) == 1 and k.direct == [] and k.launched == [((5, 2, 1), 1003, (x, 48, 2.0, 64, 7))]

    def hook(metadata):
        pass

    launch._knobs.runtime.launch_enter_hook.add(hook)
    try:
        _go(k, (5, 2), (x, 48, 2.0))
    finally:
        launch._knobs.runtime.launch_enter_hook.remove(hook)
    assert len(k.launched) == 1 and k.direct == [((5, 2, 1), (x, 48, 2.0, 64, 7))]


def test_fast_launch_table_is_bounded(_fast_path, monkeypatch):
    monkeypatch.setattr(launch, "_MAX_COMPILED", 2)
    k = _JitKernel()
    for n in (16, 32, 64):
        _go(k, (1,), (torch.zeros(4), n, 1.0))
    assert launch._fast_entries() == 1  # cleared when full, then the newest entered
    _go(k, (1,), (torch.zeros(4), 16, 1.0), BLOCK=16)  # counted across configurations
    assert launch._fast_entries() == 2 and len(launch._SITES) == 2
    _go(k, (1,), (torch.zeros(4), 16, 1.0), BLOCK=32)
    assert launch._fast_entries() == 1


def test_fast_launch_off_and_its_fallbacks(_fast_path):
    k = _JitKernel()
    launch.FAST_LAUNCH = False
    for _ in range(2):
        _go(k, (1,), (torch.zeros(4), 16, 1.0))
    assert len(k.slow) == 2 and k.direct == [] and launch._SITES == {}
    # a compiled kernel that refuses the direct call's arguments (another Triton): Triton's path, then off
    launch.FAST_LAUNCH = True
    bad = _JitKernel(fail=True)
    for _ in range(3):
        _go(bad, (1,), (torch.zeros(4), 16, 1.0))
    assert len(bad.slow) == 3 and launch.FAST_LAUNCH is False and launch._SITES == {}
    # a parameter with neither a value nor a default: nothing cached
    launch.FAST_LAUNCH = True
    for _ in range(2):
        launch._launch(k, (1,), (torch.zeros(4), 16, 1.0), torch.device("cpu"), num_warps=4, num_stages=2)
    assert len(k.slow) == 4 and launch._fast_entries() == 0


@pytest.mark.parametrize("variable, switch", [("MASKDSL_FAST_LAUNCH", "FAST_LAUNCH"), ("MASKDSL_REPLAY", "REPLAY")])
def test_fast_launch_off_from_the_environment(variable, switch):
    import subprocess
    import sys

    code = f"from kernels import launch; print(launch.{switch})"
    for value, expected in (("0", "False"), ("1", "True"), (None, "True")):
        env = {k: v for k, v in __import__("os").environ.items() if k != variable}
        if value is not None:
            env[variable] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


# ---------------------------------------------------------------------------
# replayed passes (launch.replay)
# ---------------------------------------------------------------------------

@pytest.fixture
def _replay(_fast_path, monkeypatch):
    monkeypatch.setattr(launch, "REPLAY", True)
    monkeypatch.setattr(launch, "POISON", False)
    monkeypatch.setattr(launch.configs, "OVERRIDE", {})


def _pass(k, const, extra=None):
    """A pass like the launchers': two outputs, two launches (of ``k`` and of a second kernel
    ``k.other``) reading the inputs and a constant."""
    if not hasattr(k, "other"):
        k.other = _JitKernel(positional=("A", "B", "C", "n", "s"))

    def compute(x, y):
        o1, o2 = launch.new_output(x.shape, x), launch.new_output((3,), x, torch.float32)
        _go(k, (2,), (x, y if extra is None else extra(y), o1, const, x.shape[0], 0.5))
        _go(k.other, (4, 2), (o1, o2, const, 16, 1.5), BLOCK=32)
        return o1, o2
    return compute


def test_replay_records_once_then_launches_with_new_tensors(_replay):
    import gc
    import weakref

    k, const, recipes = _JitKernel(positional=("X", "Y", "O", "C", "n", "s")), torch.zeros(8, dtype=torch.int32), {}
    compute = _pass(k, const)
    x, y = torch.zeros(64), torch.ones(64)
    first = launch.replay(recipes, "t", (x, y), lambda: {id(const)}, lambda: compute(x, y))
    assert len(k.slow) == len(k.other.slow) == 1 and k.direct == [] and list(recipes.values()) != [None]
    recorded = [weakref.ref(t) for t in (x, y, *first)]
    k.slow.clear(), k.other.slow.clear()  # the stand-ins' own record of the launches
    del x, y, first
    gc.collect()
    assert all(r() is None for r in recorded)  # the recipe keeps no tensor of the recorded call
    x2, y2 = torch.zeros(64), torch.ones(64)
    o1, o2 = launch.replay(recipes, "t", (x2, y2), lambda: set(), lambda: pytest.fail("recomputed"))
    assert k.slow == k.other.slow == []  # both launches straight to the compiled kernels
    (g1, a1), (g2, a2) = k.direct + k.other.direct
    assert g1 == (2, 1, 1) and a1[0] is x2 and a1[1] is y2 and a1[2] is o1 and a1[3] is const and a1[4:] == (64, 0.5, 64, 7)
    assert g2 == (4, 2, 1) and a2[0] is o1 and a2[1] is o2 and a2[2] is const and a2[3:] == (16, 1.5, 32, 7)
    assert o1.shape == (64,) and o1.dtype == x2.dtype and o2.shape == (3,) and o2.dtype == torch.float32
    # other strides (or shapes, dtypes, tag): a recipe of their own
    xs, ys = x2[::2], y2[::2]
    launch.replay(recipes, "t", (xs, ys), lambda: {id(const)}, lambda: compute(xs, ys))
    launch.replay(recipes, "u", (x2, y2), lambda: {id(const)}, lambda: compute(x2, y2))
    assert len(recipes) == 3 and all(recipes.values())


def test_replay_refuses_what_it_cannot_replay(_replay, monkeypatch):
    k, const = _JitKernel(positional=("X", "Y", "O", "C", "n", "s")), torch.zeros(8, dtype=torch.int32)
    x, y = torch.zeros(64), torch.ones(64)
    # a tensor derived from an input (not an input, an output or a constant), a launch that cannot be
    # called directly: recorded as not replayable, computed every time
    for inputs, extra, consts in (((x, y), lambda t: t + 1, {id(const)}), ((x, y), None, set())):
        recipes, calls = {}, []
        compute = _pass(k, const, extra)
        for _ in range(2):
            launch.replay(recipes, "t", inputs, lambda: consts, lambda: calls.append(compute(*inputs)) or calls[-1])
        assert list(recipes.values()) == [None] and len(calls) == 2
    # unaligned inputs, configs.OVERRIDE, REPLAY off, FAST_LAUNCH off: never recorded
    for name in ("unaligned", "override", "replay off", "fast path off"):
        with monkeypatch.context() as m:
            inputs = (x[1:], y[1:]) if name == "unaligned" else (x, y)
            if name == "override":
                m.setitem(launch.configs.OVERRIDE, "fwd", None)
            m.setattr(launch, "REPLAY", name != "replay off")
            m.setattr(launch, "FAST_LAUNCH", name != "fast path off")
            recipes, calls = {}, []
            for _ in range(2):
                launch.replay(recipes, "t", inputs, lambda: {id(const)},
                              lambda: calls.append(_pass(k, const)(*inputs)) or calls[-1])
            assert recipes == {} and len(calls) == 2, name


def test_replay_keeps_one_tensor_given_twice_apart(_replay):
    """A pass recorded with one tensor as two inputs (k is v) replays only for calls that do the same."""
    k, const, recipes = _JitKernel(positional=("X", "Y", "O", "C", "n", "s")), torch.zeros(8, dtype=torch.int32), {}
    compute = _pass(k, const)
    x = torch.zeros(64)
    launch.replay(recipes, "t", (x, x), lambda: {id(const)}, lambda: compute(x, x))
    a, b = torch.zeros(64), torch.ones(64)
    launch.replay(recipes, "t", (a, b), lambda: {id(const)}, lambda: compute(a, b))  # recorded apart
    assert len(recipes) == 2 and all(recipes.values())
    for first, second in ((a, b), (b, b)):
        launch.replay(recipes, "t", (first, second), lambda: set(), lambda: pytest.fail("recomputed"))
        assert k.direct[-1][1][0] is first and k.direct[-1][1][1] is second


def test_replay_recording_is_per_thread(_replay):
    import threading

    seen = []
    launch._REC.recording = "busy"
    try:
        t = threading.Thread(target=lambda: seen.append(launch._REC.recording))
        t.start()
        t.join()
    finally:
        launch._REC.recording = None
    assert seen == [None]


# ---------------------------------------------------------------------------
# tensor descriptors (TMA loads: TileConfig.tma) in the fast path and in replayed passes
# ---------------------------------------------------------------------------

def _desc(t, rows=32):
    return launch.TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


@pytest.mark.skipif(launch.TensorDescriptor is None, reason="this Triton has no host tensor descriptors")
def test_fast_launch_keys_tensor_descriptors(_fast_path):
    """A descriptor argument keys the compiled kernel by its dtype and block shape (what Triton compiles
    for), and a cached launch passes the new descriptor, never the first launch's."""
    k = _JitKernel(positional=("X", "D", "n"))
    x, y = torch.zeros(2, 2, 64, 64), torch.ones(2, 2, 64, 64)
    _go(k, (5,), (x, _desc(x), 48))
    d = _desc(y)
    _go(k, (5,), (y, d, 48))
    assert len(k.slow) == 1 and k.direct[-1][1][1] is d and k.direct[-1][1][0] is y
    for other in (_desc(x, 16), _desc(x.half())):  # another block shape, another dtype: compiled apart
        _go(k, (5,), (x, other, 48))
    _go(k, (5,), (x, None, 48))  # none where the first launch had one: its own key
    assert len(k.slow) == 4 and len(k.direct) == 1
    # a descriptor where a configuration's first launch had a number (unhashable in the key): Triton's path
    other = _JitKernel(positional=("X", "D", "n"))
    _go(other, (5,), (x, None, 48))
    for _ in range(2):
        _go(other, (5,), (x, _desc(x), 48))
    assert len(other.slow) == 3 and other.direct == []


@pytest.mark.skipif(launch.TensorDescriptor is None, reason="this Triton has no host tensor descriptors")
def test_replay_rebuilds_tensor_descriptors(_replay, monkeypatch):
    """A launch given a descriptor of an input is replayed with a descriptor of the new input (its
    shape, strides and the recorded block rows, every field but the base copied from the recorded
    descriptor, not rebuilt by ``tile_descriptor``); a descriptor of anything else makes the pass not
    replayable."""
    # (on the CPU launch.tile_descriptor describes nothing: a stand-in that describes any tensor)
    monkeypatch.setattr(launch, "tile_descriptor", lambda t, rows: _desc(t, rows))
    k = _JitKernel(positional=("X", "D", "O", "n"))

    def compute(x, described):
        o = launch.new_output(x.shape, x)
        _go(k, (2,), (x, _desc(described(x), 16), o, 7))
        return (o,)
    recipes = {}
    x = torch.zeros(2, 2, 64, 64).transpose(1, 2)  # strides of a view, not of a contiguous tensor
    launch.replay(recipes, "t", (x,), lambda: set(), lambda: compute(x, lambda t: t))
    x2 = torch.ones(2, 2, 64, 64).transpose(1, 2)
    monkeypatch.setattr(launch, "tile_descriptor", lambda t, rows: pytest.fail("the replay built a descriptor anew"))
    (o,) = launch.replay(recipes, "t", (x2,), lambda: set(), lambda: pytest.fail("recomputed"))
    (_, args), = k.direct
    assert args[0] is x2 and args[2] is o and args[1].base is x2 and args[1].block_shape == [1, 1, 16, 64]
    assert args[1].shape == list(x2.shape) and args[1].strides == list(x2.stride())
    fresh = _desc(x2, 16)
    assert type(args[1]) is type(fresh) and vars(args[1]).keys() == vars(fresh).keys()
    assert all(getattr(args[1], f) == getattr(fresh, f) for f in vars(fresh) if f != "base")
    # a descriptor whose fields cannot be copied (a Triton whose descriptors keep no __dict__): the
    # replay builds it anew with tile_descriptor, of the new input and the recorded block rows
    monkeypatch.setattr(launch, "tile_descriptor", lambda t, rows: _desc(t, rows))
    monkeypatch.setattr(launch, "_desc_fields", lambda d: None)
    recipes = {}
    launch.replay(recipes, "t", (x,), lambda: set(), lambda: compute(x, lambda t: t))
    built = []
    monkeypatch.setattr(launch, "tile_descriptor", lambda t, rows: built.append((t, rows)) or _desc(t, rows))
    (o,) = launch.replay(recipes, "t", (x2,), lambda: set(), lambda: pytest.fail("recomputed"))
    args = k.direct[-1][1]
    assert len(built) == 1 and built[0][0] is x2 and built[0][1] == 16
    assert args[1].base is x2 and args[1].block_shape == [1, 1, 16, 64] and args[2] is o
    recipes, calls = {}, []
    for _ in range(2):  # a descriptor of a tensor derived from the input: computed every time
        launch.replay(recipes, "t", (x,), lambda: set(), lambda: calls.append(compute(x, lambda t: t + 1)) or calls[-1])
    assert list(recipes.values()) == [None] and len(calls) == 2


def test_tile_descriptor_none_on_the_cpu():
    assert launch.tile_descriptor(torch.zeros(1, 2, 64, 64), 32) is None


@pytest.mark.gpu
def test_tile_descriptor_only_where_tma_can_load():
    """On a Hopper GPU: no descriptor for a strided last dim, unaligned rows or base, a stride of 0."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper (or later) GPU")
    t = torch.zeros(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert launch.tile_descriptor(t, 32) is not None
    assert launch.tile_descriptor(t.transpose(2, 3), 32) is None  # a strided last dim
    assert launch.tile_descriptor(t[..., :60], 32) is None  # rows of 120 bytes: not a multiple of 16
    assert launch.tile_descriptor(t[:, :, :, 4:], 32) is None  # a base 8 bytes past 16-byte alignment
    assert launch.tile_descriptor(t.expand(2, 4, 64, 64)[:, :1].expand(2, 4, 64, 64), 32) is None  # stride 0
    one = torch.zeros(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16).as_strided((1, 4, 64, 64), (1, 4096, 64, 1))
    assert launch.tile_descriptor(one, 32) is not None  # a size-1 dim's stride is never used


def test_tma_passes_name_each_kernels_descriptors():
    # launch.TMA_PASSES (which kernels/build_check.py compiles from too) names, per pass, descriptor
    # parameters its kernel has, in the kernel's order, and a tile dim of the pass's TileConfig
    from kernels import attention
    from kernels.configs import TileConfig

    kernels = {"fwd": attention.attn_fwd_kernel, "dq": attention.attn_bwd_dq_kernel,
               "dkdv": attention.attn_bwd_dkdv_kernel}
    assert set(launch.TMA_PASSES) == set(kernels)
    for name, (_key, dim, params) in launch.TMA_PASSES.items():
        args = kernels[name].arg_names
        assert all(p in args for p in params), (name, params)
        assert [args.index(p) for p in params] == sorted(args.index(p) for p in params), (name, params)
        assert launch.tma_rows(TileConfig(64, 32, 4, 2), name) == {"BLOCK_M": 64, "BLOCK_N": 32}[dim]
