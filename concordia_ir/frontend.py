"""`@kernel`: a restricted, typed subset of Python turned into IR by walking its AST.

Python variables become SSA values; a variable reassigned inside an `if` or a loop becomes a
result of that op (a loop-carried value for loops). Literals take the type of the value they
meet (`x * 2.0` with x: f32 is an f32 multiply); alone, ints are i32 and floats f32.
Everything outside the subset is refused with file:line of the user's source.
"""
from __future__ import annotations

import ast
import builtins as _py
import inspect
import textwrap
from dataclasses import dataclass

from .errors import ConcordiaError, KernelSyntaxError
from .builder import IRBuilder, Names
from .interpreter import trunc_div
from .opdefs import OPS
from .ops import Block, Kernel, Loc, Module, Op, Value
from .printer import float_to_bits, print_module
from .types import PtrType, ScalarType, Type, boolean, f32, i32
from .verifier import verify_kernel

_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.FloorDiv: "div",
           ast.Mod: "rem", ast.BitAnd: "and", ast.BitOr: "or", ast.BitXor: "xor",
           ast.LShift: "shl", ast.RShift: "shr"}
_CMPOPS = {ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge"}
_ID_BUILTINS = ("global_id", "local_id", "group_id", "global_size", "local_size", "num_groups")
_ATOMICS = ("atomic_add", "atomic_min", "atomic_max", "atomic_xchg", "atomic_cas")


@dataclass(frozen=True)
class _Lit:
    """A Python literal whose IR type is decided by the value it meets."""
    value: int | float | bool


_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b}


