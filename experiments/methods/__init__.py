"""Training methods: one small module each, found by name in a registry.

The runner knows only the :class:`Method` interface (``base.py``, re-exported here); adding a method means
adding a module with a ``@register_method("name")`` class that declares its :class:`Capabilities`, and its
name to the torch-free catalogue (``experiments/catalogue.py``); nothing in the
runner, ``compare``, ``accel`` or the benchmarks changes: they ask ``cls.caps``, never the name.
``with attach(method, layers, pattern, ...) as m:`` builds a method on a model's sparse layers and
routes their forward through it, until the block ends.

Life of a training step, as `loop.Stepper` keeps it (driven by `nmtrain.sparsify`'s hooks for the runner
and users' loops, and by `loop.train_step` for tests and benchmarks)::

    method.before_step(step)       # recompute masks when due (at the step's first training forward)
    loss = model(x) ...            # sparse layers call method.layer_forward(name, module, x)
    optimizer.zero_grad()
    loss.backward()
    method.after_backward(step)    # adjust gradients (e.g. SR-STE's decay on pruned weights)
    optimizer.step()
    method.after_step(step)
    scheduler.step()

Every method keeps the dense weight W and derives its masks from it; ``masks()`` gives the final masks
and ``deployed_weight()`` the weight each sparse layer exports (default ``W * mask``).
"""

import importlib

from ..catalogue import METHODS
from .base import (GEMMS, Capabilities, Context, Method, MethodError, NoParams, StoredMaskMethod, attach,  # noqa: F401
                   build_method, build_params, get_method, list_methods, params_dict, register_method)
from .loop import Stepper, train_step  # noqa: F401

# Importing the modules the catalogue names registers them, in its order.
for _name in METHODS:
    importlib.import_module(f"{__name__}.{_name}")
del _name
