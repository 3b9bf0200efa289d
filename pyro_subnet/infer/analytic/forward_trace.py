"""The layers a model's forward runs, read off one traced call, for moment propagation.

:class:`~pyro_subnet.infer.AnalyticPredictive` walks a network layer by layer. A
:class:`~pyro_subnet.nn.BayesianNet` hands it its plain torch module; a user's PyroModule model
computes its network inline in ``forward`` (``mu = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)``),
so :func:`walkable_network` runs that forward once, on a few examples, and records what happens
to the input between ``x`` and the observed distribution's parameter:

* a call of a submodule that has a layer rule (``Linear``, ``Conv2d``, ``LayerNorm``, activations,
  ``Sequential`` of them, ...; :data:`~.layers.RULES`) is one step, its inside not looked at;
* a torch function on the running tensor is one step when it is an elementwise activation
  (``torch.tanh``, ``F.relu``, ``torch.sigmoid``, ``F.gelu``, ...: :data:`FUNCTIONS`) or a
  reshape that keeps the examples apart (``squeeze``, ``view``, ``flatten``, ...);
* the walk ends where the running tensor is the observed distribution's parameter (the
  ``Normal`` mean; the ``Categorical`` logits up to their normalisation; the ``Bernoulli`` logits).

The steps become a :class:`TracedNetwork` whose rule propagates moments through them with each
submodule's own site names. A step the rules cannot follow (a residual sum, a concatenation,
another torch function on the running tensor, or a second use of a tensor computed from ``x``)
raises ``NotImplementedError`` naming the operation.
"""

from __future__ import annotations

from typing import List, Tuple

import pyro
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...nn.bridge import ModelBridge, NetworkOutput, _CatchObserved, observed_parameter
from ...nn.functional import _SetSiteValues
from . import gaussian_activation, layers

#: Elementwise torch functions and the module with the same moments rule.
FUNCTIONS = {
    torch.tanh: lambda a, k: nn.Tanh(), torch.Tensor.tanh: lambda a, k: nn.Tanh(), F.tanh: lambda a, k: nn.Tanh(),
    torch.relu: lambda a, k: nn.ReLU(), torch.Tensor.relu: lambda a, k: nn.ReLU(), F.relu: lambda a, k: nn.ReLU(),
    torch.sigmoid: lambda a, k: nn.Sigmoid(), torch.Tensor.sigmoid: lambda a, k: nn.Sigmoid(),
    F.sigmoid: lambda a, k: nn.Sigmoid(),
    F.gelu: lambda a, k: nn.GELU(approximate=k.get("approximate", "none")),
    F.silu: lambda a, k: nn.SiLU(), F.mish: lambda a, k: nn.Mish(),
    F.softplus: lambda a, k: nn.Softplus(*a[1:], **k),
    F.elu: lambda a, k: nn.ELU(*a[1:2], **{n: v for n, v in k.items() if n == "alpha"}),
    F.leaky_relu: lambda a, k: nn.LeakyReLU(*a[1:2], **{n: v for n, v in k.items() if n == "negative_slope"}),
}
#: Torch functions that only reshape the running tensor.
RESHAPES = {torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.view,
            torch.Tensor.reshape, torch.reshape, torch.flatten, torch.Tensor.flatten, torch.Tensor.contiguous}


def _rule_names() -> str:
    return ", ".join(sorted(t.__name__ for t in layers.RULES if t is not TracedNetwork))


def _name(func) -> str:
    """``torch.tanh``, ``Tensor.add``, ``F.gelu``: how the function reads in user code."""
    name = getattr(func, "__name__", repr(func))
    qual = getattr(func, "__qualname__", name)
    if qual.startswith("_VariableFunctionsClass."):
        return f"torch.{name}"
    if qual.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if getattr(func, "__module__", "") == "torch.nn.functional":
        return f"F.{name}"
    return qual


class _Recorder(TorchFunctionMode):
    """Record torch function calls and the calls of modules with a layer rule, in order; nothing
    inside such a module is recorded."""

    def __init__(self):
        super().__init__()
        self.events: List[tuple] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self.events.append(("function", func, args, kwargs, out))
        return out


def _has_rule(module: nn.Module) -> bool:
    try:
        layers.rule_for(module, "")
        return True
    except NotImplementedError:
        return False


