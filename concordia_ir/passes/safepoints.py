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


class _Names:
    def __init__(self):
        self.n = 0

    def fresh(self, hint: str, t) -> Value:
        self.n += 1
        return Value(f"cc.{hint}.{self.n}", t)


def _uses(block: Block) -> set[str]:
    used = set()
    for op in walk(block):
        used.update(v.name for v in op.operands)
    return used


def _has_barrier(kernel: Kernel) -> bool:
    return any(op.name == "barrier" for op in kernel.walk())


class _Builder:
    """Emits op sequences into a list; small helpers keep the pass readable."""

    def __init__(self, names: _Names, loc):
        self.ops: list[Op] = []
        self.names, self.loc = names, loc

    def op(self, name, operands=(), t=None, attrs=(), regions=(), hint="v") -> Value | None:
        res = (self.names.fresh(hint, t),) if t is not None else ()
        self.ops.append(Op(name, tuple(operands), res, tuple(attrs), tuple(regions), self.loc))
        return res[0] if res else None

    def const(self, value: int, t=i64) -> Value:
        return self.op("const", (), t, (("value", value),), hint="k")

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

    broadcast = None   # set while restoring group-uniform values in kernels with barriers

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
    n = [0]

    def fresh(hint, t):
        n[0] += 1
        return Value(f"cc.{hint}.s{n[0]}", t)
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
    original = kernel
    kernel = strip_mine(kernel, poll_every)
    names = _Names()
    top = list(kernel.body.ops)
    loops = {}   # safepoint id -> index of its top-level loop
    for idx, op in enumerate(top):
        for region in op.regions:
            for inner in walk(region):
                if inner.name == "safepoint":
                    body = op.regions[0] if op.name == "for" else (op.regions[1] if op.name == "while" else None)
                    if body is None or not body.ops or body.ops[0] is not inner:
                        raise ConcordiaError(
                            f"{where(inner.where)}kernel '{kernel.name}': safepoint {inner.attr('id')} "
                            "is not at the head of a top-level loop; pausing supports safepoints in "
                            "loops at the kernel's top level (guard with an early `return` instead "
                            "of wrapping the loop in an `if`)")
                    loops[inner.attr("id")] = idx
    if not loops:
        raise ConcordiaError(f"{where(kernel.loc)}kernel '{kernel.name}' has no safepoint(); put "
                             "safepoint() first in a loop body to make it pausable")
    for sp, idx in loops.items():
        op = top[idx]
        if op.name == "while":
            before, after = op.regions
            cond = before.ops[-1]
            if cond.name != "condition" or tuple(cond.operands[1:]) != before.args:
                raise ConcordiaError(f"{where(op.where)}kernel '{kernel.name}': this while loop "
                                     "does not forward its carried values unchanged; it cannot pause")

    barriers = _has_barrier(kernel)
    loc = kernel.loc
    pause = Value("cc.pause", PtrType(i32))
    ctx = Value("cc.ctx", PtrType(u32))
    local_ops = [op for op in top if op.name == "local_alloc"]
    areas, gw = [], 0
    for op in local_ops:
        t = op.results[0].type.elem
        words = op.attr("size") * (2 if t.bits == 64 else 1)
        areas.append(LocalArea(op.results[0].name, t, op.attr("size"), gw))
        gw += words

    # live values at each safepoint: loop state + top-level values used in or after the loop
    slots, record = {}, HEADER_WORDS
    params = {p.name for p in kernel.params}
    for sp, idx in loops.items():
        loop = top[idx]
        # the loop's start and initial carried values are replaced by the saved loop state
        kept_operands = loop.operands[0:3] if loop.name == "for" else ()   # lo: the poll stride
        used = {v.name for v in kept_operands} | set().union(*[_uses(r) for r in loop.regions])
        for later in top[idx + 1:]:
            used |= {v.name for v in later.operands} | set().union(*[_uses(r) for r in later.regions])
        live = []
        for op in top[:idx]:
            for r in op.results:
                if r.name in used and r.name not in params and not isinstance(r.type, PtrType):
                    live.append(r)
        state = loop.regions[0].args if loop.name == "for" else loop.regions[1].args
        out, word = [], HEADER_WORDS
        for v in list(state) + live:
            s = Slot(v.name, v.type, word)
            out.append(s)
            word += s.words
        slots[sp] = tuple(out)
        record = max(record, word)

    # common prologue: the work-item's record base, and the group's local-area base
    def prologue(b: _Builder):
        d = [b.op("cast", (b.op(n, (), i32, (("dim", k),), hint=n),), i64, hint=n)
             for k, n in ((0, "global_id"), (1, "global_id"), (2, "global_id"))]
        s = [b.op("cast", (b.op("global_size", (), i32, (("dim", k),)),), i64) for k in (0, 1)]
        lin = b.op("add", (d[0], b.op("mul", (s[0], b.op("add", (d[1], b.op("mul", (s[1], d[2]), i64)), i64)), i64)), i64)
        base = b.op("mul", (lin, b.const(record)), i64, hint="rec")
        gbase = None
        if areas:
            g = [b.op("cast", (b.op("group_id", (), i32, (("dim", k),)),), i64) for k in range(3)]
            n = [b.op("cast", (b.op("num_groups", (), i32, (("dim", k),)),), i64) for k in (0, 1)]
            glin = b.op("add", (g[0], b.op("mul", (n[0], b.op("add", (g[1], b.op("mul", (n[1], g[2]), i64)), i64)), i64)), i64)
            items = b.op("mul", (b.op("mul", (s[0], b.op("cast", (b.op("global_size", (), i32, (("dim", 1),)),), i64)), i64),
                                 b.op("cast", (b.op("global_size", (), i32, (("dim", 2),)),), i64)), i64)
            gbase = b.op("add", (b.op("mul", (items, b.const(record)), i64),
                                 b.op("mul", (glin, b.const(gw)), i64)), i64, hint="grp")
        return base, gbase

    def local_copy(b: _Builder, gbase: Value, to_ctx: bool):
        """Each work-item copies a strided share of the group's local arrays."""
        lid = b.op("local_id", (), i32, (("dim", 0),))
        lsz = b.op("local_size", (), i32, (("dim", 0),))
        for a, op in zip(areas, local_ops):
            arr = op.results[0]
            iv = names.fresh("j", i32)
            inner = _Builder(names, loc)
            at = inner.op("add", (gbase, inner.op("cast", (iv,), i64)), i64)
            if a.word:
                at = inner.op("add", (at, inner.const(a.word)), i64)
            if a.type.bits == 64:
                raise ConcordiaError(f"kernel '{kernel.name}': 64-bit local arrays cannot be paused yet")
            if to_ctx:
                v = inner.op("load", (arr, iv), a.type)
                inner.op("store", (ctx, at, v if a.type == u32 else inner.op("bitcast", (v,), u32)))
            else:
                w = inner.op("load", (ctx, at), u32)
                inner.op("store", (arr, iv, w if a.type == u32 else inner.op("bitcast", (w,), a.type)))
            inner.ops.append(Op("yield", loc=loc))
            b.ops.append(Op("for", (lid, b.const(a.size, i32), lsz), (), (), (Block((iv,), tuple(inner.ops)),), loc))

    def group_uniform(b: _Builder, v: Value, at) -> Value:
        """Work-item 0's value of v, for the whole group (so that all of it pauses or none)."""
        lid0 = b.op("eq", (b.op("local_id", (), i32, (("dim", 0),)), b.const(0, i32)), boolean)
        then = _Builder(names, at)
        then.op("store", (flag_buf, then.const(0, i32), v))
        then.ops.append(Op("yield", loc=at))
        b.ops.append(Op("if", (lid0,), (), (), (Block((), tuple(then.ops)),
                                                 Block((), (Op("yield", loc=at),))), at))
        b.op("barrier")
        out = b.op("load", (flag_buf, b.const(0, i32)), i32)
        b.op("barrier")
        return out

    def poll_and_save(sp: int, loop: Op, base: Value, gbase: Value | None) -> list[Op]:
        out = _Builder(names, loop.loc)
        b = _Builder(names, loop.loc)
        f = b.op("load", (pause, b.const(0, i32)), i32, (("volatile", 1),))
        if barriers:
            f = group_uniform(b, f, loop.loc)
        c = b.op("ne", (f, b.const(0, i32)), boolean)
        # A resumed work-item runs at least one iteration before it pauses again: its resume
        # entry marks word 1 FRESH, and the first poll that sees the flag clears the mark.
        check = _Builder(names, loop.loc)
        fresh = check.op("eq", (check.load_word(ctx, base, 1), check.const(FRESH, u32)), boolean)
        clear = _Builder(names, loop.loc)
        clear.store_word(ctx, base, 1, clear.const(0, u32))
        clear.ops.append(Op("yield", loc=loop.loc))
        check.ops.append(Op("if", (fresh,), (), (), (Block((), tuple(clear.ops)),
                                                      Block((), (Op("yield", loc=loop.loc),))), loop.loc))
        check.ops.append(Op("yield", (check.op("not", (fresh,), boolean),), loc=loop.loc))
        no = _Builder(names, loop.loc)
        no.ops.append(Op("yield", (no.op("const", (), boolean, (("value", 0),)),), loc=loop.loc))
        c = names.fresh("pause_now", boolean)
        b.ops.append(Op("if", (b.ops[-1].results[0],), (c,), (), (Block((), tuple(check.ops)),
                                                                  Block((), tuple(no.ops))), loop.loc))
        if barriers:
            c = b.op("ne", (group_uniform(b, b.op("cast", (c,), i32), loop.loc), b.const(0, i32)), boolean)
        if loop.name == "for" and poll_every > 1 and not loop.attr("chunk"):
            # The flag lives where the host can write it while the kernel runs: reading it costs
            # a trip to L2 or further. Counted loops read it every `poll_every` iterations.
            iv, lo = loop.regions[0].args[0], loop.operands[0]
            t = iv.type
            k = out.op("and", (out.op("sub", (iv, lo), t), out.op("const", (), t, (("value", poll_every - 1),))), t)
            due = out.op("eq", (k, out.op("const", (), t, (("value", 0),))), boolean)
            b.ops.append(Op("yield", (c,), loc=loop.loc))
            no = _Builder(names, loop.loc)
            no.ops.append(Op("yield", (no.op("const", (), boolean, (("value", 0),)),), loc=loop.loc))
            c = names.fresh("poll", boolean)
            out.ops.append(Op("if", (due,), (c,), (), (Block((), tuple(b.ops)), Block((), tuple(no.ops))),
                              loop.loc))
        else:
            out.ops.extend(b.ops)
        b = out
        save = _Builder(names, loop.loc)
        state = loop.regions[0].args if loop.name == "for" else loop.regions[1].args
        values = {v.name: v for v in state}
        for op in top:
            for r in op.results:
                values[r.name] = r
        for slot in slots[sp]:
            save.save(ctx, base, slot, values[slot.name])
        if areas:
            local_copy(save, gbase, to_ctx=True)
        save.store_word(ctx, base, 1, save.const(sp, u32))
        save.store_word(ctx, base, 0, save.const(PAUSED, u32))
        save.ops.append(Op("return", attrs=(("paused", 1),), loc=loop.loc))
        b.ops.append(Op("if", (c,), (), (), (Block((), tuple(save.ops)), Block((), (Op("yield", loc=loop.loc),))), loop.loc))
        return b.ops

    flag_buf = Value("cc.flag", PtrType(i32, "local")) if barriers else None

    def mark_done(block: Block, base: Value) -> Block:
        ops = []
        for op in block.ops:
            if op.regions:
                op = Op(op.name, op.operands, op.results, op.attrs,
                        tuple(mark_done(r, base) for r in op.regions), op.loc)
            if op.name == "return" and not op.attr("paused"):
                b = _Builder(names, op.loc)
                b.store_word(ctx, base, 0, b.const(DONE, u32))
                ops.extend(b.ops)
            ops.append(op)
        return Block(block.args, tuple(ops))

    def instrument_loop(loop: Op, sp: int, base, gbase) -> Op:
        body_index = 0 if loop.name == "for" else 1
        body = loop.regions[body_index]
        new_body = Block(body.args, (body.ops[0], *poll_and_save(sp, loop, base, gbase),
                                     *body.ops[1:]))
        regions = list(loop.regions)
        regions[body_index] = new_body
        return Op(loop.name, loop.operands, loop.results, loop.attrs, tuple(regions), loop.loc)

    # ---- the entry kernel
    pb = _Builder(names, loc)
    locals_first = [op for op in top if op.name == "local_alloc"]
    if flag_buf is not None:
        locals_first.append(Op("local_alloc", (), (flag_buf,), (("size", 1),), loc=loc))
    base, gbase = prologue(pb)
    body_ops = []
    for idx, op in enumerate(top):
        if op.name == "local_alloc":
            continue
        sp = next((s for s, i in loops.items() if i == idx), None)
        body_ops.append(instrument_loop(op, sp, base, gbase) if sp is not None else op)
    entry_body = mark_done(Block((), tuple(locals_first + pb.ops + body_ops)), base)
    params = kernel.params + (pause, ctx)
    entry = _verify(Kernel(f"{kernel.name}_pausable", params, entry_body, kernel.loc), kernel)

    # ---- one resume entry per safepoint: restore, re-enter the loop, run the rest
    resumes = {}
    instrumented = [op for op in entry_body.ops]
    start = len(locals_first) + len(pb.ops)
    top_after_prologue = instrumented[start:]
    kept = [op for op in top if op.name != "local_alloc"]
    for sp, idx in loops.items():
        rb = _Builder(names, loc)
        rbase, rgbase = prologue(rb)
        # only work-items paused at this safepoint continue
        st = rb.load_word(ctx, rbase, 0)
        which = rb.load_word(ctx, rbase, 1)
        mine = rb.op("and", (rb.op("eq", (st, rb.const(PAUSED, u32)), boolean),
                              rb.op("eq", (which, rb.const(sp, u32)), boolean)), boolean)
        if barriers:   # a group pauses as a whole: decide for it as a whole
            m = group_uniform(rb, rb.op("cast", (mine,), i32), loc)
            mine = rb.op("ne", (m, rb.const(0, i32)), boolean)
        other = rb.op("not", (mine,), boolean)
        rb.ops.append(Op("if", (other,), (), (), (Block((), (Op("return", loc=loc),)),
                                                  Block((), (Op("yield", loc=loc),))), loc))
        rb.store_word(ctx, rbase, 0, rb.const(RUNNING, u32))
        rb.store_word(ctx, rbase, 1, rb.const(FRESH, u32))
        if areas:
            local_copy(rb, rgbase, to_ctx=False)
            rb.op("barrier")
        loop_pos = kept.index(top[idx])
        state = top[idx].regions[0].args if top[idx].name == "for" else top[idx].regions[1].args
        varying = nonuniform_values(kernel) if barriers else set()
        for slot in slots[sp]:
            if barriers and slot.name not in varying:
                # the whole group holds this value: take work-item 0's, so that the verifier
                # (and the hardware) see loop bounds that are the same across the group
                rb.broadcast = lambda w: rb.op("bitcast", (group_uniform(
                    rb, rb.op("bitcast", (w,), i32), loc),), u32)
            rb.restore(ctx, rbase, slot, _restored_name(slot.name, state))
            rb.broadcast = None
        restored = {s.name: Value(_restored_name(s.name, state), s.type) for s in slots[sp]}
        loop = instrument_loop(top[idx], sp, rbase, rgbase)
        if loop.name == "for":
            lo, hi, step = loop.operands[:3]
            ops_in = (restored[state[0].name], hi, step) + tuple(restored[a.name] for a in state[1:])
        else:
            ops_in = tuple(restored[a.name] for a in state)
        resumed_loop = Op(loop.name, ops_in, loop.results, loop.attrs, loop.regions, loop.loc)
        rest = top_after_prologue[loop_pos + 1:]
        rbody = Block((), tuple(locals_first + rb.ops + [resumed_loop] + rest))
        rbody = _rename_prologue(rbody, base, rbase, gbase, rgbase)
        resumes[sp] = _verify(Kernel(f"{kernel.name}_resume{sp}", params, rbody, kernel.loc), kernel)
    return PausableKernel(original, entry, resumes, slots, record, tuple(areas), gw, poll_every)


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


def _verify(k: Kernel, original: Kernel) -> Kernel:
    try:
        return verify_kernel(k)
    except ConcordiaError as e:
        raise ConcordiaError(f"kernel '{original.name}' cannot be made pausable: {e}") from None
