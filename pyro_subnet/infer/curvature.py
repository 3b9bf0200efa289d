"""The curvature core: per-example Jacobians, Jacobian-vector products, the GGN, and the flat
Gaussian over the weights that linearisation leads to.

Every method that linearises the network uses these functions (and only these): the Laplace
guides, subnetwork selection, sample-then-optimise, the SMC sampler's fast MLP path (which
shares the detection of networks built from ``nn.Linear`` layers) and the analytic predictive
(which reads :class:`FlatGaussian`).

Notation. ``f(x; theta)`` is the network output, ``O`` its size, ``theta`` the flat weight vector
of length ``D`` (:class:`~pyro_subnet.nn.SiteLayout`), ``S`` a subset of ``k`` coordinates of it.

* :func:`jacobian` returns :math:`J_{S,n} = \\partial f(x_n) / \\partial \\theta_S`, shape
  ``(N, O, k)``. It differentiates only the parameter tensors that hold a selected coordinate, one
  reverse pass per output and example batch (``vmap`` of ``jacrev``), so the full ``(N, O, D)``
  Jacobian is never formed when ``S`` covers a few layers; memory is bounded by ``chunk_size``.
  Networks whose weights all sit in ``nn.Linear`` layers (:func:`linear_sites`) take a faster
  path built from one forward and one batched backward pass.
* :func:`jvp` / :func:`vjp` apply :math:`J_S` and :math:`J_S^\\top` without forming it, and
  :func:`ggn_vp` the GGN (for sample-then-optimise).
* :func:`ggn` accumulates :math:`G_S = \\sum_n J_{S,n}^\\top \\Lambda_n J_{S,n}` over data batches,
  dense (``k x k``) or diagonal (``k``), where :math:`\\Lambda_n` is the Hessian of the negative
  log-likelihood in the output (:meth:`~pyro_subnet.nn.Likelihood.output_hessian`). With the
  factor :math:`\\Lambda_n = L_n L_n^\\top`, :math:`G_S = \\sum_n M_n^\\top M_n`,
  :math:`M_n = L_n^\\top J_{S,n}` (:func:`ggn_factor`): one matrix product per batch.
* :func:`log_likelihood_gradient` is :math:`\\sum_n J_{S,n}^\\top \\nabla_f \\log p(y_n \\mid f_n)`,
  the data part of the gradient that a Gauss-Newton step towards the linearised model's optimum
  takes.

The Laplace posterior precision over ``S`` is then :math:`G_S + P_0` (Daxberger et al., 2021,
eq. 6; Immer et al., 2021), and its Gaussian, with every other weight at the MAP, is a
:class:`FlatGaussian`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch.func import jacrev, jvp as _jvp, vjp as _vjp, vmap

from ..data.batches import iter_batches
from ..nn.functional import NetworkFunction
from ..nn.likelihoods import Likelihood


class FlatGaussian(NamedTuple):
    """A Gaussian over ``k`` coordinates of the flat weights, every other weight fixed at ``mean``:

    .. math:: \\theta_S \\sim \\mathcal{N}(m_S, L L^\\top), \\qquad \\theta_r = m_r \\; (r \\notin S).

    A subnetwork Laplace posterior is of this form (degenerate in weight space); it is the
    contract of ``guide.flat_gaussian()`` between the guides and consumers such as
    :class:`~pyro_subnet.infer.AnalyticPredictive`.

    :ivar mean: ``(D,)`` flat MAP weights in ``model.layout`` order.
    :ivar indices: ``(k,)`` LongTensor of the Gaussian coordinates ``S``.
    :ivar scale_tril: ``(k, k)`` lower Cholesky factor ``L`` of the covariance over ``indices``.
    """

    mean: torch.Tensor
    indices: torch.Tensor
    scale_tril: torch.Tensor


# Bound on the floats one Jacobian chunk may hold (about 256 MB in float32).
_JACOBIAN_BUDGET = 64 * 2 ** 20


def _split(fnet: NetworkFunction, theta: torch.Tensor, indices: Optional[torch.Tensor]):
    """Split the weights into the tensors to differentiate and the fixed rest, and say where each
    selected coordinate sits."""
    layout = fnet.layout
    params = layout.unflatten(theta)
    if indices is None:
        indices = torch.arange(layout.dim, device=theta.device)
    groups = layout.locate(indices.to(theta.device))
    touched = [g[0] for g in groups]
    selected = {n: params[n] for n in touched}
    fixed = {n: v.detach() for n, v in params.items() if n not in selected}
    return selected, fixed, groups, indices.numel()


def _gather(per_site: dict, groups, k: int, lead: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Assemble ``{site: (*lead, *site_shape)}`` into ``(*lead, k)`` in the order of the indices."""
    out = like.new_empty(*lead, k)
    for name, positions, local in groups:
        out[..., positions] = per_site[name].reshape(*lead, -1)[..., local]
    return out


