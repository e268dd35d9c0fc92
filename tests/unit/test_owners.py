"""One owner per piece of state, checked on the source: nothing outside the machine assigns a
model's state, and nothing outside replica.py assigns a Replica's fields."""
from __future__ import annotations

import ast
from pathlib import Path

from router.server.fleet.replica import Replica

ROUTER = Path(__file__).resolve().parents[2] / "router"
MACHINE = ROUTER / "server" / "fleet" / "machine.py"
REPLICA = ROUTER / "server" / "fleet" / "replica.py"
#: A model's state is `state` on its machine; the lifecycle's own counts belong to its admission.
MODEL_FIELDS = frozenset({"state"})
REPLICA_FIELDS = frozenset(Replica.__slots__)
#: Assignments to `self.<field>` in classes that are neither a lifecycle nor a replica.
NOT_OURS = frozenset({"self", "cls"})


def assignments(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, object, attribute) of every attribute assigned, augmented or deleted in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        else:
            continue
        stack = list(targets)
        while stack:
            target = stack.pop()
            if isinstance(target, (ast.Tuple, ast.List)):
                stack.extend(target.elts)
            elif isinstance(target, ast.Attribute):
                found.append((target.lineno, ast.unparse(target.value), target.attr))
    return found


def sources() -> list[Path]:
    return sorted(ROUTER.rglob("*.py"))


def test_nothing_outside_the_machine_assigns_a_models_state() -> None:
    bad = []
    for path in sources():
        if path == MACHINE:
            continue
        fleet = path.parent == MACHINE.parent
        for line, obj, attr in assignments(ast.parse(path.read_text(), str(path))):
            # Elsewhere `self.state` is another object's (an app's, a worker's); in fleet/ it would be a model's.
            if attr in MODEL_FIELDS and (fleet or obj not in NOT_OURS):
                bad.append(f"{path.relative_to(ROUTER.parent)}:{line}: {obj}.{attr}")
    assert bad == []


def test_nothing_outside_replica_py_assigns_a_replicas_fields() -> None:
    bad = []
    for path in sources():
        if path == REPLICA:
            continue
        for line, obj, attr in assignments(ast.parse(path.read_text(), str(path))):
            if attr in REPLICA_FIELDS and obj not in NOT_OURS:
                bad.append(f"{path.relative_to(ROUTER.parent)}:{line}: {obj}.{attr}")
    assert bad == []


def test_the_scan_finds_what_it_looks_for() -> None:
    tree = ast.parse("lc.state = 'awake'\nr.outstanding += 1\n(a.health, b.x) = 1, 2\nself.state = 1\n")
    assert assignments(tree) == [(1, "lc", "state"), (2, "r", "outstanding"), (3, "b", "x"), (3, "a", "health"),
                                 (4, "self", "state")]
