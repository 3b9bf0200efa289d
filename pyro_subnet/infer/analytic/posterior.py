"""Reading a Gaussian weight posterior out of a guide, in the model's flat weight order.

Every guide the analytic predictive supports is a Gaussian over the flat weights ``theta`` (in
``model.layout`` order) of the form

.. math:: \\theta \\sim \\mathcal N(m,\\; \\mathrm{diag}(v) + E F F^\\top E^\\top),

where ``E`` selects the coordinates ``indices`` and ``F`` (``k x r``) is a factor of their
correlated covariance. :class:`FlatPosterior` holds ``(mean, var, indices, factor)``:

==================================  ===========================================================
guide                               ``var``, ``indices``, ``factor``
==================================  ===========================================================
``AutoNormal``                      ``scale^2`` per site; no factor
``AutoDiagonalNormal``              ``scale^2`` (guide order mapped to layout order by site name)
``AutoMultivariateNormal``          0; all coordinates; ``scale_tril``
``AutoLowRankMultivariateNormal``   ``cov_diag``; all coordinates; ``cov_factor``
object with ``flat_posterior()``    as it returns (``AutoSampledLaplace``: its samples as a
                                    factor of width ``K``; ``AutoDiagonalLaplace``: variances)
object with ``flat_gaussian()``     0; its ``indices`` (a subnetwork); its ``scale_tril``
                                    (e.g. ``AutoSubnetLaplace``: the MAP everywhere else)
a :class:`FlatPosterior`            as given (e.g. a diagonal Laplace approximation)
==================================  ===========================================================
"""

from __future__ import annotations

import copy
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import (AutoContinuous, AutoDelta, AutoDiagonalNormal, AutoLowRankMultivariateNormal,
                                  AutoMultivariateNormal, AutoNormal)

from ...nn.layout import SiteLayout


class FlatPosterior(NamedTuple):
    """``N(mean, diag(var) + E F F^T E^T)`` over the flat weights (see the module docstring).

    :param mean: ``(D,)``; ``var``: ``(D,)`` independent variances (zeros where none);
    :param indices: ``(k,)`` LongTensor of the correlated coordinates, or ``None``;
    :param factor: ``(k, r)`` factor of their covariance, or ``None``.
    """

    mean: torch.Tensor
    var: torch.Tensor
    indices: Optional[torch.Tensor] = None
    factor: Optional[torch.Tensor] = None


def _check_real_support(guide, layout: SiteLayout):
    trace = guide.prototype_trace
    names = [n for n, _ in trace.iter_stochastic_nodes()]
    missing = [n for n in layout.names if n not in names]
    if missing:
        raise ValueError(f"AnalyticPredictive: the guide has no sites {missing}; was it made for this model?")
    for name, site in trace.iter_stochastic_nodes():
        support = site["fn"].support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        if support is not constraints.real and name in layout.names:
            raise ValueError(
                f"AnalyticPredictive: weight site {name!r} has support {site['fn'].support}; the analytic "
                "predictive needs real-valued (Gaussian) weight sites."
            )


def _guide_to_layout(guide: AutoContinuous, layout: SiteLayout) -> torch.Tensor:
    """Positions ``perm`` with ``theta_layout = latent_guide[perm]`` (the guide packs the sites in
    the model's execution order, which need not be the layout order, and may hold other latent
    sites, such as a noise scale, which are left out: their rows of a joint covariance factor
    are dropped, which is the marginal over the weights)."""
    positions = torch.arange(guide.latent_dim, dtype=torch.float64)
    values = {site["name"]: v for site, v in guide._unpack_latent(positions)}
    return layout.flatten({n: values[n] for n in layout.names}).round().long()


