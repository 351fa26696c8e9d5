"""Hugging Face transformers, as users run it: protect a `model.generate(...)` call.

    from concordia.hf import GenerationGuard
    guard = GenerationGuard(cache, "run.clog")            # cache: a transformers StaticCache
    out = model.generate(ids, cache=cache, max_new_tokens=64, stopping_criteria=[guard])
    # after a crash, in a new process:
    ids, cache = GenerationGuard.resume("run.clog", model)   # the tokens so far, a filled cache
    out = model.generate(ids, cache=cache, max_new_tokens=64 - (ids.shape[1] - prompt_len),
                         stopping_criteria=[GenerationGuard(cache, "run.clog")])

Recent transformers (5.24 here) take the cache as `cache=` and warn on `past_key_values=`;
older releases take only `past_key_values=`. `cache_kwargs(model, cache)` gives whichever the
installed one names: `model.generate(ids, **cache_kwargs(model, cache), ...)`.

Greedy decoding is what resumes with identical tokens: beam search is refused at its first
step (its beams' scores live in generate), and a sampled generate resumes, but with its own
random draws from there on.

The guard is a stopping criterion that never stops: after each generated token it checkpoints,
asynchronously (checkpoint_async), the StaticCache's keys and values (only the pages of the
positions written since its last call), the tokens so far and their count. When generate calls
it, the cache holds every position but the newest token's; a resumed generate feeds that token
first, exactly as the interrupted one would have, so greedy decoding continues with identical
tokens.
"""
from __future__ import annotations

import inspect
import threading
import weakref

import numpy as np

from concordia_ir.errors import ConcordiaError

from .backends import Runtime
from .handlers import Checkpointer
from .handlers.log import scan_log
from .handlers.scanners import SequenceCacheScanner, row_page_size
from .handlers.staging_ring import release_idle

META_WORDS = 8   # batch, tokens so far, max_cache_len, layers, dtype code, prompt length
_DTYPES = ("float32", "bfloat16", "float16")


_RUNTIMES: dict[str, Runtime] = {}   # by backend spec: one for every guard of the process
# each cache's tokens and count tensors, for every guard over it: a guard of the next generate
# call then wraps the same memory, and takes the ring the last one left (staging_ring.IDLE_RINGS)
_COMPANIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUNTIMES_LOCK = threading.Lock()


def cache_kwargs(model, cache) -> dict:
    """generate()'s keyword argument for a cache, as the installed transformers names it:
    `cache` where the model's forward takes it (recent releases, which warn on the old name),
    else `past_key_values` (older ones, which refuse the new)."""
    takes = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in takes else "past_key_values": cache}


def _runtime(spec: str) -> Runtime:
    """The process's Runtime for `spec`: a guard a generate call, each with a Runtime of its
    own, kept each one's pinned bounce buffer and streams for the life of the process."""
    with _RUNTIMES_LOCK:
        if spec not in _RUNTIMES:
            _RUNTIMES[spec] = Runtime(spec)
        return _RUNTIMES[spec]


def release_rings() -> int:
    """Give back the staging slots the guards' runtimes keep for the next guard (pinned and
    mapped memory, graphs; two rings a runtime at most); returns how many slots."""
    with _RUNTIMES_LOCK:
        runtimes = list(_RUNTIMES.values())
    return sum(release_idle(rt) for rt in runtimes)


def _companions(cache, batch: int, max_len: int, device) -> tuple:
    """The cache's tokens (batch x max_len + 1) and count (META_WORDS) tensors, zeroed: made
    once a cache, kept as long as it is."""
    import torch
    kept = _COMPANIONS.get(cache)
    if kept is None or kept[0].shape != (batch, max_len + 1) or kept[0].device != device:
        kept = _COMPANIONS[cache] = (
            torch.zeros(batch, max_len + 1, dtype=torch.int64, device=device),
            torch.zeros(META_WORDS, dtype=torch.int64, device=device))
    else:
        for t in kept:
            t.zero_()
    return kept


