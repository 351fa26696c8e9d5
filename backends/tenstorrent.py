"""`tenstorrent`: kernels on Tensix cores, in two tiers (docs/tenstorrent.md).

The tile tier (lowering/tt_lang.py) runs kernels that map onto 32x32 tiles as TT-Lang
programs: on `tt-lang-sim` by default ("tenstorrent" or "tenstorrent:sim"), on a device
through ttnn when one is present ("tenstorrent:0"). The scalar tier (lowering/tt_metalium.py)
runs everything else as TT-Metalium C++ on the cores' RISC-V processors; without hardware it
is validated by compiling that same C++ for this host against a shim of the dataflow API —
the `tenstorrent-scalar-host` backend, which is a validation target, not a device.

Device memory is host memory standing in for DRAM (the simulator's tensors are host tensors
too); on hardware, buffers would be ttnn device tensors and copies would cross PCIe.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from concordia_ir.errors import BackendUnavailable, ConcordiaError, KernelRuntimeError
from concordia_ir.types import PtrType
from concordia.lowering import tt_metalium

from .base import Availability, register_backend
from concordia.lowering.target import Options, Target

from .compiled import CompiledKernels
from .hostmem import HostMemoryBackend, typed
from .tt_pages import page_compare, page_copy


class ScalarTierHost:
    """Runs IR kernels as TT-Metalium C++ built for this host (one core, groups in turn)."""

    def __init__(self):
        cxx = tt_metalium.host_compiler()
        self.kernels = CompiledKernels(Target("tt-metalium-host", "host"),
                                       Options(tt_metalium.HOST_OPTIONS, tt_metalium.toolchain_id(cxx)),
                                       "so", render=tt_metalium.render_metalium)
        self.libs: dict[str, ctypes.CDLL] = {}

    def load(self, binary: bytes):
        import hashlib
        import tempfile
        from concordia.lowering.cache import cache_dir
        key = hashlib.sha256(binary).hexdigest()[:24]
        if key not in self.libs:
            d = os.path.join(cache_dir(), "tt-host-libs")
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"{key}.so")
            if not os.path.exists(path):
                fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(binary)
                os.replace(tmp, path)
            lib = ctypes.CDLL(path)
            lib.cc_run.argtypes = [ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32,
                                   ctypes.POINTER(ctypes.c_uint32)]
            lib.cc_run.restype = None
            self.libs[key] = lib
        return self.libs[key]

    def prepare(self, kernel):
        return self.kernels.get(kernel, tt_metalium.compile_host, self.load).handle

    def run(self, kernel, args, global_size, local_size):
        lib = self.prepare(kernel)
        n_groups = int(np.prod([g // l for g, l in zip(global_size, local_size)]))
        words = [*global_size, *local_size, 0, n_groups]
        for p, a in zip(kernel.params, args):
            if isinstance(p.type, PtrType):
                addr = a.ctypes.data
                words += [addr & 0xFFFFFFFF, addr >> 32, a.nbytes]
            else:
                raw = np.asarray(a, dtype=p.type.dtype).reshape(1)
                raw = np.pad(raw.view(np.uint8), (0, (-raw.nbytes) % 4)).view(np.uint32)
                words += [int(w) for w in raw]
        arr = (ctypes.c_uint32 * len(words))(*[w & 0xFFFFFFFF for w in words])
        fault = (ctypes.c_uint32 * 4)()
        lib.cc_run(arr, len(words), fault)
        if fault[0]:
            word = fault[1]
            names, w = {}, tt_metalium.LAUNCH_WORDS
            for p in kernel.params:
                names[w] = p.name
                w += 3 if isinstance(p.type, PtrType) else (2 if p.type.bits == 64 else 1)
            index = np.array([fault[2] | (fault[3] << 32)], np.uint64).view(np.int64)[0]
            raise KernelRuntimeError(f"kernel '{kernel.name}': access out of bounds: index "
                                     f"{index} into %{names.get(word, '?')} (tenstorrent scalar tier)")


def _scalar_probe() -> Availability:
    cxx = tt_metalium.host_compiler()
    if cxx is None:
        return Availability(False, "no C++ compiler on PATH (apt install g++): the scalar tier "
                                   "is validated by building its TT-Metalium C++ for this host")
    return Availability(True, devices=("TT-Metalium C++ on this host's CPU (validation, not a "
                                       "Tenstorrent device)",), versions={"cxx": cxx})


@register_backend("tenstorrent-scalar-host")
class TenstorrentScalarHostBackend(HostMemoryBackend):
    """Every kernel through the scalar tier, compiled for this host: checks that lowering."""

    @classmethod
    def probe(cls) -> Availability:
        return _scalar_probe()

    def __init__(self, device: str | None = None):
        super().__init__(device)
        if not _scalar_probe().ok:
            raise BackendUnavailable(_scalar_probe().reason)
        self.scalar = ScalarTierHost()

    def prepare(self, kernel):
        self.scalar.prepare(kernel)

    def _run(self, kernel, args, global_size, local_size):
        self.scalar.run(kernel, args, global_size, local_size)

    def device_info(self):
        return {"backend": self.name, "device": "host CPU (TT-Metalium scalar tier, validation)"}


# ---- the tile tier ---------------------------------------------------------------------------

def _import_sim():
    """tt-lang-sim, imported so that it leaves torch alone: on import it rebinds torch.bfloat16
    and torch.float16 to torch.float32 process-wide (its "float32 promotion"), which would turn
    the caller's own bf16 models into f32 ones. Tile programs use only f32/i32, so switching
    the promotion off (which restores torch's attributes) changes nothing they compute."""
    from ttl.sim import ttl, ttnn
    from ttl.sim import ttnnsim
    ttnnsim.set_disable_float32_promotion(True)
    return ttl, ttnn


def _sim_probe() -> Availability:
    try:
        import importlib.metadata as md
        _import_sim()
        return Availability(True, devices=("sim: tt-lang-sim (CPU functional simulator)",),
                            versions={"tt-lang-sim": md.version("tt-lang-sim")})
    except ImportError as e:
        return Availability(False, f"tt-lang-sim is not installed ({e}): pip install tt-lang-sim "
                                   "(it needs the CPU build of torch)")


def _hardware_probe() -> Availability:
    try:
        import ttnn
    except ImportError:
        return Availability(False, "no Tenstorrent device: ttnn (tt-metal) is not installed")
    n = ttnn.GetNumAvailableDevices()
    if not n:
        return Availability(False, "ttnn is installed but finds no Tenstorrent device")
    return Availability(True, devices=tuple(f"{i}: Tenstorrent device" for i in range(n)),
                        gpu=True, versions={"ttnn": getattr(ttnn, "__version__", "?")})


def _sim_carry(block):
    """tt-lang-sim 1.1.6 appends a result's source blocks to every value computed from it, with
    no de-duplication, so a value carried around a loop doubles that list per iteration (40
    iterations of a Fibonacci-like update never finish). Keep each source once."""
    sources = getattr(block, "_source_blocks", None)
    if sources:
        block._source_blocks = list({id(b): b for b in sources}.values())
    return block


class TileTier:
    """Runs TileProgram's on tt-lang-sim, or through ttnn + tt-lang on a device."""

    MAX_GRID = (4, 4)

    def __init__(self, device: str | None):
        self.hardware = device not in (None, "sim")
        if self.hardware:
            import ttl
            import ttnn
            self.ttl, self.ttnn = ttl, ttnn
            self.dev = ttnn.open_device(device_id=int(device))
        else:
            self.ttl, self.ttnn = _import_sim()
            self.dev = None
        self.plans: dict[int, tuple] = {}
        self.modules: dict[str, object] = {}

    def plan(self, kernel):
        """(TileProgram, None) or (None, refusal reason); decided once per kernel."""
        from concordia.lowering.tt_lang import TileRefusal, plan_tiles
        hit = self.plans.get(id(kernel))
        if hit is None or hit[0] is not kernel:
            try:
                hit = (kernel, plan_tiles(kernel), None)
            except TileRefusal as e:
                hit = (kernel, None, str(e))
            self.plans[id(kernel)] = hit
        return hit[1], hit[2]

    def module(self, program):
        """The generated TT-Lang source as an importable file: the simulator reads its source."""
        import hashlib
        import importlib.util
        import tempfile
        from concordia.lowering.cache import cache_dir
        key = hashlib.sha256(program.source.encode()).hexdigest()[:24]
        if key not in self.modules:
            d = os.path.join(cache_dir(), "tt-lang")
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"tt_{key}.py")
            if not os.path.exists(path):
                fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".py")
                with os.fdopen(fd, "w") as fh:
                    fh.write(program.source)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(f"concordia_tt_{key}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            self.modules[key] = mod
        return self.modules[key]

    def to_tensor(self, array: np.ndarray):
        import torch
        t = torch.from_numpy(np.ascontiguousarray(array).reshape(-1, 32))
        if self.hardware:
            return self.ttnn.from_torch(t, layout=self.ttnn.TILE_LAYOUT, device=self.dev)
        return self.ttnn.from_torch(t, layout=self.ttnn.TILE_LAYOUT)

    def run(self, program, args, global_size):
        from concordia.lowering.tt_lang import TILE
        kernel = program.kernel
        n = global_size[0]
        ntiles = max(1, -(-n // TILE))
        padded = ntiles * TILE
        scalars = {p.name: a for p, a in zip(kernel.params, args) if not isinstance(p.type, PtrType)}
        tensors = []
        for inp in program.inputs:
            dt = np.dtype(inp.dtype)
            if inp.kind == "gid":
                tensors.append(self.to_tensor(np.arange(padded, dtype=np.int32)))
            elif inp.kind in ("const", "scalar"):
                v = inp.value if inp.kind == "const" else args[inp.param]
                raw = np.asarray(v, kernel.params[inp.param].type.dtype) if inp.kind == "scalar" \
                    else np.asarray(v)
                tile = np.full(TILE, raw.view(np.int32) if raw.dtype == np.uint32 else raw, dt)
                tensors.append(self.to_tensor(tile))
            else:
                tensors.append(self.to_tensor(self._tile_values(kernel, inp.param, args, dt, padded)))
        outs = [self.to_tensor(np.zeros(padded, np.dtype(o[2]))) for o in program.outputs]
        grid = (min(ntiles, self.MAX_GRID[0]),
                min(-(-ntiles // self.MAX_GRID[0]), self.MAX_GRID[1]))
        op = self.module(program).make_operation(self.ttl, scalars, n, grid,
                                                 *(() if self.hardware else (_sim_carry,)))
        op(*tensors, *outs)
        for (pidx, _, dtype), t in zip(program.outputs, outs):
            got = self.ttnn.to_torch(t).numpy().reshape(-1)[:n]
            self._store_back(kernel, pidx, args, got)

    @staticmethod
    def _tile_values(kernel, pidx, args, dt, padded) -> np.ndarray:
        elem = kernel.params[pidx].type.elem
        host = typed(args[pidx], elem.dtype)[:padded]
        if elem.name == "u32":
            host = host.view(np.int32)
        out = np.zeros(padded, dt)
        out[:host.size] = host.astype(dt)
        return out

    @staticmethod
    def _store_back(kernel, pidx, args, values):
        elem = kernel.params[pidx].type.elem
        host = typed(args[pidx], elem.dtype)
        k = min(host.size, values.size)
        if elem.name == "bool":
            host[:k] = values[:k] != 0
        elif elem.name == "u32":
            host[:k] = values[:k].astype(np.int32).view(np.uint32)
        else:
            host[:k] = values[:k].astype(elem.dtype)


class TilePageOps:
    """The checkpoint handlers in tile form (backends/tt_pages.py): a 4 KiB page is one tile of
    32-bit words. On the simulator a region is staged into a tile tensor for each call (its
    "DRAM" is host memory); on a device the region would be a device tensor already."""

    PAGE = 4096

    def __init__(self, tiles: "TileTier"):
        self.tiles = tiles

    def _pages(self, nbytes: int) -> int:
        return -(-nbytes // self.PAGE)

    def _tensor(self, handle, nbytes: int):
        words = np.zeros(self._pages(nbytes) * self.PAGE // 4, np.int32)
        words.view(np.uint8)[:nbytes] = handle[:nbytes]
        return self.tiles.to_tensor(words)

    def _back(self, tensor, handle, nbytes: int):
        handle[:nbytes] = self.tiles.ttnn.to_torch(tensor).numpy().reshape(-1).view(np.uint8)[:nbytes]

    def scan(self, region, shadow, nbytes: int) -> np.ndarray:
        n = self._pages(nbytes)
        flags = self.tiles.to_tensor(np.zeros(n * 1024, np.int32))
        page_compare(self.tiles.ttl, n)(self._tensor(region, nbytes), self._tensor(shadow, nbytes), flags)
        f = self.tiles.ttnn.to_torch(flags).numpy().reshape(n, 32, 32)[:, 0, 0]
        return np.nonzero(f)[0].astype(np.int32)

    def gather(self, region, shadow, nbytes: int, pages: np.ndarray, update_shadow: bool) -> np.ndarray:
        """The listed pages back to back (whole pages); the shadow takes them too if asked."""
        pages = [int(p) for p in pages]
        staging = self.tiles.to_tensor(np.zeros(len(pages) * 1024, np.int32))
        cur = self._tensor(region, nbytes)
        page_copy(self.tiles.ttl, pages, list(range(len(pages))))(cur, staging)
        if update_shadow:
            sh = self._tensor(shadow, nbytes)
            page_copy(self.tiles.ttl, pages, pages)(cur, sh)
            self._back(sh, shadow, nbytes)
        return self.tiles.ttnn.to_torch(staging).numpy().reshape(-1).view(np.uint8)

    def scatter(self, region, nbytes: int, pages: np.ndarray, raw: np.ndarray) -> None:
        pages = [int(p) for p in pages]
        staging = np.zeros(len(pages) * 1024, np.int32)
        staging.view(np.uint8)[:raw.size] = raw
        cur = self._tensor(region, nbytes)
        page_copy(self.tiles.ttl, list(range(len(pages))), pages)(self.tiles.to_tensor(staging), cur)
        self._back(cur, region, nbytes)


@register_backend("tenstorrent")
class TenstorrentBackend(HostMemoryBackend):
    """Tile tier where the lowering accepts a kernel, scalar tier for the rest.

    "tenstorrent" / "tenstorrent:sim": tt-lang-sim + the scalar tier built for this host.
    "tenstorrent:N": device N through ttnn/tt-lang (tile tier only, until the scalar tier's
    TT-Metalium programs are wired to tt-metal's program API).
    """

    @classmethod
    def probe(cls) -> Availability:
        hw = _hardware_probe()
        if hw.ok:
            return hw
        sim = _sim_probe()
        if not sim.ok:
            return Availability(False, f"{sim.reason}; {hw.reason}")
        scalar = _scalar_probe()
        if not scalar.ok:
            return Availability(False, f"scalar tier: {scalar.reason}")
        return Availability(True, devices=sim.devices + scalar.devices,
                            versions={**sim.versions, **scalar.versions})

    def __init__(self, device: str | None = None):
        super().__init__(device)
        hardware = device not in (None, "sim")
        probe = _hardware_probe() if hardware else _sim_probe()
        if not probe.ok:
            raise BackendUnavailable(probe.reason)
        self.tiles = TileTier(device)
        self.scalar = None if hardware else ScalarTierHost()
        self.last_tier, self.last_refusal = None, None

    def page_ops(self, page_size: int):
        return TilePageOps(self.tiles) if page_size == TilePageOps.PAGE else None

    def tier_for(self, kernel, global_size) -> tuple[str, str | None]:
        """Which tier runs this launch, and why not the tile tier when it is not."""
        program, refusal = self.tiles.plan(kernel)
        if program is not None and tuple(global_size[1:]) != (1, 1):
            return "scalar", f"kernel {kernel.name}: a {len(global_size)}-D launch; tiles are 1-D"
        return ("tile", None) if program is not None else ("scalar", refusal)

    def prepare(self, kernel):
        program, _ = self.tiles.plan(kernel)
        if program is None and self.scalar is not None:
            self.scalar.prepare(kernel)

    def _run(self, kernel, args, global_size, local_size):
        tier, why = self.tier_for(kernel, global_size)
        self.last_tier, self.last_refusal = tier, why
        if tier == "tile":
            program, _ = self.tiles.plan(kernel)
            try:
                self.tiles.run(program, args, global_size)
            except ConcordiaError:
                raise
            except Exception as e:   # a simulator failure is a lowering bug: say which kernel
                raise KernelRuntimeError(f"kernel '{kernel.name}' failed on the tile tier "
                                         f"({type(e).__name__}: {e})") from e
            return
        if self.scalar is None:
            raise BackendUnavailable(f"{why}; the scalar tier on a Tenstorrent device needs "
                                     "tt-metal's program API, which Concordia does not drive yet")
        self.scalar.run(kernel, args, global_size, local_size)

    def device_info(self):
        return {"backend": self.name, "device": "tt-lang-sim + scalar tier on host"
                if self.scalar is not None else f"Tenstorrent device {self.device}"}