class _Builder:
    def __init__(self, fn):
        self.fn = fn
        try:
            lines, first = inspect.getsourcelines(fn)
            self.file = inspect.getsourcefile(fn) or "<kernel>"
        except (OSError, TypeError):
            raise ConcordiaError(f"@kernel needs the source of {fn.__name__!r} "
                                 "(define it in a file, not an interactive prompt)") from None
        self.first = first
        tree = ast.parse(textwrap.dedent("".join(lines)))
        self.fdef = tree.body[0]
        if not isinstance(self.fdef, ast.FunctionDef):
            raise KernelSyntaxError(f"{self.file}:{first}: @kernel applies to a plain function")
        self.names = Names()
        self.safepoints = 0
        self.blocks: list[list[Op]] = []
        self.env: dict[str, Value] = {}
        self.gone: dict[str, str] = {}  # variable -> why it is not available here
        closure = inspect.getclosurevars(fn)
        self.pyscope = {**vars(_py), **fn.__globals__, **closure.nonlocals}
        self.top_level = True

    # -- helpers
    def loc(self, node) -> Loc:
        return Loc(self.file, self.first + getattr(node, "lineno", 1) - 1)

    def fail(self, node, msg: str):
        raise KernelSyntaxError(f"{self.file}:{self.loc(node).line}: {msg}")

    def emit(self, node, name, operands=(), types=(), attrs=(), regions=(), hint=None):
        results = tuple(self.names.value(hint, t) for t in types)
        return IRBuilder(self.names, self.loc(node), self.blocks[-1]).emit(
            name, operands, results, attrs, regions)

    def emit1(self, node, name, operands, type_, attrs=(), hint=None) -> Value:
        return self.emit(node, name, operands, (type_,), attrs, hint=hint)[0]

    def const(self, node, value, t: ScalarType, hint=None) -> Value:
        if t.is_float:
            if isinstance(value, bool):
                self.fail(node, f"bool literal used as {t}")
            return self.emit1(node, "const", (), t, (("bits", float_to_bits(float(value), t.bits)),),
                              hint)
        if t == boolean:
            if not isinstance(value, bool):
                self.fail(node, f"{value!r} used where a bool is needed; write a comparison")
            return self.emit1(node, "const", (), t, (("value", int(value)),), hint)
        if isinstance(value, float) or isinstance(value, bool):
            self.fail(node, f"literal {value!r} cannot be an {t}; cast explicitly")
        if not t.min <= value <= t.max:
            self.fail(node, f"literal {value} does not fit in {t}")
        return self.emit1(node, "const", (), t, (("value", value),), hint)

    def materialise(self, node, v, t: ScalarType | None = None, hint=None) -> Value:
        if isinstance(v, _Lit):
            return self.const(node, v.value, t or _default_type(v), hint)
        return v

    def unify(self, node, a, b, what: str):
        if isinstance(a, _Lit) and isinstance(b, _Lit):
            a = self.materialise(node, a)
        if isinstance(a, _Lit):
            a = self.materialise(node, a, self.scalar(node, b, what))
        if isinstance(b, _Lit):
            b = self.materialise(node, b, self.scalar(node, a, what))
        ta, tb = self.scalar(node, a, what), self.scalar(node, b, what)
        if ta != tb:
            self.fail(node, f"operands of {what} have types {ta} and {tb}; casts are explicit "
                            f"(e.g. {tb}(x))")
        return a, b

    def scalar(self, node, v, what: str) -> ScalarType:
        if isinstance(v, _Lit):
            return self.materialise(node, v).type
        if isinstance(v.type, PtrType):
            self.fail(node, f"{what} needs a scalar, got the pointer %{v.name} ({v.type}); "
                            "index it with [i]")
        return v.type

    def resolve(self, node):
        """The Python object a name or attribute chain refers to (types, builtins, constants)."""
        if isinstance(node, ast.Name):
            if node.id in self.pyscope:
                return self.pyscope[node.id]
            self.fail(node, f"name {node.id!r} is not defined")
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if not hasattr(base, node.attr):
                self.fail(node, f"{ast.unparse(node)} does not exist")
            return getattr(base, node.attr)
        self.fail(node, f"{ast.unparse(node)} is not supported here")

    # -- entry
    def build(self) -> Kernel:
        f = self.fdef
        if f.args.vararg or f.args.kwarg or f.args.kwonlyargs or f.args.defaults:
            self.fail(f, "kernel parameters must be plain, annotated and without defaults")
        params = []
        for a in f.args.args:
            if a.annotation is None:
                self.fail(a, f"parameter {a.arg!r} needs a type annotation (e.g. f32, Ptr[f32])")
            t = self.eval_annotation(a.annotation)
            v = self.names.value(a.arg, t)
            params.append(v)
            self.env[a.arg] = v
        self.blocks.append([])
        body = f.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        returned = self.stmts(body)
        if not returned:
            self.emit(f.body[-1] if f.body else f, "return")
        ops = self.blocks.pop()
        return Kernel(f.name, tuple(params), Block((), tuple(ops)), self.loc(f))

    def eval_annotation(self, node) -> Type:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node = ast.parse(node.value, mode="eval").body
        try:
            t = eval(compile(ast.Expression(node), self.file, "eval"), self.pyscope)
        except Exception as e:  # a user's annotation that does not evaluate
            self.fail(node, f"cannot evaluate annotation {ast.unparse(node)!r}: {e}")
        if not isinstance(t, (ScalarType, PtrType)):
            self.fail(node, f"annotation {ast.unparse(node)!r} is not a Concordia type "
                            "(i32, u32, i64, u64, f32, f64, bool, Ptr[T])")
        if isinstance(t, PtrType) and t.space != "global":
            self.fail(node, "kernel parameters may only point to global memory")
        return t

    # -- statements; each returns True when the block has returned
    def stmts(self, body) -> bool:
        for i, s in enumerate(body):
            if self.stmt(s):
                if i + 1 < len(body):
                    self.fail(body[i + 1], "unreachable code after return")
                return True
        return False

    def stmt(self, s) -> bool:
        top, self.top_level = self.top_level, False
        try:
            return self._stmt(s, top)
        finally:
            self.top_level = top

    def _stmt(self, s, top: bool) -> bool:
        if isinstance(s, ast.Assign):
            if len(s.targets) != 1:
                self.fail(s, "chained assignment (a = b = ...) is not supported")
            self.assign(s.targets[0], s.value, s, top)
        elif isinstance(s, ast.AnnAssign):
            if s.value is None:
                self.fail(s, "declare a variable by assigning it a value")
            t = self.eval_annotation(s.annotation)
            v = self.expr(s.value)
            if isinstance(v, _Lit):
                v = self.materialise(s, v, t)
            elif v.type != t:
                self.fail(s, f"value of type {v.type} assigned to a {t} variable; cast explicitly")
            self.assign(s.target, v, s, top)
        elif isinstance(s, ast.AugAssign):
            op = ast.BinOp(left=_load_of(s.target), op=s.op, right=s.value)
            ast.copy_location(op, s)
            self.assign(s.target, op, s, top)
        elif isinstance(s, ast.If):
            return self.if_stmt(s)
        elif isinstance(s, ast.For):
            self.for_stmt(s)
        elif isinstance(s, ast.While):
            self.while_stmt(s)
        elif isinstance(s, ast.Return):
            if s.value is not None:
                self.fail(s, "kernels return nothing; write results through a pointer")
            self.emit(s, "return")
            return True
        elif isinstance(s, ast.Expr):
            if not isinstance(s.value, ast.Call):
                self.fail(s, "expression statement has no effect")
            self.call(s.value, statement=True)
        elif isinstance(s, ast.Pass):
            pass
        elif isinstance(s, (ast.Break, ast.Continue)):
            self.fail(s, f"'{type(s).__name__.lower()}' is not supported; use a while loop "
                         "with a condition variable")
        else:
            self.fail(s, f"{type(s).__name__} statements are not supported in kernels")
        return False

    def assign(self, target, value_node, stmt, top: bool):
        if isinstance(target, ast.Subscript):
            ptr, idx = self.subscript_parts(target)
            v = value_node if isinstance(value_node, (Value, _Lit)) else self.expr(value_node)
            v = self.materialise(stmt, v, ptr.type.elem)
            if isinstance(v.type, PtrType) or v.type != ptr.type.elem:
                self.fail(stmt, f"storing a {v.type} into %{ptr.name} ({ptr.type}); cast explicitly")
            self.emit(stmt, "store", (ptr, idx, v))
            return
        if not isinstance(target, ast.Name):
            self.fail(stmt, "only simple names and ptr[i] can be assigned")
        name = target.id
        if isinstance(value_node, ast.Call) and self.is_builtin(value_node.func, "local_array"):
            if not top:
                self.fail(stmt, "local_array() must be at the top level of the kernel")
            if name in self.env:
                self.fail(stmt, f"{name!r} is already defined")
            self.env[name] = self.local_array(value_node, name)
            return
        v = value_node if isinstance(value_node, (Value, _Lit)) else self.expr(value_node)
        old = self.env.get(name)
        if old is not None and isinstance(old.type, PtrType):
            self.fail(stmt, f"{name!r} is a pointer and cannot be reassigned")
        if isinstance(v, _Lit):
            v = self.materialise(stmt, v, old.type if old is not None else None, hint=name)
        if isinstance(v.type, PtrType):
            self.fail(stmt, "pointers cannot be copied into other variables")
        if old is not None and old.type != v.type:
            self.fail(stmt, f"variable {name!r} is {old.type} but is assigned a {v.type}; "
                            "cast explicitly")
        self.env[name] = self.name_after(v, name)
        self.gone.pop(name, None)

    def name_after(self, v: Value, name: str) -> Value:
        """Rename a just-computed temporary after the variable it is assigned to."""
        ops = self.blocks[-1]
        if not (ops and ops[-1].results == (v,) and v.name.isdigit()):
            return v
        op = ops[-1]
        self.names.release(v.name)
        new = self.names.value(name, v.type)
        ops[-1] = Op(op.name, op.operands, (new,), op.attrs, op.regions, op.loc)
        return new

    # -- control flow
    def region(self, body_fn) -> tuple[list[Op], bool]:
        self.blocks.append([])
        returned = body_fn()
        return self.blocks.pop(), returned

    def if_stmt(self, s: ast.If) -> bool:
        cond = self.condition(s.test)
        before = dict(self.env)
        envs, blocks, rets = [], [], []
        for body in (s.body, s.orelse):
            self.env = dict(before)
            ops, ret = self.region(lambda b=body: self.stmts(b))
            envs.append(self.env)
            blocks.append(ops)
            rets.append(ret)
        live = [e for e, r in zip(envs, rets) if not r]
        merged = self.merge_names(before, live, s)
        types = tuple(live[0][n].type for n in merged) if live else ()
        regions = []
        for env, ops, ret in zip(envs, blocks, rets):
            if not ret:
                ops.append(Op("yield", tuple(env[n] for n in merged), loc=self.loc(s)))
            regions.append(Block((), tuple(ops)))
        results = self.emit(s, "if", (cond,), types, regions=regions)
        self.env = dict(before)
        for n, v in zip(merged, results):
            self.env[n] = Value(v.name, v.type)
        self.rename_results(results, merged)
        if live:
            for n in set(live[0]) - set(before):
                if not all(n in e for e in live):
                    self.gone[n] = f"it is assigned in only one branch of the if at line {self.loc(s).line}"
        return all(rets)

    def merge_names(self, before, envs, node) -> list[str]:
        """Variables whose value after the construct depends on which path ran."""
        if not envs:
            return []
        names = []
        for n in envs[0]:
            if not all(n in e for e in envs):
                continue
            vals = [e[n] for e in envs]
            if n in before and all(v == before[n] for v in vals):
                continue
            if any(v.type != vals[0].type for v in vals):
                self.fail(node, f"variable {n!r} has type {vals[0].type} on one path and "
                                f"{[v.type for v in vals if v.type != vals[0].type][0]} on another")
            if isinstance(vals[0].type, PtrType):
                continue
            names.append(n)
        return names

    def rename_results(self, results, names):
        """Give region results the names of the variables they stand for (readable IR)."""
        ops = self.blocks[-1]
        op = ops[-1]
        new = []
        for r, n in zip(results, names):
            self.names.release(r.name)
            new.append(self.names.value(n, r.type))
        ops[-1] = Op(op.name, op.operands, tuple(new), op.attrs, op.regions, op.loc)
        for n, v in zip(names, new):
            self.env[n] = v
        return new

    def carried_names(self, body, exclude=()) -> list[str]:
        assigned = []
        for node in ast.walk(ast.Module(body=list(body), type_ignores=[])):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.For):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id not in assigned:
                    assigned.append(t.id)
        return [n for n in assigned if n in self.env and n not in exclude
                and not isinstance(self.env[n].type, PtrType)]

    def for_stmt(self, s: ast.For):
        if s.orelse:
            self.fail(s, "for/else is not supported")
        if not isinstance(s.target, ast.Name):
            self.fail(s, "the loop variable must be a simple name")
        it = s.iter
        if not (isinstance(it, ast.Call) and self.is_python_builtin(it.func, "range")
                and 1 <= len(it.args) <= 3 and not it.keywords):
            self.fail(s, "only 'for i in range(...)' loops are supported")
        args = [self.expr(a) for a in it.args]
        if len(args) == 1:
            args = [_Lit(0)] + args
        if len(args) == 2:
            args.append(_Lit(1))
        typed = [a for a in args if not isinstance(a, _Lit)]
        t = typed[0].type if typed else i32
        if not (isinstance(t, ScalarType) and t.is_int):
            self.fail(s, f"range() bounds must be integers, got {t}")
        bounds = []
        for a in args:
            a = self.materialise(s, a, t)
            if a.type != t:
                self.fail(s, f"range() bounds have different types ({t} and {a.type}); cast explicitly")
            bounds.append(a)
        carried = self.carried_names(s.body, exclude=(s.target.id,))
        before = dict(self.env)
        iv = self.names.value(s.target.id, t)
        args_v = [self.names.value(n, before[n].type) for n in carried]
        self.env[s.target.id] = iv
        for n, a in zip(carried, args_v):
            self.env[n] = a

        def body():
            self.safepoint_if_first(s.body)
            return self.stmts(s.body)
        ops, ret = self.region(body)
        if not ret:
            ops.append(Op("yield", tuple(self.env[n] for n in carried), loc=self.loc(s)))
        self.check_carried_types(s, carried, args_v)
        self.env = dict(before)
        results = self.emit(s, "for", bounds + [before[n] for n in carried],
                            tuple(a.type for a in args_v),
                            regions=[Block((iv, *args_v), tuple(ops))])
        self.rename_results(results, carried)
        self.gone[s.target.id] = f"loop variables are not available after their loop " \
                                 f"(line {self.loc(s).line})"
        self.env.pop(s.target.id, None)
        if s.target.id in before and s.target.id not in carried:
            self.env[s.target.id] = before[s.target.id]
            self.gone.pop(s.target.id)

    def check_carried_types(self, s, carried, args_v):
        for n, a in zip(carried, args_v):
            v = self.env.get(n)
            if v is not None and v.type != a.type:
                self.fail(s, f"variable {n!r} changes type in the loop ({a.type} -> {v.type})")

    def while_stmt(self, s: ast.While):
        if s.orelse:
            self.fail(s, "while/else is not supported")
        carried = self.carried_names(s.body)
        before = dict(self.env)
        types = [before[n].type for n in carried]
        b_args = [self.names.value(n, t) for n, t in zip(carried, types)]
        for n, a in zip(carried, b_args):
            self.env[n] = a

        def before_region():
            c = self.condition(s.test)
            self.blocks[-1].append(Op("condition", (c, *b_args), loc=self.loc(s)))
            return False
        b_ops, _ = self.region(before_region)
        a_args = [self.names.value(n, t) for n, t in zip(carried, types)]
        for n, a in zip(carried, a_args):
            self.env[n] = a

        def after_region():
            self.safepoint_if_first(s.body)
            return self.stmts(s.body)
        a_ops, ret = self.region(after_region)
        if not ret:
            a_ops.append(Op("yield", tuple(self.env[n] for n in carried), loc=self.loc(s)))
        self.check_carried_types(s, carried, a_args)
        self.env = dict(before)
        results = self.emit(s, "while", [before[n] for n in carried], tuple(types),
                            regions=[Block(tuple(b_args), tuple(b_ops)),
                                     Block(tuple(a_args), tuple(a_ops))])
        self.rename_results(results, carried)

    def safepoint_if_first(self, body):
        """A safepoint() call must be the loop body's first statement: that is its loop head."""
        for i, st in enumerate(body):
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) \
                    and self.is_builtin(st.value.func, "safepoint") and i != 0:
                self.fail(st, "safepoint() must be the first statement of a loop body")

    def condition(self, node) -> Value:
        c = self.expr(node)
        c = self.materialise(node, c, boolean) if isinstance(c, _Lit) else c
        if c.type != boolean:
            self.fail(node, f"condition has type {c.type}; compare explicitly (e.g. x != 0)")
        return c

    # -- expressions
    def expr(self, e):
        if isinstance(e, ast.Constant):
            if isinstance(e.value, (bool, int, float)):
                return _Lit(e.value)
            self.fail(e, f"constant {e.value!r} is not a number")
        if isinstance(e, ast.Name):
            if e.id in self.env:
                return self.env[e.id]
            if e.id in self.gone:
                self.fail(e, f"variable {e.id!r} is not available here: {self.gone[e.id]}")
            obj = self.resolve(e)
            if isinstance(obj, (bool, int, float)):
                return _Lit(obj)
            self.fail(e, f"{e.id!r} is not a kernel value (only numbers, parameters and local "
                         "variables can be used)")
        if isinstance(e, ast.Attribute):
            obj = self.resolve(e)
            if isinstance(obj, (bool, int, float)):
                return _Lit(obj)
            self.fail(e, f"{ast.unparse(e)} is not a kernel value")
        if isinstance(e, ast.BinOp):
            return self.binop(e, _BINOPS.get(type(e.op)), self.expr(e.left), self.expr(e.right))
        if isinstance(e, ast.UnaryOp):
            v = self.expr(e.operand)
            if isinstance(e.op, ast.UAdd):
                return v
            if isinstance(v, _Lit) and not isinstance(e.op, ast.Not):
                if isinstance(e.op, ast.USub) and not isinstance(v.value, bool):
                    return _Lit(-v.value)
            if isinstance(e.op, ast.Not):
                v = self.materialise(e, v, boolean)
                if v.type != boolean:
                    self.fail(e, f"'not' needs a bool, got {v.type}")
                return self.emit1(e, "not", (v,), boolean)
            v = self.materialise(e, v)
            t = self.scalar(e, v, "unary operator")
            name = "neg" if isinstance(e.op, ast.USub) else "not"
            if name == "not" and not t.is_int:
                self.fail(e, f"'~' needs an integer, got {t}")
            if name == "neg" and not (t.is_int or t.is_float):
                self.fail(e, f"'-' needs a number, got {t}")
            return self.emit1(e, name, (v,), t)
        if isinstance(e, ast.Compare):
            if len(e.ops) != 1:
                self.fail(e, "chained comparisons are not supported; use 'and'")
            opname = _CMPOPS.get(type(e.ops[0]))
            if opname is None:
                self.fail(e, f"comparison {type(e.ops[0]).__name__} is not supported")
            a, b = self.unify(e, self.expr(e.left), self.expr(e.comparators[0]), "a comparison")
            if a.type == boolean and opname not in ("eq", "ne"):
                self.fail(e, "bools can only be compared with == and !=")
            return self.emit1(e, opname, (a, b), boolean)
        if isinstance(e, ast.BoolOp):
            return self.boolop(e)
        if isinstance(e, ast.IfExp):
            cond = self.condition(e.test)
            return self.lazy_if(e, cond, (lambda: self.expr(e.body), lambda: self.expr(e.orelse)))
        if isinstance(e, ast.Subscript):
            ptr, idx = self.subscript_parts(e)
            return self.emit1(e, "load", (ptr, idx), ptr.type.elem)
        if isinstance(e, ast.Call):
            return self.call(e)
        self.fail(e, f"{type(e).__name__} expressions are not supported in kernels")

    def lazy_if(self, node, cond, sides, t: ScalarType | None = None) -> Value:
        """Evaluate only the chosen side, as Python does (`and`, `or`, `x if c else y`)."""
        built = []
        for side in sides:
            saved = dict(self.env)
            self.blocks.append([])
            v = side()
            built.append((self.blocks.pop(), v))
            self.env = saved
        if t is None:
            typed = [v for _, v in built if not isinstance(v, _Lit)]
            t = typed[0].type if typed else _default_type(built[0][1])
        regions = []
        for ops, v in built:
            self.blocks.append(ops)
            v = self.materialise(node, v, t)
            self.blocks.pop()
            if v.type != t:
                self.fail(node, f"both sides must have type {t}, got {v.type}")
            ops.append(Op("yield", (v,), loc=self.loc(node)))
            regions.append(Block((), tuple(ops)))
        return self.emit(node, "if", (cond,), (t,), regions=regions)[0]

    def boolop(self, e: ast.BoolOp) -> Value:
        left = self.condition(e.values[0])
        for right_node in e.values[1:]:
            if isinstance(e.op, ast.And):
                sides = (lambda n=right_node: self.condition(n), lambda: _Lit(False))
            else:
                sides = (lambda: _Lit(True), lambda n=right_node: self.condition(n))
            left = self.lazy_if(e, left, sides, boolean)
        return left

    def binop(self, e, name, a, b):
        if name is None:
            self.fail(e, f"operator {type(e.op).__name__} is not supported")
        if isinstance(a, _Lit) and isinstance(b, _Lit) and not isinstance(a.value, bool) \
                and not isinstance(b.value, bool):
            folded = self.fold(e, name, a.value, b.value)
            if folded is not None:
                return _Lit(folded)
        a, b = self.unify(e, a, b, f"'{_symbol(e.op)}'")
        t = a.type
        if isinstance(e.op, ast.Div) and t.is_int:
            self.fail(e, "'/' on integers: use '//' (which truncates toward zero, as in C)")
        if isinstance(e.op, ast.FloorDiv) and t.is_float:
            self.fail(e, "'//' on floats is not supported; use floor(a / b)")
        if t.kind not in OPS[name].kinds:
            self.fail(e, f"'{_symbol(e.op)}' is not defined on {t} (only on {_kinds(OPS[name])})")
        return self.emit1(e, name, (a, b), t)

    def fold(self, e, name, a, b):
        if name in _FOLD and (name in ("add", "sub", "mul") or
                              (isinstance(a, int) and isinstance(b, int))):
            return _FOLD[name](a, b)
        if isinstance(a, int) and isinstance(b, int) and b != 0:
            if name == "div" and isinstance(e.op, ast.FloorDiv):
                return trunc_div(a, b)
            if name == "rem":
                return a - trunc_div(a, b) * b
        if isinstance(a, int) and isinstance(b, int) and name in ("shl", "shr") and 0 <= b < 64:
            return a << b if name == "shl" else a >> b
        return None

    def subscript_parts(self, e: ast.Subscript):
        base = self.expr(e.value)
        if isinstance(base, _Lit) or not isinstance(base.type, PtrType):
            self.fail(e, f"{ast.unparse(e.value)} is not a pointer; only Ptr[...] parameters and "
                         "local arrays can be indexed")
        if isinstance(e.slice, (ast.Slice, ast.Tuple)):
            self.fail(e, "only single integer indices are supported (no slices or tuples)")
        idx = self.materialise(e, self.expr(e.slice), i32)
        if not (isinstance(idx.type, ScalarType) and idx.type.is_int):
            self.fail(e, f"index must be an integer, got {idx.type}")
        return base, idx

    # -- calls
    def is_builtin(self, func, name) -> bool:
        try:
            obj = self.resolve(func)
        except KernelSyntaxError:
            return False
        return getattr(obj, "_concordia_builtin", None) == name

    def is_python_builtin(self, func, name) -> bool:
        return isinstance(func, ast.Name) and func.id == name and func.id not in self.env \
            and self.pyscope.get(name) is getattr(_py, name)

    def local_array(self, call, name) -> Value:
        if len(call.args) != 2:
            self.fail(call, "local_array(T, n) takes a type and a constant size")
        t = self.resolve(call.args[0])
        n = self.expr(call.args[1])
        if not isinstance(t, ScalarType) or t == boolean:
            self.fail(call, "local_array's first argument must be a numeric type such as f32")
        if not isinstance(n, _Lit) or not isinstance(n.value, int) or n.value <= 0:
            self.fail(call, "local_array's size must be a positive integer constant")
        return self.emit1(call, "local_alloc", (), PtrType(t, "local"), (("size", n.value),), name)

    def call(self, e: ast.Call, statement=False):
        if e.keywords:
            self.fail(e, "keyword arguments are not supported in kernels")
        func = e.func
        if isinstance(func, ast.Name) and func.id in ("min", "max", "abs") \
                and self.is_python_builtin(func, func.id):
            return self.math_call(e, func.id)
        if isinstance(func, ast.Name) and func.id in ("float", "int", "bool") \
                and self.is_python_builtin(func, func.id):
            self.fail(e, f"{func.id}() is not a kernel type; use a cast like f32(x) or i32(x)")
        obj = self.resolve(func)
        if isinstance(obj, ScalarType):
            return self.cast(e, obj)
        name = getattr(obj, "_concordia_builtin", None)
        if name is None:
            self.fail(e, f"{ast.unparse(func)}() cannot be called in a kernel")
        if name in _ID_BUILTINS:
            if len(e.args) != 1:
                self.fail(e, f"{name}(dim) takes one constant dimension 0, 1 or 2")
            d = self.expr(e.args[0])
            if not isinstance(d, _Lit) or d.value not in (0, 1, 2) or isinstance(d.value, bool):
                self.fail(e, f"{name}(dim): dim must be the constant 0, 1 or 2")
            return self.emit1(e, name, (), i32, (("dim", d.value),))
        if name in ("barrier", "safepoint", "fence"):
            if e.args:
                self.fail(e, f"{name}() takes no arguments")
            if not statement:
                self.fail(e, f"{name}() is a statement, not a value")
            attrs = ()
            if name == "safepoint":
                attrs = (("id", self.safepoints),)
                self.safepoints += 1
            self.emit(e, name, attrs=attrs)
            return None
        if name in _ATOMICS:
            n = 4 if name == "atomic_cas" else 3
            if len(e.args) != n:
                self.fail(e, f"{name} takes {n} arguments")
            ptr = self.expr(e.args[0])
            if isinstance(ptr, _Lit) or not isinstance(ptr.type, PtrType):
                self.fail(e, f"{name}'s first argument must be a pointer")
            idx = self.materialise(e, self.expr(e.args[1]), i32)
            vals = [self.materialise(e, self.expr(a), ptr.type.elem) for a in e.args[2:]]
            return self.emit1(e, name, (ptr, idx, *vals), ptr.type.elem)
        if name == "local_array":
            self.fail(e, "local_array() must be assigned to a name at the top level: buf = local_array(f32, 64)")
        if statement:
            self.fail(e, f"the result of {name}() is unused")
        return self.math_call(e, name)

    def math_call(self, e, name):
        decl = OPS[name]
        arity = 2 if name == "bitcast" else decl.operands
        if len(e.args) != arity:
            self.fail(e, f"{name}() takes {arity} argument(s)")
        if name == "bitcast":
            t = self.resolve(e.args[1])
            v = self.materialise(e, self.expr(e.args[0]))
            if not isinstance(t, ScalarType):
                self.fail(e, "bitcast(x, T): T must be a type")
            if t.bits != v.type.bits or boolean in (t, v.type):
                self.fail(e, f"bitcast needs types of one size, got {v.type} -> {t}")
            return self.emit1(e, "bitcast", (v,), t)
        args = [self.expr(a) for a in e.args]
        if name == "select":
            c = self.materialise(e, args[0], boolean)
            if c.type != boolean:
                self.fail(e, f"select's condition must be bool, got {c.type}")
            a, b = self.unify(e, args[1], args[2], "select")
            return self.emit1(e, "select", (c, a, b), a.type)
        if arity == 1:
            v = self.materialise(e, args[0], f32 if decl.kinds == ("float",) else None)
            t = self.scalar(e, v, f"{name}()")
            if t.kind not in decl.kinds:
                self.fail(e, f"{name}() needs {_kinds(decl)}, got {t}")
            return self.emit1(e, name, (v,), t)
        if name == "fma":
            typed = [a for a in args if not isinstance(a, _Lit)]
            t = typed[0].type if typed else f32
            vs = [self.materialise(e, a, t) for a in args]
            if any(v.type != t for v in vs) or not t.is_float:
                self.fail(e, f"fma() needs three floats of one type, got {[str(v.type) for v in vs]}")
            return self.emit1(e, "fma", tuple(vs), t)
        a, b = self.unify(e, args[0], args[1], f"{name}()")
        if a.type == boolean:
            self.fail(e, f"{name}() is not defined on bool")
        return self.emit1(e, name, (a, b), a.type)

    def cast(self, e, t: ScalarType):
        if len(e.args) != 1:
            self.fail(e, f"{t}(x) takes one argument")
        v = self.expr(e.args[0])
        if isinstance(v, _Lit):
            value = v.value
            if t.is_int and isinstance(value, float):
                self.fail(e, f"{t}({value!r}): write an integer literal")
            if t == boolean:
                value = bool(value)
            return self.const(e, value, t)
        self.scalar(e, v, "a cast")
        if v.type == t:
            return v
        return self.emit1(e, "cast", (v,), t)


