"""concordia.hf.GenerationGuard around Hugging Face transformers' own generate: a tiny random
Qwen3 with a StaticCache is SIGKILLed mid-generation, a new process resumes from the guard's
log, and generate continues with exactly the uninterrupted tokens."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.bench_usage import usage_error

pytest.importorskip("transformers", reason="the guard wraps transformers: pip install -e .[hf]")

from concordia.hf import cache_kwargs  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_generate.py")


def tiny(batch: int = 1):
    """(the example's module, its tiny random Qwen3 on the CPU, a prompt of 8 tokens for each
    of `batch` sequences)."""
    import torch
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import hf_generate
    ids = torch.randint(0, 256, (batch, 8), generator=torch.Generator().manual_seed(1))
    return hf_generate, hf_generate.build("tiny", "cpu"), ids


def run(*args, device="cpu"):
    return subprocess.run([sys.executable, SCRIPT, "--device", device, "--tokens", "24", *args],
                          capture_output=True, text=True, timeout=300)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.parametrize("crash_after,device", [
    (3, "cpu"), (12, "cpu"),
    # on cuda the guard's checkpoints go through the stream path: the layers' keys and values
    # share one page list per ring slot, copied in before the graph's branches
    pytest.param(12, "cuda", marks=pytest.mark.skipif(not _cuda(), reason="needs a CUDA device"))])
def test_generate_resumes_with_identical_tokens(tmp_path, crash_after, device):
    want, got, log = tmp_path / "want.npy", tmp_path / "got.npy", tmp_path / "g.clog"
    r = run("--out", str(want), device=device)
    assert r.returncode == 0, r.stderr
    r = run("--log", str(log), "--crash-after", str(crash_after), device=device)
    assert r.returncode == -9, r.stderr
    r = run("--log", str(log), "--resume", "--out", str(got), device=device)
    assert r.returncode == 0, r.stderr
    resumed = int(r.stdout.split("resumed with ")[1].split()[0])
    assert 8 < resumed <= 8 + crash_after          # mid-generation
    a, b = np.load(want), np.load(got)
    assert len(set(a[:, 8:].ravel().tolist())) > 5
    assert np.array_equal(a, b)


def test_resume_without_a_log_is_one_line(tmp_path):
    r = run("--log", str(tmp_path / "none.clog"), "--resume")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: ") and "none.clog" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_guard_logs_only_the_new_positions(tmp_path):
    from transformers import StaticCache
    from concordia.hf import GenerationGuard
    _, model, ids = tiny(2)
    cache = StaticCache(config=model.config, max_cache_len=64)
    guard = GenerationGuard(cache, str(tmp_path / "n.clog"))
    model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=10, do_sample=False,
                   stopping_criteria=[guard], pad_token_id=0)
    guard.close()
    stats = [h.result() for h in guard.handles]
    assert stats[0].full and not any(s.full for s in stats[1:])
    # a step writes one position of 2 sequences x 2 heads in 2 layers' K and V: 16 rows of
    # 64 bytes, in at most 16 pages (256 B: the guard's pages are about a row); plus the meta
    # page and the new token of each sequence (a page each, two where it straddles pages)
    assert all(s.pages <= 16 + 1 + 4 for s in stats[1:])
    assert all(s.bytes <= s.pages * 256 for s in stats[1:])


@pytest.mark.parametrize("every", [1, 20])
def test_the_guard_through_the_stream_path_logs_the_cache_as_it_is(tmp_path, every):
    """The guard's checkpoints through the stream path (ring slots, one list for every
    layer's keys and values) on the CPU box, one every `every` tokens: none falls back to a
    synchronous checkpoint (a slot holds a checkpoint's positions), and the log restores
    the cache exactly."""
    from transformers import StaticCache
    from concordia import Runtime
    from concordia.handlers import Checkpointer
    from concordia.hf import GenerationGuard
    from tests.stream_backend import stream_runtime
    _, model, ids = tiny()
    cache = StaticCache(config=model.config, max_cache_len=64)
    path = str(tmp_path / "s.clog")
    guard = GenerationGuard(cache, path, runtime=stream_runtime(), every=every)
    model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=41, do_sample=False,
                   stopping_criteria=[guard], pad_token_id=0)
    guard.close()
    stats = [h.result() for h in guard.handles]
    assert len(stats) == 1 + 40 // every and stats[0].full and not any(s.full for s in stats[1:])
    back = Checkpointer.restore(path, Runtime("reference"))
    written = 8 + (40 // every) * every - 1   # positions the last checkpoint covers
    for i, layer in enumerate(cache.layers):
        got = back[f"k{i}"].numpy().view(np.float32).reshape(layer.keys.shape)
        np.testing.assert_array_equal(got[:, :, :written], layer.keys.numpy()[:, :, :written])


def test_the_next_generate_calls_guard_takes_the_last_ones_ring(tmp_path):
    """Every region of the guard is host-listed (the tokens and their count too), so its
    ring's slots outlive it: the guard of the next generate call over the same cache makes
    no slot or graph of its own (each was 7-8 ms of a call on an H100), and its log holds the
    tokens so far and the cache as generate left them."""
    from transformers import StaticCache
    from concordia import Runtime
    from concordia.handlers import Checkpointer
    from concordia.hf import GenerationGuard
    from tests.stream_backend import stream_runtime
    _, model, ids = tiny()
    cache = StaticCache(config=model.config, max_cache_len=40)
    rt = stream_runtime()
    made, used, reused = [], [], []
    for call in range(2):
        cache.reset()
        path = str(tmp_path / f"c{call}.clog")
        guard = GenerationGuard(cache, path, runtime=rt)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=20, do_sample=False,
                             stopping_criteria=[guard], pad_token_id=0)
        ring = guard.ckpt._writer.staging
        used.append(len(ring.made))   # slots in flight at once (more when the writer lags)
        guard.close()
        made.append(rt.backend.graphs_made)
        reused.append(ring.reused)
        base = guard.handles[0].result()
        cache_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size()
                          for layer in cache.layers)
        # the base image reads the prompt's positions only (the rest of the cache is zeros)
        assert base.full and 0 < base.bytes < cache_bytes * 10 // 40
        back = Checkpointer.restore(path, Runtime("reference"))
        length = int(back["meta"].numpy().view(np.int64)[1])
        assert length == out.shape[1]               # the last call saw every token
        tokens = back["tokens"].numpy().view(np.int64).reshape(1, -1)[:, :length]
        np.testing.assert_array_equal(tokens, out[:, :length].numpy())
        layer = cache.layers[0]
        got = back["k0"].numpy().view(np.float32).reshape(layer.keys.shape)
        np.testing.assert_array_equal(got[:, :, :length - 1], layer.keys.numpy()[:, :, :length - 1])
    # the second call took every slot the first one left, and made only those it needed
    # beyond them (none, unless its writer fell further behind than the first one's)
    assert made[0] == used[0] >= 1 and reused == [0, min(used)]
    assert made[1] - made[0] == used[1] - reused[1]
    import concordia.hf as hf
    hf._RUNTIMES["stream-test"] = rt             # as a guard's own runtime would be
    try:
        assert hf.release_rings() >= 1 and hf.release_rings() == 0
    finally:
        del hf._RUNTIMES["stream-test"]
    assert rt.backend.graphs_destroyed == rt.backend.graphs_made   # every slot given back


def test_beam_search_is_refused_naming_the_reason(tmp_path):
    """Beam search hands the stopping criteria more rows than the cache has sequences (it
    failed deep in the guard with a shape mismatch); its state cannot be resumed anyway."""
    from transformers import StaticCache
    from concordia import ConcordiaError
    from concordia.hf import GenerationGuard
    _, model, ids = tiny()
    cache = StaticCache(config=model.config, max_cache_len=64)
    guard = GenerationGuard(cache, str(tmp_path / "b.clog"))
    with pytest.raises(ConcordiaError, match=r"GenerationGuard protects greedy decoding \(beam"):
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False,
                       num_beams=2, stopping_criteria=[guard], pad_token_id=0)
    guard.close()


def test_resume_with_another_model_names_both_caches(tmp_path):
    """A log resumed with a model of other layers or head sizes is refused in one line (a
    KeyError or a reshape error before)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, StaticCache
    from concordia import ConcordiaError
    from concordia.hf import GenerationGuard
    H, model, ids = tiny()
    cache = StaticCache(config=model.config, max_cache_len=64)
    path = str(tmp_path / "m.clog")
    guard = GenerationGuard(cache, path)
    model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=3, do_sample=False,
                   stopping_criteria=[guard], pad_token_id=0)
    guard.close()
    for change, theirs in (({"num_hidden_layers": 3}, "3 layers, keys of 8,192 bytes"),
                           ({"head_dim": 32}, "2 layers, keys of 16,384 bytes")):
        other = Qwen3ForCausalLM(Qwen3Config(**{**H.SIZES["tiny"], **change},
                                            max_position_embeddings=4096))
        with pytest.raises(ConcordiaError, match="2 layers, keys of 8,192 bytes a layer; this "
                                                 f"model's has {theirs}"):
            GenerationGuard.resume(path, other)
    ids2, _ = GenerationGuard.resume(path, model)   # the right model still resumes
    assert ids2.shape[1] > 8