def _record(bridge: ModelBridge):
    """One call of the model on a few examples under the recorder, with hooks on its submodules;
    returns ``(x, events, observed parameter)``."""
    model = bridge.model
    rec = _Recorder()
    paths = {m: p for p, m in model.named_modules()} if isinstance(model, nn.Module) else {}
    stack, hooks = [], []

    def pre(module, args):
        leaf = rec.depth > 0 or _has_rule(module)
        stack.append(leaf)
        if leaf:
            rec.depth += 1

    def post(module, args, out):
        if stack.pop():
            rec.depth -= 1
            if rec.depth == 0:
                rec.events.append(("module", module, args, {}, out))

    for m in paths:
        if m is not model:
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    x = bridge._example_x
    x = x if x.shape[0] > 1 else torch.cat([x, x])
    values = bridge.constrained(bridge.initial_values())
    if bridge.noise_site is not None:
        values[bridge.noise_site] = torch.full(bridge.noise.shape, float(bridge.likelihood.noise_scale), dtype=x.dtype)
    catch = _CatchObserved(bridge.obs_name)
    try:
        with torch.no_grad(), pyro.validation_enabled(False), poutine.block(), _SetSiteValues(values), catch, \
                bridge.network.mode(), rec:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return x, rec.events, observed_parameter(catch.fn), paths


def _tensors(args, kwargs):
    out = []
    for a in list(args) + list(kwargs.values()):
        if torch.is_tensor(a):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if torch.is_tensor(t)]
    return out


def _matches(t: torch.Tensor, param: torch.Tensor, kind: str) -> bool:
    if t.shape[0] != param.shape[0] or t.numel() != param.numel():
        return False
    t = t.reshape(param.shape)
    if kind == "classification":
        t = torch.log_softmax(t, -1)
    return torch.allclose(t, param, rtol=1e-5, atol=1e-6)


class TracedNetwork(nn.Module):
    """The steps of a traced forward: ``("module", prefix, module)``, ``("act", module)`` and
    ``("reshape", shape per example)``; its layer rule propagates moments through them in order."""

    def __init__(self, steps: List[Tuple]):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleList([s[-1] for s in steps if s[0] in ("module", "act")])

    def forward(self, x):
        for step in self.steps:
            if step[0] == "reshape":
                x = x.reshape(x.shape[0], *step[1])
            else:
                x = step[-1](x)
        return x

    def output_prefix(self):
        """The site prefix of the last module, where it is an ``nn.Linear`` (see :func:`~.layers.output_linear`)."""
        modules = [s for s in self.steps if s[0] == "module"]
        if modules and isinstance(modules[-1][2], nn.Linear):
            return modules[-1][1]
        return None


@layers.register(TracedNetwork)
def _traced(module, prefix, x, post):
    last = max((i for i, s in enumerate(module.steps) if s[0] != "reshape"), default=-1)
    for i, step in enumerate(module.steps):
        if step[0] == "module":
            x = layers.propagate(step[2], x, post, step[1])
        elif step[0] == "act":
            x = layers.propagate(step[1], x, post, prefix)
        elif i < last:     # a reshape between layers (after the last layer the output is (N, O) already)
            x = gaussian_activation.reshape(lambda t, s=step[1]: t.reshape(t.shape[0], *s), x)
    return x


def walkable_network(bridge: ModelBridge) -> nn.Module:
    """The module :func:`~.layers.propagate` walks for a model: its own plain network where it
    offers one (``model.network``), else the :class:`TracedNetwork` of its forward."""
    if isinstance(bridge.network, NetworkOutput):
        return bridge.network.net.module
    x, events, param, paths = _record(bridge)
    kind = bridge.likelihood.name
    cur, derived, steps = x, {id(x)}, []
    for what, op, args, kwargs, out in events:
        inputs = _tensors(args, kwargs)
        touched = [t for t in inputs if id(t) in derived]
        if not touched:
            continue
        where = paths.get(op, "") if what == "module" else ""
        name = f"{type(op).__name__} at {where!r}" if what == "module" else _name(op)
        if len(touched) > 1 or touched[0] is not cur or not torch.is_tensor(out):
            raise NotImplementedError(
                f"AnalyticPredictive: the model's forward uses {name} on values computed from x in a way the layer "
                "rules cannot follow (a branch, residual sum or concatenation). Supported: a chain of layers "
                f"({_rule_names()}), elementwise activations and reshapes; "
                "or walk an nn.Sequential network through ps.nn.BayesianNet.")
        if what == "module":
            steps.append(("module", f"{where}." if where else "", op))
        elif op in FUNCTIONS:
            steps.append(("act", FUNCTIONS[op](args, kwargs)))
        elif op in RESHAPES:
            steps.append(("reshape", tuple(out.shape[1:])))
        else:
            raise NotImplementedError(
                f"AnalyticPredictive: the model's forward applies {name} to values computed from x; the layer rules "
                f"know submodules ({_rule_names()}), the elementwise "
                f"functions {', '.join(sorted({_name(f) for f in FUNCTIONS}))} and reshapes. Use a module for it, "
                "or register a rule with pyro_subnet.infer.analytic.layers.register.")
        cur = out
        derived.add(id(out))
        if any(s[0] != "reshape" for s in steps) and _matches(cur, param, kind):
            return TracedNetwork(steps)
    raise NotImplementedError("AnalyticPredictive: could not follow the model's forward from x to the observed "
                              f"site {bridge.obs_name!r}'s parameter through layers with rules.")