def _kinds(decl) -> str:
    words = {"int": "signed integers", "uint": "unsigned integers", "float": "floats",
             "bool": "bool"}
    return " or ".join(words[k] for k in decl.kinds)


def _default_type(v) -> ScalarType:
    if isinstance(v, _Lit):
        return boolean if isinstance(v.value, bool) else f32 if isinstance(v.value, float) else i32
    return v.type


def _symbol(op) -> str:
    return {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
            ast.Mod: "%", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
            ast.RShift: ">>"}.get(type(op), type(op).__name__)


def _load_of(target):
    node = ast.Name(id=target.id, ctx=ast.Load()) if isinstance(target, ast.Name) else \
        ast.Subscript(value=target.value, slice=target.slice, ctx=ast.Load())
    return ast.copy_location(node, target)


class KernelFunction:
    """A Python function compiled to an IR kernel. Launch it with `Runtime.launch`."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self.kernel: Kernel = verify_kernel(_Builder(fn).build())
        self.module = Module((self.kernel,))

    @property
    def name(self) -> str:
        return self.kernel.name

    @property
    def ir(self) -> str:
        return print_module(self.module)

    def __call__(self, *args, **kwargs):
        raise ConcordiaError(f"kernel {self.name!r} runs on a device: use "
                             "Runtime.launch(kernel, global_size=..., local_size=..., args=(...))")

    def __repr__(self) -> str:
        return f"<concordia kernel {self.name}>"


def kernel(fn) -> KernelFunction:
    """Decorator: compile a typed Python function into an IR kernel (errors at its line)."""
    try:
        return KernelFunction(fn)
    except ConcordiaError as e:
        raise type(e)(str(e)) from None