def _layers(cache) -> list:
    """(keys, values, layer) of each layer of a StaticCache, across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values, layer) for layer in cache.layers]
    return [(k, v, None) for k, v in zip(cache.key_cache, cache.value_cache)]


class GenerationGuard:
    """A transformers StoppingCriteria that checkpoints generation at every step."""

    def __init__(self, cache, path: str, runtime: str | Runtime | None = None, every: int = 1,
                 fsync: str = "always"):
        from transformers import StaticCache
        if not isinstance(cache, StaticCache):   # a growing cache's tensors move each step
            raise ConcordiaError(f"GenerationGuard needs a transformers StaticCache (its "
                                 f"tensors stay in place), got {type(cache).__name__}")
        self.cache, self.path, self.every, self.fsync = cache, path, max(1, every), fsync
        self.runtime = runtime
        self.ckpt = None
        self.calls = 0
        self.handles: list = []
        self.running = None   # what __call__ returns: no sequence is done

    def _open(self, input_ids):
        import torch
        layers = _layers(self.cache)
        if not layers or layers[0][0] is None:
            raise ConcordiaError("the cache has no tensors yet: pass the StaticCache that "
                                 "generate(cache=...) fills")
        keys = layers[0][0]
        if keys.dim() != 4:
            raise ConcordiaError(f"expected StaticCache keys of shape (batch, heads, max_len, "
                                 f"head_dim), got {tuple(keys.shape)}")
        dtype = str(keys.dtype).split(".")[-1]
        if dtype not in _DTYPES:
            raise ConcordiaError(f"cache dtype {keys.dtype} is not one of {', '.join(_DTYPES)}")
        batch, _, max_len, _ = keys.shape
        rt = self.runtime if isinstance(self.runtime, Runtime) else _runtime(
            self.runtime or (f"cuda:{keys.device.index or 0}" if keys.is_cuda else "reference"))
        self.tokens, self.meta = _companions(self.cache, batch, max_len, keys.device)
        self.meta[:6] = torch.tensor([batch, 0, max_len, len(layers), _DTYPES.index(dtype),
                                      input_ids.shape[1]])
        regions = {"meta": rt.from_dlpack(self.meta), "tokens": rt.from_dlpack(self.tokens)}
        by_shape = {}   # (shape, itemsize) -> region names: one scanner each, computed once
        for i, (k, v, _) in enumerate(layers):
            for name, t in ((f"k{i}", k), (f"v{i}", v)):
                regions[name] = rt.from_dlpack(t)
                by_shape.setdefault((tuple(t.shape), t.element_size()), []).append(name)
        # pages of about a row: a step writes one row (head_dim values) per sequence, head and
        # layer, each a whole head's rows from the next, so with 4 KiB pages it logged 16x
        # the bytes it wrote (Qwen3-0.6B: 1.8 MB a token for 115 KB of new keys and values)
        page = row_page_size(keys.shape[-1] * keys.element_size())
        scanners, self.scanners = {}, []
        for (shape, itemsize), names in by_shape.items():
            self.scanners.append(SequenceCacheScanner(shape, itemsize, page, users=len(names),
                                                      positions_a_step=self.every,
                                                      zero_unmarked=True))
            scanners.update(dict.fromkeys(names, self.scanners[-1]))
        # the tokens and their count are listed from the host too (the guard knows what it
        # wrote): a ring of host-listed regions only is kept for the next generate call's
        # guard (staging_ring.IDLE_RINGS); shadow-scanned, each call made its ring anew
        self.token_scanner = SequenceCacheScanner((batch, 1, max_len + 1, 1), 8, page,
                                                  positions_a_step=self.every, zero_unmarked=True)
        self.count_scanner = SequenceCacheScanner((1, 1, META_WORDS, 1), 8, page)
        scanners.update(tokens=self.token_scanner, meta=self.count_scanner)
        self.ckpt = Checkpointer(rt, regions, self.path, page_size=page, fsync=self.fsync,
                                 scanners=scanners)
        self.written = 0   # cache positions covered by the last checkpoint
        self.tokens_written = 0   # and tokens

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch
        if self.ckpt is None:
            self._open(input_ids)
        if input_ids.shape[0] != self.tokens.shape[0]:
            # beam search hands its criteria more rows than the cache has sequences; its
            # beams' scores live in generate, out of any log's reach
            raise ConcordiaError(
                f"generate passed {input_ids.shape[0]} sequences for a cache of "
                f"{self.tokens.shape[0]}: GenerationGuard protects greedy decoding (beam "
                "search, num_beams > 1, cannot be resumed with identical tokens)")
        length = input_ids.shape[1]
        self.calls += 1
        if self.calls % self.every == 0 or self.ckpt.need_full:
            for s in self.scanners:            # positions written since the last checkpoint
                s.mark(self.written, length - 2)
            self.written = length - 1
            self.token_scanner.mark(self.tokens_written, length - 1)
            self.count_scanner.mark(1, 1)
            self.tokens_written = length
            self.tokens[:, :length].copy_(input_ids)
            # fill_, not `meta[1] = length`: item assignment copies a host scalar in from
            # pageable memory, which waits for the stream (the decode's own work) first
            self.meta[1:2].fill_(length)
            self.handles.append(self.ckpt.checkpoint_async())
        if self.running is None or self.running.shape[0] != input_ids.shape[0]:
            # made once: generate only reads it (is_done | criterion), and a tensor made a
            # token was one more allocation and kernel on the decode thread
            self.running = torch.zeros(input_ids.shape[0], dtype=torch.bool,
                                       device=input_ids.device)
        return self.running

    def close(self) -> int:
        """Wait until every checkpoint is durable; returns the last checkpoint's id."""
        if self.ckpt is None:
            return 0
        ckpt, self.ckpt = self.ckpt, None
        try:
            return ckpt.flush()   # a writer's error is raised here, once
        finally:
            ckpt.close()          # and the log, ring and buffers are given back all the same

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def resume(path: str, model, runtime: str | Runtime = "reference"):
        """(input_ids, cache) as of the log's last durable checkpoint: the tokens so far and a
        StaticCache for `model` filled with what they produced."""
        import torch
        scan_log(path)   # a missing or damaged log fails here, in one line with its offset
        rt = runtime if isinstance(runtime, Runtime) else Runtime(runtime)
        regions = Checkpointer.restore(path, rt)
        meta = regions["meta"].numpy().view(np.int64)
        batch, length, max_len, n_layers, code = (int(x) for x in meta[:5])
        dtype = getattr(torch, _DTYPES[code])
        device = model.device
        ids = torch.from_numpy(regions["tokens"].numpy().view(np.int64).reshape(batch, max_len + 1)
                               [:, :length].copy()).to(device)
        cache = _static_cache(model, batch, max_len, dtype, device)
        layers = _layers(cache)
        _check_model(path, regions, n_layers, layers)
        for i, (k, v, layer) in enumerate(layers):
            for name, t in ((f"k{i}", k), (f"v{i}", v)):
                raw = regions[name].numpy().view(np.uint8)
                t.copy_(torch.frombuffer(bytearray(raw.tobytes()), dtype=torch.uint8)
                        .view(dtype).reshape(t.shape))
            if layer is not None and hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(length - 1)
        return ids, cache


