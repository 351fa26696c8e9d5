"""The LLM workload: a Qwen3-architecture decode loop whose KV cache, LoRA adapter and scheduler
state are Concordia regions. `examples/llm_decode.py` is its command line; the Ray workers of
`concordia.cluster` run it; the benchmarks time it. Needs torch.

The model is built from its configuration with random weights (no download): Qwen3's
layout — RMSNorm, grouped-query attention with per-head q/k RMSNorm and RoPE (theta 1e6),
SwiGLU MLP, tied embeddings — at full Qwen3-0.6B size on a GPU or a tiny size for CPU tests.
Compute and memory traffic are what matter here, not the text.

State that a serving engine would lose in a crash lives in three tensors, each a Concordia
region wrapped through DLPack (no copy):
- `kv`: the paged KV cache (layers, K/V, blocks, block_size, kv_heads, head_dim); its dirty
  pages come from the decode loop's own writes (KVBlockScanner) or the block table on the
  device (BlockTableScanner);
- `adapter`: the LoRA factors of q_proj and v_proj, changed every `--adapter-every` steps;
  its dirty pages are found on the device (AdapterPageScanner: shadow compare);
- `sched`: the scheduler's state (tokens, lengths, block table, free-block counter).

Each step reads its position, tokens and block table from the scheduler's device state and
writes its tokens there, so the host enqueues step k + 1 before it reads step k's tokens
(`--ahead`): the device does not wait for the host between steps, and a checkpoint enqueued
behind any step finds state and cache in step.

Greedy decoding: a resumed run's tokens equal an uninterrupted run's.
"""
from __future__ import annotations

import argparse
import collections
import gc
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from concordia_ir.errors import ConcordiaError

from .backends import Runtime, backend_status
from .handlers import Checkpointer
from .handlers.log import committed_image, scan_log
from .handlers.scanners import AdapterPageScanner, BlockTableScanner, KVBlockScanner, row_page_size


@dataclass(frozen=True)
class Qwen3Config:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    eps: float = 1e-6
    lora_rank: int = 16


CONFIGS = {
    # Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B): 28 layers, 16 q heads, 8 kv heads of 128
    "qwen3-0.6b": Qwen3Config(vocab=151936, hidden=1024, intermediate=3072, layers=28, heads=16,
                              kv_heads=8, head_dim=128),
    "tiny": Qwen3Config(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                        head_dim=16, lora_rank=4),
}


@dataclass(frozen=True)
class Shard:
    """This rank's part of a tensor-parallel model (Megatron's split): its q and kv heads
    (column-parallel q/k/v, row-parallel o), its slice of the MLP's intermediate units
    (column-parallel gate/up, row-parallel down); `reduce` sums the row-parallel partial
    results over the ranks (an all-reduce). world 1: the whole model."""
    rank: int = 0
    world: int = 1
    reduce: object = None

    def part(self, n: int) -> slice:
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def layers(self, layers: list, c: Qwen3Config) -> list:
        if self.world == 1:
            return layers
        hd, q, kv, i = c.head_dim, self.part(c.heads), self.part(c.kv_heads), self.part(c.intermediate)
        rows = lambda s, at=0: slice(at + s.start * hd, at + s.stop * hd)   # noqa: E731
        out = []
        for L in layers:
            qkv, gu = L["qkv"], L["gate_up"]
            out.append(dict(L, qkv=torch.cat([qkv[rows(q)], qkv[rows(kv, c.heads * hd)],
                                              qkv[rows(kv, (c.heads + c.kv_heads) * hd)]]),
                            o=L["o"][:, rows(q)].contiguous(),
                            gate_up=torch.cat([gu[i], gu[c.intermediate + i.start:c.intermediate + i.stop]]),
                            down=L["down"][:, i].contiguous()))
        return out

    def all_reduce(self, t):
        return t if self.reduce is None else self.reduce(t)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_WEIGHTS: dict = {}   # (config, device, dtype, seed) -> weights: runs in one process share them