def read_posterior(guide, layout: SiteLayout) -> FlatPosterior:
    """The :class:`FlatPosterior` of ``guide`` in ``layout`` order (detached).

    :param guide: a supported guide (already set up, i.e. run or trained once) or a posterior.
    :param layout: the model's :class:`~pyro_subnet.nn.SiteLayout`.
    """
    if isinstance(guide, FlatPosterior):
        return _validated(guide, layout)
    if hasattr(guide, "flat_posterior"):
        p = guide.flat_posterior()
        return _validated(FlatPosterior(*(None if t is None else t.detach() for t in p)), layout)
    if hasattr(guide, "flat_gaussian"):
        g = guide.flat_gaussian()
        mean = g.mean.detach()
        idx = torch.as_tensor(g.indices, dtype=torch.long, device=mean.device).reshape(-1)
        return _validated(FlatPosterior(mean, torch.zeros_like(mean), idx, g.scale_tril.detach()), layout)
    if getattr(guide, "prototype_trace", None) is None:
        raise ValueError(f"AnalyticPredictive: the guide {type(guide).__name__} is not set up yet; run or train it "
                         "once with the data (e.g. svi.step(x, y) or guide(x, y)).")
    _check_real_support(guide, layout)
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            locs, scales = [], []
            for n, shape in layout.shapes.items():
                loc, scale = guide._get_loc_and_scale(n)
                if loc.shape != shape:
                    raise ValueError(f"AnalyticPredictive: the guide's site {n!r} has shape {tuple(loc.shape)}, the "
                                     f"model's {tuple(shape)}; was the guide made for this model?")
                locs.append(loc.reshape(-1))
                scales.append(scale.reshape(-1))
            return _validated(FlatPosterior(torch.cat(locs), torch.cat(scales).square_()), layout)
        if isinstance(guide, AutoDelta):
            mean = layout.flatten({n: v for n, v in guide.median().items() if n in layout.names})
            return _validated(FlatPosterior(mean, torch.zeros_like(mean)), layout)
        if isinstance(guide, (AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal)):
            perm = _guide_to_layout(guide, layout).to(guide.loc.device)
            post = guide.get_posterior()
            if isinstance(guide, AutoDiagonalNormal):
                loc, scale = guide._loc_scale()
                return _validated(FlatPosterior(loc.detach()[perm], scale.detach()[perm] ** 2), layout)
            if isinstance(guide, AutoMultivariateNormal):
                mean = post.loc.detach()[perm]
                return _validated(FlatPosterior(mean, torch.zeros_like(mean), torch.arange(layout.dim, device=mean.device),
                                                post.scale_tril.detach()[perm]), layout)
            mean = post.loc.detach()[perm]
            return _validated(FlatPosterior(mean, post.cov_diag.detach()[perm], torch.arange(layout.dim, device=mean.device),
                                            post.cov_factor.detach()[perm]), layout)
    raise TypeError(
        f"AnalyticPredictive: unsupported guide {type(guide).__name__}. Supported: AutoNormal, AutoDiagonalNormal, "
        "AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoDelta, a guide with flat_posterior() "
        "(AutoSampledLaplace, AutoDiagonalLaplace) or flat_gaussian() (AutoSubnetLaplace), or a FlatPosterior."
    )


def _validated(p: FlatPosterior, layout: SiteLayout) -> FlatPosterior:
    D = layout.dim
    if p.mean.shape != (D,) or p.var.shape != (D,):
        raise ValueError(f"AnalyticPredictive: posterior mean/var must have shape ({D},), got "
                         f"{tuple(p.mean.shape)} and {tuple(p.var.shape)}.")
    if (p.indices is None) != (p.factor is None):
        raise ValueError("AnalyticPredictive: indices and factor must be given together.")
    if p.indices is not None:
        if p.factor.dim() != 2 or p.factor.shape[0] != p.indices.numel():
            raise ValueError(f"AnalyticPredictive: factor must have shape (k, r) with k = {p.indices.numel()} "
                             f"indices, got {tuple(p.factor.shape)}.")
        if p.indices.numel() and (p.indices.min() < 0 or p.indices.max() >= D):
            raise ValueError(f"AnalyticPredictive: indices must lie in [0, {D}).")
    # one reduction per bound (NaN propagates through max and min, so it fails them too)
    bounds = torch.stack([p.mean.abs().max(), p.var.max(), p.var.min()]) if D else torch.zeros(3)
    if not (bool((bounds[:2] < float("inf")).all()) and bool(bounds[2] >= 0)):
        raise ValueError("AnalyticPredictive: the posterior mean/variances must be finite, variances >= 0.")
    return p


