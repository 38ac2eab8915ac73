"""CPython 3.11.7 keeps one recursion-depth counter per interpreter for turning a parsed tree into Python objects.
A garbage collection during `ast.parse` can run a finalizer that parses too (asyncio's "Future exception was never
retrieved" logs a traceback, and 3.11's traceback module parses each line to place its carets): the outer parse
then fails with "SystemError: AST constructor recursion depth mismatch". CI's test_fuzz failed that way, inside
hypothesis. These tests put a parsing finalizer in every collection and check both the chaos generator and the
test process survive it."""
from __future__ import annotations

import ast
import gc
import subprocess
import sys
import textwrap

PRESSURE = textwrap.dedent("""
    import ast, gc
    class ParsesWhenCollected:
        def __init__(self):
            self.me = self
        def __del__(self):
            ast.parse("a.b(c)[d]")
            ParsesWhenCollected()  # the next one: a finalizer is pending at every collection from now on
    gc.set_threshold(1)
    def pressure():
        ParsesWhenCollected()
""")


def test_the_chaos_generator_survives_a_finalizer_that_parses():
    code = PRESSURE + textwrap.dedent("""
        from legato.tools.chaos_fuzz import generate_bad
        pressure()
        msgs = generate_bad(60, ["fz-1"], seed=3)
        assert len(msgs) == 60, len(msgs)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_this_process_parses_while_a_finalizer_parses():
    ns: dict = {}
    exec(PRESSURE, ns)
    src = "\n".join(f"x{i} = [{', '.join(str(j) for j in range(30))}]" for i in range(300))
    old = gc.get_threshold()
    try:
        ns["pressure"]()
        for _ in range(20):
            assert isinstance(ast.parse(src), ast.Module)
    finally:
        ns["ParsesWhenCollected"].__del__ = lambda self: None  # end the chain
        gc.set_threshold(*old)
        gc.collect()