def jacobian(fnet: NetworkFunction, theta: torch.Tensor, x: torch.Tensor,
             indices: Optional[torch.Tensor] = None,
             chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-example Jacobians of the outputs with respect to ``theta[indices]``.

    :param fnet: the network.
    :param theta: flat weights, shape ``(D,)``.
    :param x: inputs, shape ``(N, ...)``.
    :param indices: coordinates ``S`` (LongTensor of length ``k``); ``None`` means all ``D``.
    :param chunk_size: examples per ``vmap`` call (default: what fits a fixed memory budget).
    :returns: ``f`` of shape ``(N, O)`` and ``J`` of shape ``(N, O, k)``.
    """
    fast = _linear_jacobian(fnet, theta.detach(), x, indices)
    if fast is not None:
        return fast
    selected, fixed, groups, k = _split(fnet, theta.detach(), indices)

    def f_single(sel, xn):
        out = fnet({**fixed, **sel}, xn.unsqueeze(0))[0]
        return out, out

    jac_fn = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))
    n = x.shape[0]
    if chunk_size is None:
        d_touched = sum(v.numel() for v in selected.values())
        num_out = fnet({**fixed, **selected}, x[:1]).shape[-1]
        chunk_size = max(1, min(n, _JACOBIAN_BUDGET // max(1, d_touched * num_out)))
    fs, js = [], []
    for start in range(0, n, chunk_size):
        jac, f = jac_fn(selected, x[start:start + chunk_size])
        fs.append(f)
        js.append(_gather(jac, groups, k, f.shape, theta))
    return torch.cat(fs), torch.cat(js)


def linear_sites(fnet: NetworkFunction):
    """``{site: (linear module name, "weight" | "bias")}`` when every weight site of a plain
    (not Pyro) network is the weight or bias of an ``nn.Linear`` module, else ``None``. Cached on
    ``fnet``. Such networks have Jacobians in closed form (:func:`jacobian`) and, when they are an
    ``nn.Sequential``, a particles-first evaluation in the SMC sampler."""
    cached = getattr(fnet, "_linear_sites_cache", False)
    if cached is not False:
        return cached
    out = None
    if not fnet.is_pyro:
        linears = {name: m for name, m in fnet.module.named_modules() if type(m) is torch.nn.Linear}
        out = {}
        for site in fnet.layout.names:
            owner, _, leaf = site.rpartition(".")
            if owner not in linears or leaf not in ("weight", "bias"):
                out = None
                break
            out[site] = (owner, leaf)
    fnet._linear_sites_cache = out
    return out


def _linear_jacobian(fnet: NetworkFunction, theta: torch.Tensor, x: torch.Tensor,
                     indices: Optional[torch.Tensor]):
    """Fast path for networks whose weights all sit in ``nn.Linear`` layers (each called once,
    on ``(N, in)`` inputs): the Jacobian of output ``o`` in ``W_{ij}`` of a layer is
    :math:`\\delta_{o,i}(x_n)\\, a_j(x_n)`, with ``a`` the layer input and :math:`\\delta` the
    derivative of the output in the layer's pre-activation. One forward pass and one batched
    backward pass over the ``O`` outputs give every :math:`\\delta` and ``a``; the selected
    entries are then products of gathered columns. Cost ``O(N O (sum of widths) + N O k)``
    instead of ``O(N O D)``. Returns ``None`` when the network does not qualify."""
    sites = linear_sites(fnet)
    if sites is None or x.requires_grad:
        return None
    layout = fnet.layout
    module = fnet.module
    params = {n: v.detach() for n, v in layout.unflatten(theta).items()}
    owners = sorted({o for o, _ in sites.values()})
    mods = dict(module.named_modules())
    inputs, eps, calls = {}, {}, {o: 0 for o in owners}
    handles = []

    def make_hook(name):
        def hook(mod, args, output):
            calls[name] += 1
            inputs[name] = args[0]
            e = torch.zeros_like(output, requires_grad=True)
            eps[name] = e
            return output + e
        return hook

    try:
        for o in owners:
            handles.append(mods[o].register_forward_hook(make_hook(o)))
        with torch.enable_grad():
            f = fnet(params, x)
            if f.dim() != 2 or any(c != 1 for c in calls.values()) or any(a.dim() != 2 for a in inputs.values()):
                return None
            num_out = f.shape[1]
            # One backward pass per output (examples are independent, so the gradient of the
            # column sum is every example's own gradient).
            per_out = [torch.autograd.grad(f[:, o].sum(), [eps[w] for w in owners], retain_graph=o < num_out - 1)
                       for o in range(num_out)]
    finally:
        for h in handles:
            h.remove()
    delta = {w: torch.stack([g[i] for g in per_out], 1) for i, w in enumerate(owners)}   # (N, O, out)
    if indices is None:
        indices = torch.arange(layout.dim, device=theta.device)
    k = indices.numel()
    J = f.new_empty(f.shape[0], num_out, k)
    for name, positions, local in layout.locate(indices.to(theta.device)):
        owner, leaf = sites[name]
        d, a = delta[owner], inputs[owner].detach()
        if leaf == "bias":
            J[..., positions] = d[..., local]
        else:
            in_features = a.shape[1]
            J[..., positions] = d[..., local // in_features] * a[:, None, local % in_features]
    return f.detach(), J


def _restricted(fnet: NetworkFunction, theta: torch.Tensor, x: torch.Tensor, indices: Optional[torch.Tensor]):
    """The network as a function of the coordinates ``S`` alone (the rest fixed at ``theta``),
    and the point ``theta_S`` to differentiate it at."""
    if indices is None:
        return (lambda z: fnet.flat(z, x)), theta
    return (lambda z: fnet.flat(theta.index_put((indices,), z), x)), theta[indices]


def jvp(fnet: NetworkFunction, theta: torch.Tensor, x: torch.Tensor, v: torch.Tensor,
        indices: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward-mode product :math:`J_S v` for one or a batch of tangents.

    :param v: tangent(s) on the coordinates ``S``, shape ``(k,)`` or ``(K, k)``.
    :returns: ``f`` of shape ``(N, O)`` and ``J v`` of shape ``(N, O)`` or ``(K, N, O)``.
    """
    theta = theta.detach()
    f_sub, base = _restricted(fnet, theta, x, indices)
    if v.dim() == 1:
        return _jvp(f_sub, (base,), (v,))
    f = fnet.flat(theta, x)
    return f, vmap(lambda t: _jvp(f_sub, (base,), (t,))[1])(v)


def vjp(fnet: NetworkFunction, theta: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
        indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reverse-mode product :math:`J_S^\\top u = \\sum_n J_{S,n}^\\top u_n`.

    :param u: cotangent(s) on the outputs, shape ``(N, O)`` or ``(K, N, O)``.
    :returns: shape ``(k,)`` or ``(K, k)``.
    """
    theta = theta.detach()
    f_sub, base = _restricted(fnet, theta, x, indices)
    _, pullback = _vjp(f_sub, base)
    if u.dim() == 2:
        return pullback(u)[0]
    return vmap(lambda c: pullback(c)[0])(u)


def ggn_vp(fnet: NetworkFunction, likelihood: Likelihood, theta: torch.Tensor, x: torch.Tensor,
           v: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GGN-vector products :math:`\\sum_n J_{S,n}^\\top \\Lambda_n J_{S,n} v` on a batch ``x``,
    matrix-free (one forward-mode and one reverse-mode pass per vector).

    :param v: shape ``(k,)`` or ``(K, k)``.
    :returns: the same shape as ``v``.
    """
    single = v.dim() == 1
    V = v[None] if single else v
    f, JV = jvp(fnet, theta, x, V, indices)                     # (K, N, O)
    L = likelihood.output_hessian_sqrt(f)                        # (N, O, O)
    LLJV = torch.einsum("nop,npq,knq->kno", L, L.transpose(-1, -2), JV)
    out = vjp(fnet, theta, x, LLJV, indices)                     # (K, k)
    return out[0] if single else out


def ggn_factor(likelihood: Likelihood, f: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """The factor :math:`M` with :math:`M^\\top M = \\sum_n J_n^\\top \\Lambda_n J_n` on one batch: the
    rows :math:`L_n^\\top J_n` stacked, from outputs ``f`` ``(B, O)`` and Jacobians ``J``
    ``(B, O, k)``; shape ``(B O, k)``."""
    L = likelihood.output_hessian_sqrt(f)  # (B, O, O)
    return torch.einsum("boc,bok->bck", L, J).reshape(-1, J.shape[-1])


def ggn(fnet: NetworkFunction, likelihood: Likelihood, theta: torch.Tensor, data,
        indices: Optional[torch.Tensor] = None, structure: str = "dense",
        batch_size: int = 256, progress: bool = False, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Generalised Gauss-Newton matrix :math:`\\sum_n J_{S,n}^\\top \\Lambda_n J_{S,n}`.

    :param data: inputs ``x``, a pair ``(x, y)`` or an iterable of batches (a DataLoader);
        only the inputs are used (:math:`\\Lambda_n` does not depend on ``y`` for the
        Categorical and Gaussian likelihoods).
    :param indices: coordinates ``S`` (``None``: all weights).
    :param structure: ``"dense"`` (``k x k``) or ``"diag"`` (its diagonal, ``k``).
    :param dtype: the dtype the products are summed and returned in (default ``theta``'s). A
        float32 sum of outer products is positive semi-definite only up to rounding of order
        ``1e-7`` of its largest eigenvalue; where a weak prior is all that keeps the posterior
        precision definite, float64 keeps it so.
    :returns: the GGN, on ``theta``'s device.
    """
    if structure not in ("dense", "diag"):
        raise ValueError(f"ggn: structure must be 'dense' or 'diag', got {structure!r}.")
    G = None
    for xb, _ in iter_batches(data, batch_size, device=theta.device, progress=progress, desc="GGN"):
        f, J = jacobian(fnet, theta, xb, indices)
        M = ggn_factor(likelihood, f, J)
        if dtype is not None:
            M = M.to(dtype)
        term = M.T @ M if structure == "dense" else (M * M).sum(0)
        G = term if G is None else G + term
    return G


def log_likelihood_gradient(fnet: NetworkFunction, likelihood: Likelihood, theta: torch.Tensor, data,
                            indices: Optional[torch.Tensor] = None, batch_size: int = 256) -> torch.Tensor:
    """:math:`\\sum_n J_{S,n}^\\top \\nabla_f \\log p(y_n \\mid f_n)` at ``theta``: the gradient of the
    log-likelihood in the coordinates ``S``, by one vector-Jacobian product per batch. It is the data
    part of a Gauss-Newton step to the optimum of the linearised model.

    :param data: ``(x, y)`` or an iterable of ``(x, y)`` batches.
    :returns: shape ``(k,)`` (zeros for empty data).
    """
    total = None
    for xb, yb in iter_batches(data, batch_size, device=theta.device):
        if yb is None:
            raise ValueError("the gradient of the log-likelihood needs targets: pass (x, y), not x alone.")
        f = fnet.flat(theta, xb).detach().requires_grad_(True)
        g = torch.autograd.grad(likelihood.log_prob(f, yb).sum(), f)[0]
        term = vjp(fnet, theta, xb, g, indices)
        total = term if total is None else total + term
    if total is None:
        total = theta.new_zeros(fnet.layout.dim if indices is None else len(indices))
    return total
