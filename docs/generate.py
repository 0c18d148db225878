"""Regenerate the parts of docs/*.md that are made from the code itself:
the state order and its diagram (from a fresh Machine, through the same
tostage/tostring calls results use), the stage codes and the bounce
classes (from the C tables).

    python docs/generate.py          # rewrite the generated blocks
    python docs/generate.py --check  # exit 1 if a block is out of date

A generated block sits between ``<!-- generated: NAME -->`` and
``<!-- end generated -->``; everything else in the files is written by
hand. The tests run --check, so the docs cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))


def state_order() -> str:
    from smtpstate import Machine
    from smtpstate.cli import state_table

    rows = state_table(Machine())
    out = ["| order | id | state | stage while awaiting replies | stage after | runs |",
           "| ---: | ---: | --- | --- | --- | --- |"]
    transaction = False
    for r in rows:
        if r.name == "MAIL":
            transaction = True
        runs = "per message" if transaction else "per connection"
        if r.name == "QUIT":
            runs = "per connection"
        if r.name == "RSET":
            transaction = False
            runs = "between messages"
        flags = " (pipelinable)" if r.pipelinable else ""
        out.append(f"| {r.position} | {r.id} | `{r.name}`{flags} | {r.awaiting[0]} "
                   f"{r.awaiting[1]} | {r.after[0]} {r.after[1]} | {runs} |")
    return "\n".join(out)


def state_diagram() -> str:
    from smtpstate import Machine

    names = [n for _, n in Machine().states]
    tx = names[names.index("MAIL"):names.index("RSET")]
    lines = ["```mermaid", "flowchart LR",
             "    connected([connected]) --> " + names[0]]
    lines.append("    " + " --> ".join(names) + " --> closed([closed])")
    lines.append("    subgraph transaction [once per message]")
    lines.append("        " + " --> ".join(tx))
    lines.append("    end")
    # The jumps the built-in states make (states.c), besides the order.
    lines += [
        '    EHLO -. "5xx: HELO instead" .-> EHLO',
        '    STARTTLS -. "220: TLS handshake, EHLO again" .-> EHLO',
        '    RCPT -. "more recipients" .-> RCPT',
        '    RSET -. "next message" .-> MAIL',
        "```",
    ]
    return "\n".join(lines)


def stage_codes() -> str:
    from smtpstate import Stage
    from smtpstate._core import ffi, lib

    out = ["| code | stage |", "| ---: | --- |"]
    for s in Stage:
        out.append(f"| {int(s)} | {ffi.string(lib.smtps_stage_name(int(s))).decode()} |")
    return "\n".join(out)


def bounce_classes() -> str:
    from smtpstate.classify import BUILTIN_CLASSES

    out = ["| code | class | constant |", "| ---: | --- | --- |"]
    for const, c in BUILTIN_CLASSES.items():
        out.append(f"| {c.code} | {c.name} | `classify.{const}` |")
    return "\n".join(out)


BLOCKS: Dict[str, Callable[[], str]] = {
    "state-order": state_order,
    "state-diagram": state_diagram,
    "stage-codes": stage_codes,
    "bounce-classes": bounce_classes,
}

_BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def render(text: str) -> str:
    """``text`` with every generated block made anew."""
    def one(m: "re.Match[str]") -> str:
        make = BLOCKS.get(m.group(2))
        if make is None:
            raise KeyError(f"unknown generated block {m.group(2)!r}")
        return f"{m.group(1)}{make()}\n{m.group(4)}"
    return _BLOCK.sub(one, text)


def docs_files() -> List[str]:
    return sorted(os.path.join(HERE, n) for n in os.listdir(HERE) if n.endswith(".md"))


def main(argv: List[str]) -> int:
    check = "--check" in argv
    stale = []
    for path in docs_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(os.path.relpath(path))
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    if stale:
        print(("out of date: " if check else "rewrote: ") + ", ".join(stale))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