def test_a_guard_on_a_cache_generate_never_filled_is_one_line(tmp_path):
    import torch
    from transformers import StaticCache
    from concordia import ConcordiaError
    from concordia.hf import GenerationGuard
    _, model, _ = tiny()
    guard = GenerationGuard(StaticCache(config=model.config, max_cache_len=16),
                            str(tmp_path / "e.clog"))
    with pytest.raises(ConcordiaError, match=r"^the cache has no tensors yet: pass the StaticCache "
                                             r"that generate\(cache=\.\.\.\) fills$"):
        guard(torch.zeros(1, 4, dtype=torch.long), None)


def test_a_growing_cache_or_a_log_in_no_directory_is_refused_in_one_line(tmp_path):
    """A DynamicCache failed at the second step with a tensor size mismatch; a log in a
    directory that does not exist raised FileNotFoundError naming a temporary file."""
    from transformers import DynamicCache, StaticCache
    from concordia import ConcordiaError
    from concordia.hf import GenerationGuard
    _, model, ids = tiny()
    with pytest.raises(ConcordiaError, match=r"needs a transformers StaticCache .*got DynamicCache"):
        GenerationGuard(DynamicCache(config=model.config), str(tmp_path / "d.clog"))
    cache = StaticCache(config=model.config, max_cache_len=32)
    path = tmp_path / "no" / "such" / "g.clog"
    guard = GenerationGuard(cache, str(path))
    with pytest.raises(ConcordiaError, match=f"^{path}: cannot create the log: No such file"):
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=3, do_sample=False,
                       stopping_criteria=[guard], pad_token_id=0)