class SitePosterior:
    """Per-site views of a :class:`FlatPosterior` for the layer rules.

    :param post: the flat posterior; ``layout``: the model's layout; ``dtype``/``device``: of the data;
        ``full``: whether linear layers return a full covariance between their outputs;
        ``activations``: ``"moments"`` (moment matching) or ``"linearise"`` (at the mean);
        ``products``: the products of correlated weights with a correlated input: ``True`` (their mean
        and covariance), ``"auto"`` (with moment-matched activations their mean, and their covariance
        where cheap, see :func:`~.moments.prepare_linear`; with linearised ones none) or ``False``
        (none);
        ``full_output_at``: the prefix of a linear layer that returns a full covariance anyway.
    """

    def __init__(self, post: FlatPosterior, layout: SiteLayout, dtype, device, full: bool = False,
                 activations: str = "moments", full_output_at: Optional[str] = None, products="auto"):
        self.layout = layout
        self.full = full
        self.activations = activations
        # linearised activations make the network linear in the weights: no products unless asked for
        self.products = products if activations == "moments" or products != "auto" else False
        self.full_output_at = full_output_at
        self._memo = {}
        cast = dict(dtype=dtype, device=device)
        var = post.var.to(**cast)
        self.mean = layout.unflatten(post.mean.to(**cast))
        self.var = layout.unflatten(var)
        # which sites have independent variances: positive entries counted per site in one pass
        ends = torch.tensor([0] + [sl.stop for sl in layout.slices().values()], device=var.device)
        counts = torch.cat([ends.new_zeros(1), (var > 0).cumsum(0)])[ends].diff()
        self.has_var = dict(zip(layout.names, (counts > 0).tolist()))
        self._idx = None if post.indices is None else post.indices.to(device)
        self._factor = None if post.factor is None else post.factor.to(**cast)
        # full covariances of independent weights travel as per-example columns of A
        # (moments.linear's lift); with a weight factor, A's columns are the weights' epsilon
        self.lift = full and self._factor is None

    def with_full(self, full: bool) -> "SitePosterior":
        """The same posterior with ``full`` set otherwise: the tensors and what the layers derived
        from them (:meth:`cached`, keyed by the representation where it matters) are shared."""
        view = copy.copy(self)
        view.full = full
        view.lift = full and self._factor is None
        return view

    @property
    def factor_width(self) -> int:
        """The width ``r`` of the factor (the number of shared standard normals), 0 without one."""
        return 0 if self._factor is None else self._factor.shape[-1]

    def cached(self, key, fn):
        """``fn()``, computed once per posterior (the layers' weight-only quantities)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def marginal_var(self, name: str) -> Optional[torch.Tensor]:
        """Marginal variances of site ``name`` (independent part plus the factor's diagonal)."""
        v = self.var[name]
        grid = self.factor([name])
        if grid is not None:
            v = v + (grid[0] ** 2).sum(-1)
        elif not self.has_var[name]:
            return None
        return v

    def independent_var(self, name: str) -> Optional[torch.Tensor]:
        return self.var[name] if self.has_var[name] else None

    def linear_factor(self, weight: str, bias: Optional[str]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The factor ``G`` ``(out, in + 1, r)`` of a linear layer's ``[W, b]`` (the rows of ``F`` as
        :meth:`factor` gives them, the bias as the last input; zeros without a bias) and which of its
        entries are correlated, ``(out, in + 1)``: a row of ``F`` that is not all zero. Both are
        written from the layer's correlated coordinates alone, without a pass over the mostly zero
        grid of a subnetwork. ``None`` when none of its coordinates is correlated."""
        if self._idx is None:
            return None
        out, n_in = self.layout.shapes[weight]
        r = self._factor.shape[-1]
        G = self._factor.new_zeros(out * (n_in + 1), r)
        correlated = torch.zeros(out * (n_in + 1), dtype=torch.bool, device=G.device)
        found = False
        for name, bias_site in ((weight, False), (bias, True)):
            entries = None if name is None else self._entries(name)
            if entries is None:
                continue
            local, rows = entries
            # W[k, i] sits at k (in + 1) + i of the grid, b[k] at k (in + 1) + in
            at = local * (n_in + 1) + n_in if bias_site else local + torch.div(local, n_in, rounding_mode="floor")
            G[at] = rows
            correlated[at] = (rows != 0).any(-1)
            found = True
        if not found:
            return None
        return G.view(out, n_in + 1, r), correlated.view(out, n_in + 1)

    def _entries(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(local, rows)``: the flat positions in site ``name`` of its correlated coordinates and their
        rows of the factor, ``(k, r)``; ``None`` where it has none."""
        s = self.layout.slices()[name]
        pos = ((self._idx >= s.start) & (self._idx < s.stop)).nonzero().reshape(-1)
        if pos.numel() == 0:
            return None
        return self._idx[pos] - s.start, self._factor[pos]

    def factor(self, names: Sequence[str]) -> Optional[List[torch.Tensor]]:
        """The rows of the factor ``F`` for the sites ``names``: one tensor ``(*site_shape, r)`` per
        site (zeros where a coordinate is not correlated), i.e. the coefficients of the shared
        standard normal ``epsilon``. ``None`` when none of their coordinates is correlated."""
        if self._idx is None:
            return None
        sl = self.layout.slices()
        rows, where = [], []
        for j, n in enumerate(names):
            s = sl[n]
            m = (self._idx >= s.start) & (self._idx < s.stop)
            pos = m.nonzero().reshape(-1)
            rows.append(pos)
            where.append(self._idx[pos] - s.start)
        allrows = torch.cat(rows)
        if allrows.numel() == 0:
            return None
        F = self._factor[allrows]
        out, start = [], 0
        for n, local in zip(names, where):
            shape = self.layout.shapes[n]
            g = F.new_zeros(shape.numel(), F.shape[1])
            g[local] = F[start:start + local.numel()]
            start += local.numel()
            out.append(g.reshape(*shape, F.shape[1]))
        return out