class Qwen3Decoder:
    """Weights as plain tensors; `launch` decodes one token per sequence against the paged cache.

    Every shape is static (the block table spans max_len, attention is masked past `pos`, and
    pos lives on the device), so that on a GPU one decode step is captured once in a CUDA graph
    and then replayed: one launch per step instead of ~2,400, and the model, not Python, sets
    the pace. q/k/v and gate/up are fused into one matmul each."""

    def __init__(self, cfg: Qwen3Config, device, dtype, seed: int, block_size: int,
                 num_blocks: int, batch: int, max_len: int, graph: bool = True,
                 shard: Shard = Shard(), ahead: int = 1):
        self.cfg, self.device, self.dtype, self.shard = cfg, device, dtype, shard
        key = (cfg, str(device), dtype, seed)
        if key not in _WEIGHTS:
            _WEIGHTS[key] = self._weights(cfg, device, dtype, seed)
        if key + (shard.rank, shard.world) not in _WEIGHTS:
            embed, layers, norm = _WEIGHTS[key]
            _WEIGHTS[key + (shard.rank, shard.world)] = embed, shard.layers(layers, cfg), norm
        self.embed, self.layers, self.norm = _WEIGHTS[key + (shard.rank, shard.world)]
        # this rank's heads (all of them at world 1); the LoRA factors stay whole on every rank
        self.H, self.KV = cfg.heads // shard.world, cfg.kv_heads // shard.world
        self.q_rows = slice(shard.part(cfg.heads).start * cfg.head_dim, shard.part(cfg.heads).stop * cfg.head_dim)
        self.v_rows = slice(shard.part(cfg.kv_heads).start * cfg.head_dim, shard.part(cfg.kv_heads).stop * cfg.head_dim)
        self._state(cfg, device, dtype, block_size, num_blocks, max_len)
        self._static(batch, max_len, ahead)
        self.use_graph = graph and device.type == "cuda" and shard.world == 1
        self.graph = None

    @staticmethod
    def _weights(cfg, device, dtype, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def w(*shape, scale=None):
            t = torch.randn(*shape, generator=g) * (scale or 1.0 / math.sqrt(shape[-1]))
            return t.to(device=device, dtype=dtype)
        c = cfg
        embed = w(c.vocab, c.hidden, scale=0.02)   # as initialised for training: the residual
        # stream is then led by the layers, so a token depends on its whole context
        layers = []
        for _ in range(c.layers):
            layers.append(dict(
                ln1=torch.ones(c.hidden, device=device, dtype=dtype),
                ln2=torch.ones(c.hidden, device=device, dtype=dtype),
                qkv=torch.cat([w(c.heads * c.head_dim, c.hidden), w(c.kv_heads * c.head_dim, c.hidden),
                               w(c.kv_heads * c.head_dim, c.hidden)]),
                o=w(c.hidden, c.heads * c.head_dim),
                qn=torch.ones(c.head_dim, device=device, dtype=dtype),
                kn=torch.ones(c.head_dim, device=device, dtype=dtype),
                gate_up=torch.cat([w(c.intermediate, c.hidden), w(c.intermediate, c.hidden)]),
                down=w(c.hidden, c.intermediate)))
        return embed, layers, torch.ones(c.hidden, device=device, dtype=dtype)

    def _state(self, c, device, dtype, block_size, num_blocks, max_len):
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.freqs = torch.polar(torch.ones_like(ang), ang).to(device=device, dtype=torch.complex64)
        # --- the state Concordia protects
        r = c.lora_rank
        per_layer = r * c.hidden * 2 + c.heads * c.head_dim * r + c.kv_heads * c.head_dim * r
        self.adapter = torch.zeros(c.layers * per_layer, device=device, dtype=dtype)
        self.lora = []
        off = 0
        for _ in range(c.layers):
            views = {}
            for name, shape in (("qa", (r, c.hidden)), ("qb", (c.heads * c.head_dim, r)),
                                ("va", (r, c.hidden)), ("vb", (c.kv_heads * c.head_dim, r))):
                n = shape[0] * shape[1]
                views[name] = self.adapter[off:off + n].view(shape)
                off += n
            self.lora.append(views)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv = torch.zeros(c.layers, 2, num_blocks, block_size, self.KV, c.head_dim,
                              device=device, dtype=dtype)

    def _static(self, batch, max_len, ahead):
        """The step's inputs live in fixed tensors (what a CUDA graph reads on each replay);
        the step fills them itself from the scheduler's device state (`chain.feed`)."""
        max_blocks = -(-max_len // self.block_size)
        self.tokens_in = torch.zeros(batch, dtype=torch.int64, device=self.device)
        # the next tokens come back through pinned memory, behind the step in its stream; in a
        # ring of buffers, since `ahead` more steps are enqueued before the host reads a step's
        cuda = self.device.type == "cuda"
        self.out_host = [torch.empty(batch, dtype=torch.int32, pin_memory=cuda) for _ in range(ahead + 1)]
        self.out_ready = [torch.cuda.Event() for _ in range(ahead + 1)] if cuda else None
        self.out_turn = 0
        self.pos_in = torch.zeros((), dtype=torch.int64, device=self.device)
        self.table_in = torch.zeros(batch, max_blocks, dtype=torch.int64, device=self.device)
        self.positions = torch.arange(max_blocks * self.block_size, device=self.device)
        self.chain = None   # the scheduler: feeds a step its inputs and takes its tokens, on the device

    def adapter_update(self, step: int):
        """An online adapter change at `step`: a few rows of one layer's factors, from the step
        number alone (a resumed run makes the same change at the same step)."""
        c = self.cfg
        g = torch.Generator(device="cpu").manual_seed(10_000 + step)
        layer = self.lora[step % c.layers]
        for name in ("qa", "vb"):
            t = layer[name]
            rows = torch.randint(0, t.shape[0], (2,), generator=g)
            vals = (torch.randn(2, t.shape[1], generator=g) * 0.02).to(t.dtype)
            t[_to_device(rows, t.device)] = _to_device(vals, t.device)

    def seek(self, pos: int):
        """The next step decodes position `pos` (a round's start, a resumed run); after it,
        each step takes the position after the last one's, on the device."""
        self.pos_in.fill_(pos - 1)

    def launch(self) -> torch.Tensor:
        """Enqueue one decode step: the position after the last one's, its tokens and block
        table read from the scheduler's device state (`chain.feed`), its K/V written, its
        output kept on the device for the next step (`chain.take`). Returns the next tokens
        as a device tensor, not yet waited for: nothing of the host's is needed, so the host
        can enqueue the next step before it reads this one's tokens."""
        if not self.use_graph:
            return self.step()
        if self.graph is None:
            out = self.step()            # eager once: the real step, and the graph's warm-up
            torch.cuda.current_stream().synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_out = self.step()
            return out
        self.graph.replay()
        return self.next_out

    def read_back(self, out: torch.Tensor):
        """Start copying a step's next tokens to the host; the returned callable waits for them.
        The copy is enqueued at once, behind the step, so the host can wait for it alone (not
        for work enqueued after it: a checkpoint's capture, the next step)."""
        if self.out_ready is None:
            return lambda: out.cpu().numpy()
        k, self.out_turn = self.out_turn, (self.out_turn + 1) % len(self.out_host)
        host, ready = self.out_host[k], self.out_ready[k]
        host.copy_(out, non_blocking=True)
        ready.record()
        return lambda: (ready.synchronize(), host.numpy().copy())[1]

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step from and into the device state: inputs fed, the model, tokens taken."""
        self.chain.feed(self.pos_in, self.tokens_in, self.table_in)
        out = self.forward()
        self.chain.take(out)
        return out

    def forward(self) -> torch.Tensor:
        """Greedy next token of each sequence, from the static inputs."""
        c, bs = self.cfg, self.block_size
        B, H, KV, hd = self.tokens_in.shape[0], self.H, self.KV, c.head_dim
        pos, table = self.pos_in, self.table_in
        T = self.positions.shape[0]
        h = self.embed[self.tokens_in]                                      # (B, hidden)
        at = table.gather(1, (pos // bs).expand(B, 1)).view(B) * bs + pos % bs   # cache slots
        mask = (self.positions <= pos).view(1, 1, 1, T)
        freq = self.freqs.index_select(0, pos.view(1))                      # (1, hd/2)
        blocks = table.view(-1)
        for li, L in enumerate(self.layers):
            lo = self.lora[li]
            x = F.rms_norm(h, (c.hidden,), L["ln1"], c.eps)
            q, k, v = (x @ L["qkv"].T).split([H * hd, KV * hd, KV * hd], dim=-1)
            q = q + (x @ lo["qa"].T) @ lo["qb"][self.q_rows].T
            v = v + (x @ lo["va"].T) @ lo["vb"][self.v_rows].T
            q = _rope(F.rms_norm(q.reshape(B, H, hd), (hd,), L["qn"], c.eps), freq)
            k = _rope(F.rms_norm(k.reshape(B, KV, hd), (hd,), L["kn"], c.eps), freq)
            cache = self.kv[li].view(2, -1, KV, hd)                         # (2, slots, KV, hd)
            cache[0].index_copy_(0, at, k)
            cache[1].index_copy_(0, at, v.reshape(B, KV, hd))
            keys = self.kv[li, 0].index_select(0, blocks).view(B, T, KV, hd).transpose(1, 2)
            vals = self.kv[li, 1].index_select(0, blocks).view(B, T, KV, hd).transpose(1, 2)
            att = F.scaled_dot_product_attention(q[:, :, None, :], keys, vals, attn_mask=mask,
                                                 enable_gqa=True)
            h = h + self.shard.all_reduce(att.reshape(B, H * hd) @ L["o"].T)
            x = F.rms_norm(h, (c.hidden,), L["ln2"], c.eps)
            gate, up = (x @ L["gate_up"].T).chunk(2, dim=-1)
            h = h + self.shard.all_reduce((F.silu(gate) * up) @ L["down"].T)
        h = F.rms_norm(h, (c.hidden,), self.norm, c.eps)
        return torch.argmax((h @ self.embed.T).float(), dim=-1).to(torch.int32)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for its stream: from pinned memory (torch's
    pinned pool keeps the block until the copy has read it), as the step inputs go."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _rope(x, freq):
    """Rotary embedding on interleaved pairs, as one complex multiply."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freq).flatten(-2).to(x.dtype)


class Scheduler:
    """Sequences, their lengths, the block table and the free-block counter, kept in one int32
    tensor so that the same commit that logs KV pages logs the state that explains them.

    The device state is the live one: each step reads its tokens and block table from it and
    writes its input token, the length and kv_len into it (`feed`, `take`: device ops, held
    by the step's graph), so a checkpoint enqueued behind any step finds state and cache in
    step.
    The host keeps a mirror (`host`) from the tokens it reads back, and writes only what it
    decides: the block table and counter as blocks are handed out, the whole state when a
    round or a resumed run starts."""

    def __init__(self, batch: int, max_len: int, block_size: int, device, ahead: int = 1):
        self.batch, self.max_len, self.block_size = batch, max_len, block_size
        self.max_blocks = -(-max_len // block_size)
        self.HEAD = 5   # kv_len, length, next free block, batch, round
        n = self.HEAD + batch * self.max_blocks + batch * max_len
        self.state = torch.zeros(n, dtype=torch.int32, device=device)
        self.host = np.zeros(n, np.int32)
        at = self.HEAD + batch * self.max_blocks
        self.table_dev = self.state[self.HEAD:at].view(batch, self.max_blocks)
        self.tokens_dev = self.state[at:].view(batch, max_len)
        self.decided = slice(2, at)   # what the host decides: the block counter..the table
        self.output = torch.zeros(batch, dtype=torch.int32, device=device)   # the last step's
        # publish_table's sources: pinned, so the copy is enqueued and the host goes on (a
        # pageable copy holds the host until it is done, while the device waits for the next
        # step); ahead + 1 of them, used in turn (publish_table's docstring)
        self.staged = [torch.empty(at - 2, dtype=torch.int32, pin_memory=True) for _ in range(ahead + 1)] \
            if torch.device(device).type == "cuda" else None
        self.turn = 0

    def table(self):
        return self.host[self.HEAD:self.HEAD + self.batch * self.max_blocks].reshape(
            self.batch, self.max_blocks)

    def tokens(self):
        return self.host[self.HEAD + self.batch * self.max_blocks:].reshape(self.batch, self.max_len)

    def start(self, prompts: np.ndarray, round_no: int = 0):
        """Round 0: a new job. A later round: the next request of every slot, in the blocks
        the last round held (the table and the block counter stay)."""
        table, blocks = self.table().copy(), self.host[2]
        self.host[:] = 0
        self.host[3], self.host[4] = self.batch, round_no
        self.table()[:] = table if round_no else -1
        self.host[2] = blocks if round_no else 0
        self.tokens()[:, :prompts.shape[1]] = prompts
        self.host[1] = prompts.shape[1]

    def ensure_block(self, pos: int) -> bool:
        """Give every sequence a block for position `pos` (interleaved: the table matters)."""
        if pos % self.block_size or self.table()[0, pos // self.block_size] >= 0:
            return False
        for b in range(self.batch):
            self.table()[b, pos // self.block_size] = self.host[2]
            self.host[2] += 1
        return True

    def publish(self):
        """The whole host state -> the device, when nothing of the decode is in flight (a
        round's or a resumed run's start): a pageable copy, which holds the host until it is
        read."""
        self.state.copy_(torch.from_numpy(self.host))

    def publish_table(self):
        """The block counter and table -> the device, behind the steps enqueued so far, ahead
        of the step that writes the new block. A pinned source is read when the stream reaches
        its copy, so the sources are used in turn: one written before step k's launch is
        written again before step k + ahead + 1's at the earliest, after the host has waited
        for step k's tokens (the decode loop keeps at most ahead + 1 steps unread), which the
        stream reaches only after that copy."""
        if self.staged is None:
            self.state[self.decided].copy_(torch.from_numpy(self.host[self.decided]))
            return
        source, self.turn = self.staged[self.turn], (self.turn + 1) % len(self.staged)
        source.numpy()[:] = self.host[self.decided]
        self.state[self.decided].copy_(source, non_blocking=True)

    def feed(self, pos_in, tokens_in, table_in):
        """A step's start, on the device: its position p (one past the last step's), its input
        tokens (the prompt's where it holds them, else the last step's output) written into
        the state, length = p + 1 and kv_len = p, and the block table (unallocated blocks,
        -1, read as block 0 and masked). A capture behind the step finds kv_len = p and the
        tokens up to p, as a host publish once gave it: a resumed run recomputes step p,
        which rewrites the same K/V and makes its token again (so it always has one to make)."""
        pos_in.add_(1)
        at = pos_in.view(1)
        known = at < self.state[1:2]
        tokens = torch.where(known, self.tokens_dev.index_select(1, at).view(-1), self.output)
        self.tokens_dev.index_copy_(1, at, tokens.view(-1, 1))
        self.state[1:2].copy_(torch.maximum(self.state[1:2], at + 1))
        self.state[0:1].copy_(at)
        tokens_in.copy_(tokens)
        table_in.copy_(self.table_dev.clamp(min=0))

    def take(self, out):
        """A step's end, on the device: its output, the next step's input past the prompt."""
        self.output.copy_(out)

    def took(self, pos: int, tokens: np.ndarray) -> bool:
        """Step `pos`'s output, read back, into the host's mirror (which holds it a step before
        the device state does: `feed`); True if it is new (past the prompt)."""
        self.host[0] = pos + 1
        if pos + 1 < self.host[1]:
            return False
        self.tokens()[:, pos + 1] = tokens
        self.host[1] = pos + 2
        return True

    def load(self):
        self.host[:] = self.state.cpu().numpy()


def make_prompts(cfg, batch: int, prompt_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab, (batch, prompt_len)).astype(np.int32)


class DecodeRun:
    """One decode job: model + scheduler + (optionally) a Checkpointer over the three regions."""

    def __init__(self, args, shard: Shard = Shard()):
        self.args = args
        self.cfg = CONFIGS[args.config]
        self.device = torch.device(args.device)
        dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_len = args.prompt + args.tokens
        blocks = args.batch * (-(-self.max_len // args.block_size))
        self.model = Qwen3Decoder(self.cfg, self.device, dtype, args.seed, args.block_size,
                                  blocks, args.batch, self.max_len, graph=not args.no_graph,
                                  shard=shard, ahead=args.ahead)
        self.sched = Scheduler(args.batch, self.max_len, args.block_size, self.device, args.ahead)
        self.model.chain = self.sched
        # Python's full collections scan every object alive: with torch loaded, ~170,000 of
        # them, 80 ms on an H100's host, and the collection holds the GIL, so the decode thread
        # and the checkpoint writer both stop (a checkpointed run made 22 % slower by one;
        # bench/llm.py's GCPauses). What exists now lives as long as the job: frozen, it is
        # left out of every later collection (vLLM freezes after its start-up too)
        gc.freeze()
        self.ckpt = None
        self.scanner = None
        self.stats: list[dict] = []
        self.handles: list = []   # checkpoint_async's handles (durability lag, stats)

    def regions(self, rt):
        """The three tensors as Concordia regions (DLPack: no copy). bf16 has no IR type, so
        the KV cache and adapter are seen as int32 words: a region is bytes to Concordia."""
        def words(t):
            return rt.from_dlpack(t.view(torch.int32) if t.dtype == torch.bfloat16 else t)
        return {"kv": words(self.model.kv), "adapter": words(self.model.adapter),
                "sched": rt.from_dlpack(self.sched.state)}

    def default_backend(self) -> str:
        """A backend that can wrap this device's tensors: cuda on a GPU; on a CPU the simulated
        Tenstorrent device where it is installed (its DRAM is host memory), else reference."""
        if self.device.type == "cuda":
            return "cuda"
        return "tenstorrent" if backend_status()["tenstorrent"].ok else "reference"

    def open_checkpointer(self, rt=None):
        """A Checkpointer over the three regions, logging to --log (on `rt`, an open Runtime,
        or one of --backend)."""
        rt = rt or Runtime(self.args.backend or self.default_backend())
        self.stats, self.handles = [], []   # this log's
        m, kv = self.model, self.model.kv
        row = kv[0, 0, 0, 0].numel() * kv.element_size()   # one slot's K (or V) row
        page = self.args.page_size or row_page_size(row)
        listable = page % row == 0
        if self.args.kv_scan == "device" and not listable:
            raise ConcordiaError(f"--kv-scan device needs a page that a KV row ({row} B) divides, "
                                 f"not --page-size {page}")
        if self.args.kv_scan == "device" or (self.args.kv_scan == "auto" and rt.backend.streams
                                             and listable):
            # the pages come from the block table on the device: nothing per step on the host
            self.scanner = BlockTableScanner(tuple(kv.shape), kv.element_size(),
                                             rt.from_dlpack(m.table_in.view(-1)),
                                             rt.from_dlpack(m.pos_in.view(1)), self.args.batch,
                                             page_size=page)
        else:
            self.scanner = KVBlockScanner(tuple(kv.shape), kv.element_size(), page)
        # the staging slots a writer that keeps up has in flight: the captures of the steps not
        # yet run (ahead + 1), the one it writes and the one it holds until the next comes
        self.ckpt = Checkpointer(rt, self.regions(rt), self.args.log, fsync=self.args.fsync,
                                 ring_slots=self.args.ahead + 3,
                                 page_size=page,
                                 scanners={"kv": self.scanner, "adapter": AdapterPageScanner()},
                                 when_full=self.args.when_full, device_side=self.args.device_side,
                                 slot_bytes=self.args.slot_mb << 20,
                                 compact_at_bytes=self.args.compact_at_mb << 20 if self.args.compact_at_mb else None)

    def close_checkpointer(self):
        """Wait until every checkpoint is durable and close the log; the model decodes on
        without checkpoints (or with the next open_checkpointer's)."""
        ckpt, self.ckpt, self.scanner = self.ckpt, None, None
        if ckpt is not None:
            ckpt.close()

    def sync(self):
        """Wait for the decode's stream (not the whole device: a resident persistent kernel,
        --device-side ring's, never ends, and a device-wide wait would wait for it)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def checkpoint(self, pos: int):
        """A synchronous checkpoint after step `pos`: wait for the device, log, commit, fsync."""
        t0 = time.perf_counter()
        self.sync()
        st = self.ckpt.checkpoint()
        self.stats.append({"pos": pos, "seconds": time.perf_counter() - t0, "pages": st.pages,
                           "bytes": st.bytes, "full": st.full})

    def checkpoint_async(self, pos: int):
        """Enqueued in the decode stream right after step `pos` was launched: the scheduler
        state as that step left it on the device (kv_len = pos, the tokens up to pos) and the
        cache with pos's K/V. A restore recomputes step pos, which rewrites the same K/V."""
        h = self.ckpt.checkpoint_async()
        self.handles.append(h)
        self.enqueue_s = h.enqueue_s
        self.stats.append({"pos": pos, "seconds": h.enqueue_s, "full": h.done()})

    def prompts(self, round_no: int) -> np.ndarray:
        """The prompts of round `round_no` (each round is the next request of every slot)."""
        a = self.args
        seed = a.seed if a.prompt_seed is None else a.prompt_seed
        return make_prompts(self.cfg, a.batch, a.prompt, seed + 7919 * round_no)

    def generate(self, start_pos: int | None = None, crash_after: int | None = None,
                 on_token=None, stop_after: int | None = None):
        """Decode until every sequence holds prompt + tokens, --rounds times over (or
        `stop_after` new tokens); returns the last round's token array."""
        s, a, m = self.sched, self.args, self.model
        if start_pos is None:
            m.adapter.zero_()     # a new job starts from the base adapter
            s.start(self.prompts(0))
            pos = 0
            s.ensure_block(0)
        else:
            pos = start_pos
        # a resumed run's state as loaded; a stopped run's, which the device passed (the copy
        # is in the stream, behind the steps still running)
        s.publish()
        if self.ckpt is not None:
            if start_pos is None:
                self.checkpoint(0)   # the base image
            else:                    # a new log for a resumed run (a takeover's)
                if hasattr(self.scanner, "start_at"):
                    self.scanner.start_at(pos)   # earlier positions are in the base image
                if self.ckpt.need_full:
                    self.checkpoint(pos)         # the base image, written whole
        self.generated = 0
        self.step_seconds = []     # per new token: since the last step's tokens reached the host
        self.step_enqueue_s = []   # per new token: the time its step spent in checkpoint_async
        while not self._decode_round(pos, crash_after, on_token, stop_after):
            if s.host[4] + 1 >= a.rounds:
                break
            # the next round: a new request in every slot, in the same blocks (the rows past
            # a position are the last round's, masked until the new round writes them)
            s.start(self.prompts(int(s.host[4]) + 1), int(s.host[4]) + 1)
            s.publish()
            pos = 0
        self.sync()
        return s.tokens().copy()

    def _decode_round(self, pos: int, crash_after, on_token, stop_after) -> bool:
        """The current round's steps from `pos` to its end; True if stopped (stop_after).

        Steps k + 1..k + ahead are enqueued before the host waits for step k's tokens: a step
        reads its inputs from the device state, so the device goes from step to step without
        waiting for the host's turn-around (or for a stall of the host's shorter than `ahead`
        steps), and a checkpoint's capture enqueued behind step k runs before step k + 1
        (stream) or beside it (fork). A synchronous checkpoint waits for the device after
        each step anyway: then one step at a time."""
        s, a, m = self.sched, self.args, self.model
        ahead = 0 if self.ckpt is not None and not a.async_checkpoints else a.ahead
        m.seek(pos)
        unread = collections.deque()
        self._tokens_at = time.perf_counter()
        while pos < self.max_len - 1:
            if s.ensure_block(pos):
                s.publish_table()
            if a.adapter_every and pos % a.adapter_every == 0 and pos > 0:
                m.adapter_update(pos)
            tokens = m.read_back(m.launch())
            if hasattr(self.scanner, "mark"):   # a host scanner: told what the step wrote
                self.scanner.mark(s.table()[:, pos // a.block_size], np.full(a.batch, pos % a.block_size))
            self.enqueue_s = 0.0
            if a.async_checkpoints and self._due(pos):
                self.checkpoint_async(pos)
            unread.append((pos, tokens, self.enqueue_s))
            pos += 1
            if len(unread) > ahead and self._took(*unread.popleft(), crash_after, on_token, stop_after):
                return True
        while unread:
            if self._took(*unread.popleft(), crash_after, on_token, stop_after):
                return True
        return False

    def _due(self, pos: int) -> bool:
        """A checkpoint after step `pos` (every --every steps, with a log open)?"""
        return self.ckpt is not None and self.args.every > 0 and pos % self.args.every == 0

    def _took(self, pos: int, tokens, enqueue_s: float, crash_after, on_token, stop_after) -> bool:
        """Step `pos`'s tokens, waited for and taken into the host's mirror; True to stop."""
        nxt = tokens()
        now, since = time.perf_counter(), self._tokens_at
        self._tokens_at = now
        if self.sched.took(pos, nxt):
            self.step_seconds.append(now - since)
            self.step_enqueue_s.append(enqueue_s)
            self.generated += 1
            if on_token:
                on_token(pos + 1)
        if not self.args.async_checkpoints and self._due(pos + 1):
            self.checkpoint(pos + 1)
        if crash_after is not None and self.generated >= crash_after:
            os.kill(os.getpid(), signal.SIGKILL)   # a crash: nothing is flushed or closed
        return stop_after is not None and self.generated >= stop_after

    def resume(self, restore_backend: str, rt=None, checkpoint: int | None = None) -> dict:
        """Restore kv/adapter/sched from the log into this process's tensors (on `rt`, an open
        Runtime, or a new one of `restore_backend`), as of its last commit or of commit
        `checkpoint`; phases timed."""
        t0 = time.perf_counter()
        scan = scan_log(self.args.log)                  # detect: the log's last commit
        t1 = time.perf_counter()
        image = committed_image(scan, checkpoint)       # load: the committed page image
        t2 = time.perf_counter()
        rt = rt or Runtime(restore_backend)
        Checkpointer.restore(self.args.log, rt, into=self.regions(rt), image=image)   # apply
        self.sync()
        self.sched.load()
        t3 = time.perf_counter()
        return {"detect_s": t1 - t0, "load_log_s": t2 - t1, "apply_s": t3 - t2,
                "restored_pos": int(self.sched.host[0])}


def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description="A Qwen3-architecture decode loop, "
                                "checkpointed by Concordia")
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model and KV dtype (auto: bfloat16 on a GPU, float32 on a CPU); runs "
                        "that restore each other's logs need the same one")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens per sequence")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate per sequence")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1,
                   help="requests per slot, one after another (a serving loop): each round "
                        "decodes new prompts in the blocks of the last")
    p.add_argument("--seed", type=int, default=0, help="the model's weights (and the prompts)")
    p.add_argument("--prompt-seed", type=int, default=None,
                   help="the prompts, when they differ from --seed's (one model, many jobs)")
    p.add_argument("--adapter-every", type=int, default=8, help="adapter change every N steps")
    p.add_argument("--log", help="delta log path: checkpoint while decoding")
    p.add_argument("--every", type=int, default=1,
                   help="checkpoint every N decode steps (0: the base image only)")
    p.add_argument("--backend", default=None, help="Concordia backend of the checkpoints "
                   "(default: cuda on a GPU; tenstorrent (simulated) or reference on a CPU)")
    p.add_argument("--page-size", type=int, default=0,
                   help="the log's page in bytes, a power of two (default: about one KV row, "
                        "256 B to 4 KiB)")
    p.add_argument("--fsync", default="always", choices=["always", "everysec", "no"])
    p.add_argument("--async", dest="async_checkpoints", action="store_true",
                   help="checkpoint_async: enqueued in the decode stream, a writer thread logs "
                        "and fsyncs (group commit); the decode thread never waits for the disk")
    p.add_argument("--when-full", default="wait", choices=["wait", "coalesce"],
                   help="--async with every staging slot in flight: wait for one, or fold this "
                        "checkpoint into the next")
    p.add_argument("--device-side", choices=["auto", "stream", "fork", "ring"], default="auto",
                   help="--async: gather the KV pages in the decode stream (stream), on a side "
                        "stream beside the next step (fork), or on the persistent kernel beside "
                        "the next step, started by a device-side trigger (ring); fork and ring: "
                        "cuda, with the block table's device list; auto: fork where it runs, "
                        "else stream")
    p.add_argument("--kv-scan", choices=["auto", "host", "device"], default="auto",
                   help="KV pages from the host's record of the writes, or listed on the device "
                        "from the block table (auto: device where the backend has streams)")
    p.add_argument("--compact-at-mb", type=int, default=0,
                   help="--async: fold the log into a base image in the background past this size")
    p.add_argument("--slot-mb", type=int, default=16,
                   help="--async: staging per ring slot and region, MiB (a device list's share "
                        "bounds how many checkpoints coalesce while the writer is behind)")
    p.add_argument("--ahead", type=int, default=1,
                   help="decode steps enqueued before the host waits for a step's tokens (0: "
                        "one step at a time; more rides out longer stalls of the host)")
    p.add_argument("--no-graph", action="store_true",
                   help="on a GPU, run each step eagerly instead of replaying a CUDA graph")
    p.add_argument("--crash-after", type=int, help="SIGKILL this process after N new tokens")
    p.add_argument("--resume", action="store_true", help="restore from --log and continue")
    p.add_argument("--restore-backend", default=None, help="backend that applies the log")
    p.add_argument("--out", help="write the final tokens (.npy) here")
    p.add_argument("--json", help="write timings here")
    a = p.parse_args(argv)
    if a.resume and not a.log:
        p.error("--resume needs --log")
    if min(a.batch, a.prompt, a.tokens, a.block_size, a.rounds, a.slot_mb) < 1:
        p.error("--batch, --prompt, --tokens, --block-size, --rounds and --slot-mb must be >= 1")
    if a.every < 0:
        p.error(f"--every must be >= 0 (0: the base image only), got {a.every}")
    if not 0 <= a.ahead <= 8:
        p.error(f"--ahead must be 0 to 8, got {a.ahead}")
    if a.page_size and (a.page_size < 256 or a.page_size & (a.page_size - 1)):
        p.error(f"--page-size must be a power of two >= 256, got {a.page_size}")
    return a