@pytest.mark.parametrize("kinds", ["guard", "plain,gaurd", "plain,guard,guard"])
def test_the_guard_benchmark_refuses_bad_kinds_in_one_line(kinds):
    assert "--kinds takes plain first, then any of guard, calls, calls-assign" in \
        usage_error("hf_guard.py", "--device", "cpu", "--kinds", kinds)


@pytest.mark.parametrize("args", [["--kinds", "guard"], ["--kinds", "plain,idle"],
                                  ["--tokens", "4"]])
def test_the_ablation_benchmark_refuses_bad_arguments_in_one_line(args):
    assert "hf_guard_ablation.py: error: " in usage_error("hf_guard_ablation.py", *args)


def test_the_ablation_benchmark_times_every_kind(tmp_path):
    """Each kind times a generate (on the CPU box: the tiny model) into the --json file."""
    import json
    out = tmp_path / "ablation.json"
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(SCRIPT), "..", "bench",
                                                     "hf_guard_ablation.py"),
                        "--tokens", "8", "--repeats", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    kinds = json.loads(out.read_text())["kinds"]
    assert list(kinds) == ["plain", "guard", "no-appends", "no-pieces", "idle-writer", "no-gc"]
    assert all(k["ms_median"] > 0 and len(k["runs_ms"]) == 1 for k in kinds.values())


@pytest.mark.parametrize("args", [["--tokens", "1"], ["--repeats", "0"]])
def test_the_first_call_benchmark_refuses_bad_arguments_in_one_line(args):
    assert "hf_first_call.py: error: " in usage_error("hf_first_call.py", *args)


def test_the_first_call_benchmark_times_the_base_image_by_part(tmp_path):
    """On the CPU box (the tiny model): each run's first call, the base read inside it and
    written by the writer thread, one base a generate call and a base append a region."""
    import json
    out = tmp_path / "first"
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(SCRIPT), "..", "bench",
                                                     "hf_first_call.py"),
                        "--tokens", "6", "--repeats", "2", "--name", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert len(runs) == 2
    for run in runs:
        assert run["base_read_calls"] == run["base_write_calls"] == 1
        assert "base_checkpoint_calls" not in run and run["base_appends_calls"] >= 4
        assert 0 < run["base_read"] < run["first_call_ms"]


def test_cache_kwargs_names_the_cache_as_the_installed_transformers_does():
    """generate() refuses `cache=` on older transformers and warns on `past_key_values=` on
    recent ones: the name follows the model's forward."""
    import inspect
    import warnings
    _, model, ids = tiny()
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert list(cache_kwargs(model, "c")) == [name]

    class Older:   # a forward as transformers 4.x declares it
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            pass
    assert cache_kwargs(Older(), "c") == {"past_key_values": "c"}
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)   # no deprecation from the name it gives
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