def _check_model(path: str, regions: dict, n_layers: int, layers: list) -> None:
    """The model's cache must be the one the log was written from: as many layers, each
    tensor of the same size (a wrong model raised a KeyError or a reshape error)."""
    k0 = layers[0][0] if layers else None
    size = k0.numel() * k0.element_size() if k0 is not None else 0
    logged = regions["k0"].nbytes if "k0" in regions else 0
    if len(layers) != n_layers or size != logged:
        shape = f" {tuple(k0.shape)}" if k0 is not None else ""
        raise ConcordiaError(f"{path}: written for a model whose cache has {n_layers} layers, "
                             f"keys of {logged:,} bytes a layer; this model's has {len(layers)} "
                             f"layers, keys of {size:,} bytes{shape}: resume with the model "
                             "that wrote the log")


def _static_cache(model, batch: int, max_len: int, dtype, device):
    """An initialised StaticCache (transformers 5: lazy layers; 4.x: sized at construction)."""
    from transformers import StaticCache
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    try:
        cache = StaticCache(config=cfg, max_cache_len=max_len)
    except TypeError:
        return StaticCache(config=cfg, max_batch_size=batch, max_cache_len=max_len,
                           device=device, dtype=dtype)
    cache.early_initialization(batch, heads, head_dim, dtype, device)
    return cache
