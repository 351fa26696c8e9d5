"""Pausable kernels: an IR pass that turns each safepoint into a poll of a pause flag, saves the
live values to a context buffer when the flag is set, and builds a resume entry per safepoint.

Context buffer (u32 words, vendor-neutral, little-endian word order for 64-bit values):
    one record per work-item (linear id x + gx*(y + gy*z)), RECORD words each:
        word 0  status: 0 running / not reached, 1 done, 2 paused
        word 1  safepoint id it paused at
        word 2… live values, each 1 word (32-bit and bool) or 2 words (64-bit: low, high)
    then, for kernels with local arrays, one area per work-group holding them.
Pointers never enter the context: kernel parameters are passed again on resume (on the
target they are the migrated regions), so a context holds no address.

Supported: safepoints in loops (`for` / `while`) at the kernel's top level; those loops may
contain nested loops. Kernels with barriers poll group-uniformly (one read, shared through
local memory), so a whole work-group pauses at the same iteration.
"""
from __future__ import annotations

from dataclasses import dataclass

from concordia_ir.errors import ConcordiaError, where
from concordia_ir.builder import IRBuilder, Names
from concordia_ir.ops import Block, Kernel, Op, Value, walk
from concordia_ir.types import PtrType, ScalarType, boolean, i32, i64, u32, u64
from concordia_ir.uniformity import nonuniform_values
from concordia_ir.verifier import verify_kernel

POLL_EVERY_DEFAULT = 256
RUNNING, DONE, PAUSED = 0, 1, 2
FRESH = 0xFFFFFFFF   # word 1 of a just-resumed work-item (see poll_and_save)
HEADER_WORDS = 2


@dataclass(frozen=True)
class Slot:
    name: str
    type: ScalarType
    word: int

    @property
    def words(self) -> int:
        return 2 if self.type.bits == 64 else 1


@dataclass(frozen=True)
class LocalArea:
    name: str
    type: ScalarType
    size: int
    word: int          # offset inside the group's area


@dataclass(frozen=True)
class PausableKernel:
    original: Kernel
    entry: Kernel
    resumes: dict      # safepoint id -> resume Kernel
    slots: dict        # safepoint id -> tuple[Slot]
    record_words: int
    locals: tuple      # LocalArea
    group_words: int
    poll_every: int = POLL_EVERY_DEFAULT

    def context_words(self, n_items: int, n_groups: int) -> int:
        return n_items * self.record_words + n_groups * self.group_words

    @property
    def kernels(self) -> list[Kernel]:
        """Every kernel a context may launch: the entry and one resume kernel a safepoint."""
        return [self.entry, *self.resumes.values()]

    def describe(self) -> dict:
        return {"record_words": self.record_words, "group_words": self.group_words,
                "poll_every": self.poll_every,
                "slots": {str(k): [(s.name, s.type.name, s.word) for s in v]
                          for k, v in self.slots.items()},
                "locals": [(a.name, a.type.name, a.size, a.word) for a in self.locals]}


def _uses(block: Block) -> set[str]:
    used = set()
    for op in walk(block):
        used.update(v.name for v in op.operands)
    return used


def _has_barrier(kernel: Kernel) -> bool:
    return any(op.name == "barrier" for op in kernel.walk())


