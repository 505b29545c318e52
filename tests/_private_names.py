"""Find where celery_ext touches Celery's, kombu's or billiard's private names.

Used by ``tests/test_compat.py`` (and runnable alone: ``python tests/_private_names.py``
prints every touch outside ``celery_ext/_compat.py``). A *touch* is, in a module's AST:

- an import of a private module or name of those packages (``celery._state``);
- ``obj._name`` where ``_name`` is a private name those packages define, unless ``obj``
  is ``self``/``cls`` of a celery_ext class that sets ``_name`` itself;
- such a name as a string (``getattr(obj, "_name")``, ``obj.__dict__.get("_name")``);
- a method defined in a class whose name is one of theirs (an override);
- a worker or kombu method replaced on an instance (``consumer.on_close = ...``).

Their private names are read from their sources, so a new touch is found without a list
to keep up to date. Names computed at run time (``setattr(c, name, ...)``) are not followed.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import NamedTuple

FOREIGN = ("celery", "kombu", "billiard", "amqp", "vine")
PACKAGE = Path(__file__).resolve().parent.parent / "celery_ext"
ALLOWED = {"_compat.py"}
# Public methods of these classes that celery_ext may not replace on an instance.
REPLACEABLE_OWNERS = (
    ("celery.worker.consumer.consumer", "Consumer"),
    ("celery.worker.worker", "WorkController"),
    ("celery.bootsteps", "Blueprint"),
    ("celery.concurrency.base", "BasePool"),
    ("kombu.messaging", "Consumer"),
    ("kombu.common", "QoS"),
)


class Touch(NamedTuple):
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _private(name: str) -> bool:
    return len(name) > 1 and name.startswith("_") and not name.startswith("__")


def _sources(package: str) -> Iterator[Path]:
    for root in importlib.import_module(package).__path__:
        yield from Path(root).rglob("*.py")


@cache
def foreign_private_names() -> frozenset[str]:
    """Every private name defined in the foreign packages' classes, modules or ``self``."""
    names: set[str] = set()
    for package in FOREIGN:
        for path in _sources(package):
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = node.name
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    name = node.attr
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    name = node.id
                else:
                    continue
                if _private(name):
                    names.add(name)
    return frozenset(names)


@cache
def replaceable_methods() -> frozenset[str]:
    names: set[str] = set()
    for module, cls in REPLACEABLE_OWNERS:
        owner = getattr(importlib.import_module(module), cls)
        names |= {n for n in dir(owner) if not n.startswith("_") and callable(getattr(owner, n))}
    return frozenset(names)


def _own_attributes(cls: ast.ClassDef) -> set[str]:
    """Names a celery_ext class defines itself: its body and ``self.x = ...``."""
    own = {
        n.name
        for n in cls.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.value is not None  # a bare annotation names the base's attribute
        ):
            own.add(node.target.id)
    return own


def _foreign_owner(module: str, cls: str, name: str) -> bool:
    """Whether ``module.cls`` has a Celery/kombu/billiard base that may use ``name``.

    Besides the names a base defines, a transport base calls hooks its subclasses define
    (kombu's ``_put_fanout``), so any of their private names counts. Classes nested in
    functions cannot be imported; any base then counts.
    """
    found = getattr(importlib.import_module(module), cls, None)
    bases = found.__mro__[1:] if isinstance(found, type) else ()
    if isinstance(found, type) and not any(b.__module__.split(".")[0] in FOREIGN for b in bases):
        return False
    return name in foreign_private_names()


class _Finder(ast.NodeVisitor):
    def __init__(self, path: str, module: str) -> None:
        self.path = path
        self.module = module
        self.touches: list[Touch] = []
        self.classes: list[tuple[ast.ClassDef, set[str]]] = []
        self.private = foreign_private_names()

    def _add(self, node: ast.AST, what: str) -> None:
        self.touches.append(Touch(self.path, getattr(node, "lineno", 0), what))

    def _foreign_module(self, module: str) -> bool:
        return module.split(".")[0] in FOREIGN

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self._foreign_module(alias.name) and any(map(_private, alias.name.split("."))):
                self._add(node, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and self._foreign_module(module):
            if any(map(_private, module.split("."))):
                self._add(node, f"from {module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    self._add(node, f"from {module} import {alias.name}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        own = _own_attributes(node)
        for item in node.body:
            if (
                isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                and _private(item.name)
                and _foreign_owner(self.module, node.name, item.name)
            ):
                self._add(item, f"overrides {node.name}.{item.name}")
        self.classes.append((node, own))
        self.generic_visit(node)
        self.classes.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = node.attr
        if _private(name) and name in self.private:
            receiver = node.value
            on_self = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
            if not (on_self and self.classes and name in self.classes[-1][1]):
                self._add(node, f"{ast.unparse(receiver)}.{name}")
        elif (
            isinstance(node.ctx, ast.Store)
            and name in replaceable_methods()
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            self._add(node, f"replaces {ast.unparse(node.value)}.{name}")
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        if not isinstance(node.value, ast.Constant):  # a docstring may name anything
            self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # getattr(x, "_name"), x.__dict__.get("_name"), ...
        if isinstance(node.value, str) and _private(node.value) and node.value in self.private:
            self._add(node, f"the string {node.value!r}")


def touches(package: Path = PACKAGE) -> list[Touch]:
    """Every touch in ``package`` outside the allowed compat module."""
    found: list[Touch] = []
    for path in sorted(package.rglob("*.py")):
        if path.name in ALLOWED and path.parent == package:
            continue
        relative = path.relative_to(package.parent)
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        finder = _Finder(str(relative), module)
        finder.visit(ast.parse(path.read_text(encoding="utf-8")))
        found += finder.touches
    return found


if __name__ == "__main__":
    result = touches()
    print("\n".join(map(str, result)))
    print(f"{len(result)} touches", file=sys.stderr)
