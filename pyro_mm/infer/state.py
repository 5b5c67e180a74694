"""Checkpoint helpers shared by the inference classes: their state as plain data.

A ``state_dict`` built from these helpers holds only dicts, lists, strings, numbers, ``None`` and
tensors, so ``torch.save`` writes it and ``torch.load(path)`` (``weights_only=True``, the default)
reads it back. Dataclass trees of tensors (parameters, statistics) are stored with the name of
their class; on loading the class is looked up among the modules already imported, never imported,
so a checkpoint cannot run code.
"""

import dataclasses
import inspect
import sys

import torch

__all__ = [
    "tree_state",
    "load_tree_state",
    "tree_unflatten",
    "schedule_state",
    "load_schedule_state",
    "check_matching_options",
    "stored_options",
    "check_tree_shapes",
    "check_finite_state",
    "qualified_name",
]

_DATACLASS_KEY = "__dataclass__"


def tree_state(tree):
    """A detached copy of a tree (dataclasses, dicts, lists of tensors and plain values) as
    nested dicts that ``torch.load(..., weights_only=True)`` accepts.

    :param tree: a dataclass of tensors (e.g. :class:`~pyro_mm.models.params.MoEParams`),
        possibly nested, or ``None``.
    """
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        cls = type(tree)
        return {
            _DATACLASS_KEY: f"{cls.__module__}:{cls.__qualname__}",
            **{f.name: tree_state(getattr(tree, f.name)) for f in dataclasses.fields(tree)},
        }
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: tree_state(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [tree_state(value) for value in tree]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} in a state dict")


def load_tree_state(state):
    """Inverse of :func:`tree_state`: rebuilds the dataclasses (tensors are cloned).

    :raises ValueError: when a stored dataclass is not defined by an imported module.
    """
    if isinstance(state, dict) and _DATACLASS_KEY in state:
        cls = _imported_dataclass(state[_DATACLASS_KEY])
        fields = {key: load_tree_state(value) for key, value in state.items()}
        del fields[_DATACLASS_KEY]
        return cls(**fields)
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: load_tree_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [load_tree_state(value) for value in state]
    return state


def _imported_dataclass(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    obj = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(
            f"the state refers to the dataclass {name!r}, which no imported module defines; "
            f"import the module that defines it before loading"
        )
    return obj


def tree_unflatten(template, leaves):
    """A tree shaped like ``template`` whose tensors are taken in order from ``leaves`` (the
    inverse of :func:`~pyro_mm.models.params.tree_leaves`)."""
    leaves = iter(leaves)

    def rebuild(node):
        # The class's field table, as in tree_map: this runs in every streaming step.
        fields = getattr(type(node), "__dataclass_fields__", None)
        if fields is not None:
            return type(node)(**{name: rebuild(getattr(node, name)) for name in fields})
        return None if node is None else next(leaves)

    return rebuild(template)


def check_tree_shapes(name: str, stored, expected) -> None:
    """Raises ``ValueError`` when two trees differ in structure, shapes or dtypes.

    :param str name: what the trees are, for the message.
    """
    if dataclasses.is_dataclass(expected) or dataclasses.is_dataclass(stored):
        if type(stored) is not type(expected):
            raise ValueError(
                f"{name} is a {type(stored).__name__} in the state, "
                f"expected a {type(expected).__name__}"
            )
        for f in dataclasses.fields(expected):
            check_tree_shapes(
                f"{name}.{f.name}", getattr(stored, f.name), getattr(expected, f.name)
            )
        return
    if (stored is None) != (expected is None):
        raise ValueError(f"{name} is {'missing' if stored is None else 'unexpected'} in the state")
    if stored is not None and (stored.shape != expected.shape or stored.dtype != expected.dtype):
        raise ValueError(
            f"{name} has shape {tuple(stored.shape)} and dtype {stored.dtype} in the state, "
            f"expected {tuple(expected.shape)} and {expected.dtype}"
        )


def check_finite_state(state, path: str = "") -> None:
    """Raises ``ValueError`` naming the first floating tensor of a state dict that holds NaN or
    infinite values: a corrupted checkpoint would otherwise load without a word and then fail
    the next step, or (a Polyak average) put NaN into the model's estimate. Plain floats (the
    history's losses, ``nan`` for a skipped batch) are not tensors and are left alone.

    :param state: a state dict (nested dicts, lists, tensors and plain values).
    :param str path: where ``state`` sits in the whole state, for the message.
    """
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            raise ValueError(
                f"the state holds non-finite values in {path or 'a tensor'}: a corrupted "
                "checkpoint; nothing was changed"
            )
    elif isinstance(state, dict):
        for key, value in state.items():
            if key != _DATACLASS_KEY:
                check_finite_state(value, f"{path}.{key}" if path else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            check_finite_state(value, f"{path}[{index}]")


def schedule_state(schedule):
    """The class and parameters of a step-size schedule, or ``None`` when it has neither a
    ``state_dict`` method nor only plain-number attributes (e.g. a ``lambda``: then the schedule
    given to the constructor is kept on loading, and must be the same for an exact resume)."""
    cls = type(schedule)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if hasattr(schedule, "state_dict"):
        return {"class": name, "state": schedule.state_dict()}
    attributes = getattr(schedule, "__dict__", None)
    if not attributes or not all(
        isinstance(value, (bool, int, float, str)) for value in attributes.values()
    ):
        return None
    return {"class": name, "params": dict(attributes)}


def load_schedule_state(current, state):
    """The schedule described by ``state`` (see :func:`schedule_state`); ``current`` when
    ``state`` is ``None`` or describes ``current`` already.

    Schedules are rebuilt as ``cls(**params)``: their attributes must be their constructor's
    arguments, as for :class:`~pyro_mm.infer.schedules.PowerDecay`.
    """
    if state is None:
        return current
    module_name, _, qualname = state["class"].partition(":")
    cls = sys.modules.get(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not isinstance(cls, type):
        raise ValueError(f"the state's schedule class {state['class']!r} is not imported")
    if "state" in state:
        schedule = current if type(current) is cls else cls()
        schedule.load_state_dict(state["state"])
        return schedule
    if type(current) is cls and vars(current) == state["params"]:
        return current
    return cls(**state["params"])


def stored_options(state: dict) -> dict:
    """The options a state was saved with; a state saved before models had a ``gate`` option
    was made with the default softmax gate."""
    from ..models.gates import SoftmaxGate

    return {"gate": repr(SoftmaxGate()), **state["options"]}


def check_matching_options(owner: str, stored: dict, current: dict) -> None:
    """Raises ``ValueError`` naming every option that differs between a state and its loader."""
    differences = [
        f"{key}={stored.get(key)!r} in the state but {current.get(key)!r} here"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"the state does not match this {owner}: {'; '.join(differences)}; construct it "
            f"with the options (and model) the state was saved with before loading"
        )


def qualified_name(obj) -> str:
    """``module.QualifiedName`` of a class or function, or of the class of any other object:
    how a state names a component (an optimiser, a guide) that it cannot hold as plain data."""
    if not (isinstance(obj, type) or inspect.isroutine(obj)):
        obj = type(obj)
    return f"{obj.__module__}.{obj.__qualname__}"