class _Builder(IRBuilder):
    """IRBuilder plus the context record's word layout (see the module docstring)."""

    broadcast = None   # set while restoring group-uniform values in kernels with barriers

    def ctx_index(self, base: Value, word: int) -> Value:
        return self.op("add", (base, self.const(word)), i64, hint="at")

    def store_word(self, ctx: Value, base: Value, word: int, v: Value):
        self.op("store", (ctx, self.ctx_index(base, word), v))

    def save(self, ctx: Value, base: Value, slot: Slot, v: Value):
        t = slot.type
        if t.bits == 64:
            bits = v if t == u64 else self.op("bitcast", (v,), u64, hint="bits")
            self.store_word(ctx, base, slot.word, self.op("cast", (bits,), u32, hint="lo"))
            hi = self.op("shr", (bits, self.const(32, u64)), u64, hint="hi")
            self.store_word(ctx, base, slot.word + 1, self.op("cast", (hi,), u32, hint="hi"))
        elif t == boolean:
            self.store_word(ctx, base, slot.word, self.op("cast", (v,), u32, hint="b"))
        else:
            self.store_word(ctx, base, slot.word, v if t == u32 else self.op("bitcast", (v,), u32))

    def load_word(self, ctx: Value, base: Value, word: int) -> Value:
        w = self.op("load", (ctx, self.ctx_index(base, word)), u32, hint="w")
        return self.broadcast(w) if self.broadcast else w

    def restore(self, ctx: Value, base: Value, slot: Slot, name: str):
        """Defines a value called `name` (the original's name) from the context."""
        t, out = slot.type, Value(name, slot.type)
        if t.bits == 64:
            lo = self.op("cast", (self.load_word(ctx, base, slot.word),), u64, hint="lo")
            hi = self.op("cast", (self.load_word(ctx, base, slot.word + 1),), u64, hint="hi")
            bits = self.op("or", (lo, self.op("shl", (hi, self.const(32, u64)), u64)), u64)
            self.ops.append(Op("bitcast" if t != u64 else "add", (bits,) if t != u64 else
                               (bits, self.const(0, u64)), (out,), loc=self.loc))
        elif t == boolean:
            w = self.load_word(ctx, base, slot.word)
            self.ops.append(Op("ne", (w, self.const(0, u32)), (out,), loc=self.loc))
        elif t == u32:
            w = self.load_word(ctx, base, slot.word)
            self.ops.append(Op("add", (w, self.const(0, u32)), (out,), loc=self.loc))
        else:
            self.ops.append(Op("bitcast", (self.load_word(ctx, base, slot.word),), (out,), loc=self.loc))


def strip_mine(kernel: Kernel, chunk: int) -> Kernel:
    """Split each top-level counted loop that has a safepoint and a positive constant step into
    an outer loop over chunks of `chunk` iterations (safepoint at its head) and an inner loop
    without one: the pause flag is then read once per chunk and the inner loop stays tight."""
    consts = {op.results[0].name: op.attr("value") for op in kernel.body.ops
              if op.name == "const" and op.results and not op.results[0].type.is_float}
    fresh = Names.of(kernel, prefix="cc.").value
    out = []
    for op in kernel.body.ops:
        body = op.regions[0] if op.name == "for" else None
        step = consts.get(op.operands[2].name) if body is not None else None
        if not (body is not None and body.ops and body.ops[0].name == "safepoint"
                and isinstance(step, int) and step > 0 and chunk > 1):
            out.append(op)
            continue
        lo, hi, st = op.operands[:3]
        t = lo.type
        big = fresh("chunk", t)
        out.append(Op("const", (), (big,), (("value", step * chunk),), loc=op.loc))
        t0 = fresh("t0", t)
        outer_args = (t0,) + tuple(fresh(a.name.replace(".", "_"), a.type) for a in body.args[1:])
        lim, fwd, ok, ub = fresh("lim", t), fresh("fwd", boolean), fresh("in", boolean), fresh("ub", t)
        inner_res = tuple(fresh("r", a.type) for a in body.args[1:])
        inner = Op("for", (t0, ub, st) + outer_args[1:], inner_res, (),
                   (Block(body.args, body.ops[1:]),), op.loc)
        outer_body = (body.ops[0],
                      Op("add", (t0, big), (lim,), loc=op.loc),
                      Op("gt", (lim, t0), (fwd,), loc=op.loc),      # no wrap past the type's end
                      Op("lt", (lim, hi), (ok,), loc=op.loc),
                      Op("and", (fwd, ok), (fresh("both", boolean),), loc=op.loc))
        both = outer_body[-1].results[0]
        outer_body += (Op("select", (both, lim, hi), (ub,), loc=op.loc), inner,
                       Op("yield", inner_res, loc=op.loc))
        out.append(Op("for", (lo, hi, big) + op.operands[3:], op.results, (("chunk", chunk),),
                      (Block(outer_args, outer_body),), op.loc))
    return verify_kernel(Kernel(kernel.name, kernel.params, Block((), tuple(out)), kernel.loc))


def make_pausable(kernel: Kernel, poll_every: int = POLL_EVERY_DEFAULT) -> PausableKernel:
    """The pass. Raises ConcordiaError (with file:line) for safepoints it cannot support.
    Counted loops poll the pause flag every `poll_every` iterations (a power of two), while
    loops every iteration."""
    if poll_every < 1 or poll_every & (poll_every - 1):
        raise ConcordiaError(f"poll_every must be a power of two, got {poll_every}")
    p = _Pausable(kernel, strip_mine(kernel, poll_every), poll_every)
    entry = p.entry_kernel()
    resumes = {sp: p.resume_kernel(sp) for sp in p.loops}
    return PausableKernel(kernel, entry, resumes, p.slots, p.record, tuple(p.areas), p.group_words,
                          poll_every)


class _Pausable:
    """The pass's parts: where the safepoints are (find_loops), what is live there and where
    it goes in the context (layout), the poll-and-save code at each loop head, and the entry
    and resume kernels built from them."""

    def __init__(self, original: Kernel, kernel: Kernel, poll_every: int):
        self.original, self.kernel, self.poll_every = original, kernel, poll_every
        self.top = list(kernel.body.ops)
        self.names = Names.of(kernel, prefix="cc.")
        self.pause = self.names.value("pause", PtrType(i32))
        self.ctx = self.names.value("ctx", PtrType(u32))
        self.barriers = _has_barrier(kernel)
        self.flag_buf = self.names.value("flag", PtrType(i32, "local")) if self.barriers else None
        self.loops = self.find_loops()
        self.local_ops = [op for op in self.top if op.name == "local_alloc"]
        self.areas, self.group_words = self.local_layout()
        self.slots, self.record = self.live_layout()
        self.params = kernel.params + (self.pause, self.ctx)

    def builder(self, loc=None) -> _Builder:
        return _Builder(self.names, loc if loc is not None else self.kernel.loc)

    def fail(self, loc, msg: str):
        raise ConcordiaError(f"{where(loc)}kernel '{self.kernel.name}'{msg}")

    # -- liveness and layout
    def find_loops(self) -> dict:
        """safepoint id -> index of its top-level loop; refuses safepoints elsewhere."""
        loops = {}
        for idx, op in enumerate(self.top):
            body = op.regions[0] if op.name == "for" else (op.regions[1] if op.name == "while" else None)
            for inner in (x for region in op.regions for x in walk(region)):
                if inner.name != "safepoint":
                    continue
                if body is None or not body.ops or body.ops[0] is not inner:
                    self.fail(inner.where, f": safepoint {inner.attr('id')} is not at the head of a "
                              "top-level loop; pausing supports safepoints in loops at the kernel's "
                              "top level (guard with an early `return` instead of wrapping the "
                              "loop in an `if`)")
                loops[inner.attr("id")] = idx
        if not loops:
            self.fail(self.kernel.loc, " has no safepoint(); put safepoint() first in a loop body "
                                       "to make it pausable")
        for idx in loops.values():
            op = self.top[idx]
            if op.name == "while":
                before = op.regions[0]
                cond = before.ops[-1]
                if cond.name != "condition" or tuple(cond.operands[1:]) != before.args:
                    self.fail(op.where, ": this while loop does not forward its carried values "
                                        "unchanged; it cannot pause")
        return loops

    def local_layout(self):
        areas, words = [], 0
        for op in self.local_ops:
            t = op.results[0].type.elem
            areas.append(LocalArea(op.results[0].name, t, op.attr("size"), words))
            words += op.attr("size") * (2 if t.bits == 64 else 1)
        return areas, words

    def live_layout(self):
        """Live values at each safepoint (loop state, then top-level values used in or after
        the loop) and their words in the record."""
        slots, record = {}, HEADER_WORDS
        params = {p.name for p in self.kernel.params}
        for sp, idx in self.loops.items():
            loop = self.top[idx]
            # the loop's start and initial carried values are replaced by the saved loop state
            kept_operands = loop.operands[0:3] if loop.name == "for" else ()   # lo: the poll stride
            used = {v.name for v in kept_operands} | set().union(*[_uses(r) for r in loop.regions])
            for later in self.top[idx + 1:]:
                used |= {v.name for v in later.operands} | set().union(*[_uses(r) for r in later.regions])
            live = [r for op in self.top[:idx] for r in op.results
                    if r.name in used and r.name not in params and not isinstance(r.type, PtrType)]
            out, word = [], HEADER_WORDS
            for v in list(_loop_state(loop)) + live:
                out.append(Slot(v.name, v.type, word))
                word += out[-1].words
            slots[sp] = tuple(out)
            record = max(record, word)
        return slots, record

    # -- code shared by the entry and the resume kernels
    def prologue(self, b: _Builder):
        """The work-item's record base, and (with local arrays) the group's area base."""
        def lin(ids, sizes):   # x + sx * (y + sy * z), in i64
            return b.op("add", (ids[0], b.op("mul", (sizes[0], b.op("add", (ids[1], b.op(
                "mul", (sizes[1], ids[2]), i64)), i64)), i64)), i64)

        def dim(name, k):
            return b.op("cast", (b.op(name, (), i32, (("dim", k),), hint=name),), i64, hint=name)
        d = [dim("global_id", k) for k in range(3)]
        s = [dim("global_size", k) for k in range(3)]
        base = b.op("mul", (lin(d, s), b.const(self.record)), i64, hint="rec")
        if not self.areas:
            return base, None
        glin = lin([dim("group_id", k) for k in range(3)], [dim("num_groups", k) for k in (0, 1)])
        items = b.op("mul", (b.op("mul", (s[0], s[1]), i64), s[2]), i64)
        gbase = b.op("add", (b.op("mul", (items, b.const(self.record)), i64),
                             b.op("mul", (glin, b.const(self.group_words)), i64)), i64, hint="grp")
        return base, gbase

    def local_copy(self, b: _Builder, gbase: Value, to_ctx: bool):
        """Each work-item copies a strided share of the group's local arrays."""
        lid = b.op("local_id", (), i32, (("dim", 0),))
        lsz = b.op("local_size", (), i32, (("dim", 0),))
        ctx = self.ctx
        for a, op in zip(self.areas, self.local_ops):
            if a.type.bits == 64:
                self.fail(None, ": 64-bit local arrays cannot be paused yet")
            arr, iv = op.results[0], self.names.value("j", i32)
            inner = b.child()
            at = inner.op("add", (gbase, inner.op("cast", (iv,), i64)), i64)
            if a.word:
                at = inner.op("add", (at, inner.const(a.word)), i64)
            if to_ctx:
                v = inner.op("load", (arr, iv), a.type)
                inner.op("store", (ctx, at, v if a.type == u32 else inner.op("bitcast", (v,), u32)))
            else:
                w = inner.op("load", (ctx, at), u32)
                inner.op("store", (arr, iv, w if a.type == u32 else inner.op("bitcast", (w,), a.type)))
            b.emit("for", (lid, b.const(a.size, i32), lsz), regions=(inner.region((iv,)),))

    def group_uniform(self, b: _Builder, v: Value) -> Value:
        """Work-item 0's value of v, for the whole group (so that all of it pauses or none)."""
        lid0 = b.op("eq", (b.op("local_id", (), i32, (("dim", 0),)), b.const(0, i32)), boolean)
        then = b.child()
        then.op("store", (self.flag_buf, then.const(0, i32), v))
        b.if_(lid0, then)
        b.op("barrier")
        out = b.op("load", (self.flag_buf, b.const(0, i32)), i32)
        b.op("barrier")
        return out

    def pause_requested(self, b: _Builder, loop: Op, base: Value) -> Value:
        """Reads the flag: true when a pause is asked for and this work-item is not fresh from
        a resume (a resumed work-item runs at least one iteration before it pauses again: its
        resume entry marks word 1 FRESH, and the first poll that sees the flag clears it)."""
        f = b.op("load", (self.pause, b.const(0, i32)), i32, (("volatile", 1),))
        if self.barriers:
            f = self.group_uniform(b, f)
        asked = b.op("ne", (f, b.const(0, i32)), boolean)
        check = b.child()
        fresh = check.op("eq", (check.load_word(self.ctx, base, 1), check.const(FRESH, u32)), boolean)
        clear = check.child()
        clear.store_word(self.ctx, base, 1, clear.const(0, u32))
        check.if_(fresh, clear)
        check.yield_(check.op("not", (fresh,), boolean))
        no = b.child()
        no.yield_(no.const(0, boolean))
        c, = b.if_(asked, check, no, (self.names.value("pause_now", boolean),))
        if self.barriers:
            c = b.op("ne", (self.group_uniform(b, b.op("cast", (c,), i32)), b.const(0, i32)), boolean)
        return c

    def poll_and_save(self, sp: int, loop: Op, base: Value, gbase: Value | None) -> list[Op]:
        out, poll = self.builder(loop.loc), self.builder(loop.loc)
        c = self.pause_requested(poll, loop, base)
        if loop.name == "for" and self.poll_every > 1 and not loop.attr("chunk"):
            # The flag lives where the host can write it while the kernel runs: reading it costs
            # a trip to L2 or further. Counted loops read it every `poll_every` iterations.
            iv, lo = loop.regions[0].args[0], loop.operands[0]
            t = iv.type
            k = out.op("and", (out.op("sub", (iv, lo), t), out.const(self.poll_every - 1, t)), t)
            due = out.op("eq", (k, out.const(0, t)), boolean)
            poll.yield_(c)
            no = out.child()
            no.yield_(no.const(0, boolean))
            c, = out.if_(due, poll, no, (self.names.value("poll", boolean),))
        else:
            out.ops.extend(poll.ops)
        save = out.child()
        values = {v.name: v for v in _loop_state(loop)}
        values.update((r.name, r) for op in self.top for r in op.results)
        for slot in self.slots[sp]:
            save.save(self.ctx, base, slot, values[slot.name])
        if self.areas:
            self.local_copy(save, gbase, to_ctx=True)
        save.store_word(self.ctx, base, 1, save.const(sp, u32))
        save.store_word(self.ctx, base, 0, save.const(PAUSED, u32))
        save.return_((("paused", 1),))
        out.if_(c, save)
        return out.ops

    def mark_done(self, block: Block, base: Value) -> Block:
        ops = []
        for op in block.ops:
            if op.regions:
                op = Op(op.name, op.operands, op.results, op.attrs,
                        tuple(self.mark_done(r, base) for r in op.regions), op.loc)
            if op.name == "return" and not op.attr("paused"):
                b = self.builder(op.loc)
                b.store_word(self.ctx, base, 0, b.const(DONE, u32))
                ops.extend(b.ops)
            ops.append(op)
        return Block(block.args, tuple(ops))

    def instrument_loop(self, loop: Op, sp: int, base, gbase) -> Op:
        body_index = 0 if loop.name == "for" else 1
        body = loop.regions[body_index]
        new_body = Block(body.args, (body.ops[0], *self.poll_and_save(sp, loop, base, gbase),
                                     *body.ops[1:]))
        regions = list(loop.regions)
        regions[body_index] = new_body
        return Op(loop.name, loop.operands, loop.results, loop.attrs, tuple(regions), loop.loc)

    # -- the kernels
    def locals_first(self) -> list[Op]:
        ops = list(self.local_ops)
        if self.flag_buf is not None:
            ops.append(Op("local_alloc", (), (self.flag_buf,), (("size", 1),), loc=self.kernel.loc))
        return ops

    def entry_kernel(self) -> Kernel:
        pb = self.builder()
        self.base, self.gbase = self.prologue(pb)
        at_loop = {i: s for s, i in self.loops.items()}
        self.body_ops = [self.instrument_loop(op, at_loop[i], self.base, self.gbase)
                         if i in at_loop else op
                         for i, op in enumerate(self.top) if op.name != "local_alloc"]
        body = self.mark_done(Block((), tuple(self.locals_first() + pb.ops + self.body_ops)), self.base)
        self.body_ops = list(body.ops[len(self.locals_first()) + len(pb.ops):])
        return self.verified(Kernel(f"{self.kernel.name}_pausable", self.params, body, self.kernel.loc))

    def resume_kernel(self, sp: int) -> Kernel:
        """Restore, re-enter the loop of safepoint sp, run the rest of the kernel."""
        idx, loc, ctx = self.loops[sp], self.kernel.loc, self.ctx
        rb = self.builder()
        rbase, rgbase = self.prologue(rb)
        # only work-items paused at this safepoint continue
        mine = rb.op("and", (rb.op("eq", (rb.load_word(ctx, rbase, 0), rb.const(PAUSED, u32)), boolean),
                             rb.op("eq", (rb.load_word(ctx, rbase, 1), rb.const(sp, u32)), boolean)),
                     boolean)
        if self.barriers:   # a group pauses as a whole: decide for it as a whole
            m = self.group_uniform(rb, rb.op("cast", (mine,), i32))
            mine = rb.op("ne", (m, rb.const(0, i32)), boolean)
        leave = rb.child()
        leave.return_()
        rb.if_(rb.op("not", (mine,), boolean), leave)
        rb.store_word(ctx, rbase, 0, rb.const(RUNNING, u32))
        rb.store_word(ctx, rbase, 1, rb.const(FRESH, u32))
        if self.areas:
            self.local_copy(rb, rgbase, to_ctx=False)
            rb.op("barrier")
        original_loop = self.top[idx]
        state = _loop_state(original_loop)
        self.restore_slots(rb, sp, rbase, state)
        restored = {s.name: Value(_restored_name(s.name, state), s.type) for s in self.slots[sp]}
        loop = self.instrument_loop(original_loop, sp, rbase, rgbase)
        if loop.name == "for":
            hi, step = loop.operands[1:3]
            ops_in = (restored[state[0].name], hi, step) + tuple(restored[a.name] for a in state[1:])
        else:
            ops_in = tuple(restored[a.name] for a in state)
        resumed_loop = Op(loop.name, ops_in, loop.results, loop.attrs, loop.regions, loop.loc)
        kept = [op for op in self.top if op.name != "local_alloc"]
        rest = self.body_ops[kept.index(original_loop) + 1:]
        body = Block((), tuple(self.locals_first() + rb.ops + [resumed_loop] + rest))
        body = _rename_prologue(body, self.base, rbase, self.gbase, rgbase)
        return self.verified(Kernel(f"{self.kernel.name}_resume{sp}", self.params, body, loc))

    def restore_slots(self, rb: _Builder, sp: int, rbase: Value, state):
        varying = nonuniform_values(self.kernel) if self.barriers else set()
        for slot in self.slots[sp]:
            if self.barriers and slot.name not in varying:
                # the whole group holds this value: take work-item 0's, so that the verifier
                # (and the hardware) see loop bounds that are the same across the group
                rb.broadcast = lambda w: rb.op("bitcast", (self.group_uniform(
                    rb, rb.op("bitcast", (w,), i32)),), u32)
            rb.restore(self.ctx, rbase, slot, _restored_name(slot.name, state))
            rb.broadcast = None

    def verified(self, k: Kernel) -> Kernel:
        try:
            return verify_kernel(k)
        except ConcordiaError as e:
            raise ConcordiaError(f"kernel '{self.original.name}' cannot be made pausable: {e}") from None


def _loop_state(loop: Op):
    """The values a loop carries from one iteration to the next (a for's include its iv)."""
    return loop.regions[0].args if loop.name == "for" else loop.regions[1].args


def _restored_name(name: str, loop_state) -> str:
    """Loop-state values are restored under a new name (they are region arguments inside the
    loop); live-ins keep their own name so that the cloned ops find them."""
    return f"cc.resume.{name}" if any(a.name == name for a in loop_state) else name


def _rename_prologue(block: Block, base, rbase, gbase, rgbase) -> Block:
    """The cloned ops refer to the entry prologue's record base; point them at the resume one."""
    mapping = {base.name: rbase}
    if gbase is not None:
        mapping[gbase.name] = rgbase

    def fix(b: Block) -> Block:
        ops = []
        for op in b.ops:
            operands = tuple(mapping.get(v.name, v) for v in op.operands)
            regions = tuple(fix(r) for r in op.regions)
            ops.append(Op(op.name, operands, op.results, op.attrs, regions, op.loc))
        return Block(b.args, tuple(ops))
    return fix(block)
