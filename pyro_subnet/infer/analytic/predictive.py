"""``AnalyticPredictive``: the posterior predictive of a Bayesian network in one forward pass."""

from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Tuple, Union

import pyro
import torch

from ...nn.bridge import ModelBridge, check_model
from ...nn.functional import _in_mode
from .. import links
from . import gaussian_activation, layers
from .forward_trace import walkable_network
from .posterior import FlatPosterior, SitePosterior, read_posterior


def _guide_tensors(guide, modules=None) -> List[torch.Tensor]:
    """Every tensor the posterior is read from: a module's parameters and buffers (of ``modules``,
    its submodules, when given: walking them directly is cheaper than ``parameters()``), the Pyro
    param store (where ``AutoNormal`` & co keep theirs), or a :class:`FlatPosterior`'s fields."""
    if isinstance(guide, FlatPosterior):
        return [t for t in guide if t is not None]
    out = []
    if isinstance(guide, torch.nn.Module):
        for m in (guide.modules() if modules is None else modules):
            out += [t for t in m._parameters.values() if t is not None]
            out += [t for t in m._buffers.values() if t is not None]
    store = pyro.get_param_store()
    out += [p for _, p in store.named_parameters()]
    return out


def widest_activation(net: torch.nn.Module, example_shape, dtype, device=None) -> Optional[int]:
    """The most numbers any module of ``net`` outputs for one example of shape ``example_shape``:
    one forward pass on an example of zeros, with a hook on every module (a real pass on one
    example: on the meta device the same pass costs more, every operation being decomposed in
    Python). Nothing is left changed: eval mode (no running statistics updated, no dropout draws),
    no gradients, the random stream restored (a PyroSample weight draws from its prior), torch's
    fused attention path off (it would skip the inner modules and their hooks). The weights are
    cast to ``dtype`` and ``device`` (default: the network's) where they differ. ``None`` where
    the network does not run on such an example."""
    sizes = []

    def record(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        if torch.is_tensor(out):
            sizes.append(out.numel())
    tensors = dict(net.named_parameters())
    tensors.update(net.named_buffers())
    if device is None:
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    device = torch.device(device)
    tensors = {n: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for n, t in tensors.items()}
    hooks = [m.register_forward_hook(record) for m in net.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu" else None), \
                _in_mode(net, False):
            torch.backends.mha.set_fastpath_enabled(False)
            torch.func.functional_call(net, tensors, (torch.zeros(1, *example_shape, dtype=dtype, device=device),))
    except Exception:       # a heuristic: where shapes cannot be traced, no chunking
        return None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()
    return max(sizes, default=None)


#: Under ``batch_size="auto"``, on CPU with correlated weights: the numbers in a pass's largest
#: ``(rows, F, r)`` activation (2^21: 8 MB in float32: a pass that stays in cache; see
#: ``docs/measured.md``).
AUTO_BATCH_ELEMENTS = 2 ** 21


#: Under ``covariance="auto"``: the inputs on which both representations are compared.
PROBE_ROWS = 32
#: Under ``covariance="auto"``: the mean KL divergence (nats) of the diagonal predictive from the
#: full one above which the full covariance is kept.
COVARIANCE_TOLERANCE = 1e-4


#: The model is read (traced) on this many examples of the inputs at hand.
TRACE_ROWS = 16


def _bridge_on_few(model, x) -> ModelBridge:
    """The model's bridge, traced on the first :data:`TRACE_ROWS` examples of ``x`` (the structure is
    all it reads, and tracing a large set costs more than a prediction); on all of ``x`` where the
    model cannot run on so few (e.g. a data plate whose ``subsample_size`` is larger). The prior's
    structure is left undecided (``lazy_priors``): the predictive never evaluates the prior."""
    if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] > TRACE_ROWS:
        try:
            return ModelBridge(model, x[:TRACE_ROWS], lazy_priors=True)
        except ValueError:
            pass
    return ModelBridge(model, x, lazy_priors=True)


def _predictive_kl(p: Dict[str, torch.Tensor], q: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over examples of :math:`\\mathrm{KL}(p \\,\\|\\, q)` between two outputs of
    :meth:`AnalyticPredictive.__call__`: categorical (``probs``) or Gaussian (``mean``, ``var``)."""
    if "probs" in p:
        tiny = torch.finfo(p["probs"].dtype).tiny
        a, b = p["probs"].clamp_min(tiny), q["probs"].clamp_min(tiny)
        return (a * (a.log() - b.log())).sum(-1).mean()
    ratio = p["var"] / q["var"]
    return 0.5 * (ratio - 1 - ratio.log() + (p["mean"] - q["mean"]) ** 2 / q["var"]).mean()


def utility_kl(p: Tuple[torch.Tensor, torch.Tensor], q: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean over examples of the KL divergence between the Gaussian utilities of two latent
    predictives of a softmax classifier, ``p = (mean (N, C), covariance (N, C, C) or variances
    (N, C))`` and ``q`` alike: the divergence of the contrasts :math:`u_k - u_C` of
    :math:`u = f + g`, :math:`f \\sim \\mathcal N(\\mu, \\Sigma)`, :math:`g \\sim \\mathcal N(0, \\tfrac{\\pi^2}{6} I)`
    (the Gumbel noise's Gaussian stand-in of :func:`~pyro_subnet.infer.links.gumbel_max_softmax`).

    The class is :math:`\\arg\\max_k u_k`, a function of the contrasts, so by the data-processing
    inequality this bounds the divergence between the two multinomial-probit predictives from above,
    and costs a batched Cholesky factorisation of ``C - 1`` square matrices instead of two calls of
    the link."""
    def contrasts(mean, cov):
        cov = cov if cov.dim() == 3 else torch.diag_embed(cov)
        C = mean.shape[-1]
        cov = cov.double() + links.GUMBEL_VAR * torch.eye(C, dtype=torch.float64, device=cov.device)
        m = mean.double()
        # u_k - u_C for k < C
        m = m[:, :-1] - m[:, -1:]
        cov = (cov[:, :-1, :-1] - cov[:, :-1, -1:] - cov[:, -1:, :-1] + cov[:, -1:, -1:])
        return m, cov

    (m1, S1), (m0, S0) = contrasts(*p), contrasts(*q)
    L0 = torch.linalg.cholesky(S0)
    L1 = torch.linalg.cholesky(S1)
    k = m0.shape[-1]
    M = torch.linalg.solve_triangular(L0, L1, upper=False)            # L0^-1 L1: tr(S0^-1 S1) = |M|^2
    d = torch.linalg.solve_triangular(L0, (m1 - m0).unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * (L0.diagonal(dim1=-2, dim2=-1).log() - L1.diagonal(dim1=-2, dim2=-1).log()).sum(-1)
    kl = 0.5 * (M.square().sum((-2, -1)) + d.square().sum(-1) - k + logdet)
    return kl.clamp_min(0).mean().to(p[0].dtype)


class AnalyticPredictive:
    """Posterior predictive by moment propagation, with the call of ``pyro.infer.Predictive``.

    Li, Klasson, Solin, Trapp, *Streamlining Prediction in Bayesian Deep Learning* (ICLR 2025).
    Instead of averaging ``S`` forward passes over weight draws, the mean and (co)variance of every
    activation are carried through the network once (Gaussian moment matching at linear layers,
    moment matching or linearisation of activations, a Gaussian value path in attention; see
    :mod:`~pyro_subnet.infer.analytic.layers` for what is exact and what is approximated). At the
    output, with latent function :math:`f \\sim \\mathcal N(\\mu, \\Sigma)`:

    * classification, ``link="gumbel_max"``: :math:`\\mathbb E[\\mathrm{softmax}(f)]` as a
      multinomial probit with Clark's maximum (:func:`~pyro_subnet.infer.links.gumbel_max_softmax`;
      closed form, uses the covariance between the logits); ``link="sobol"``: a fixed quasi-Monte
      Carlo rule over the logits alone (:func:`~pyro_subnet.infer.links.sobol_softmax`: the
      Gaussian integral itself, ``S C^2`` operations per example); ``link="auto"`` (default): the
      Sobol rule with ``activations="linearise"``, the closed form otherwise. Linearised in the
      weights, the logits of a Gaussian posterior are exactly Gaussian, so the Gaussian integral
      is the predictive, and the closed form's error grows with the logits' variance (a broad
      Laplace posterior); with moment-matched activations the latent is Gaussian only by
      approximation, and the closed form is as close to Monte Carlo over the weights as the
      exact Gaussian integral (``benchmarks/results/analytic_predictive.txt``), at less cost;
      ``link="probit"``:
      :math:`p(y \\mid x) \\approx \\mathrm{softmax}(\\mu / \\sqrt{1 + \\tfrac{\\pi}{8} v})` (the paper's
      link; it uses the variances only and misses the tails when they are large);
    * regression: :math:`y \\mid x \\sim \\mathcal N(\\mu, v + \\sigma^2)`.

    Cost. Independent weights (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoDiagonalLaplace``)
    cost a few forward passes, also with the full covariance between the units of an example: it
    travels as the unformed factor :math:`W \\mathrm{diag}(\\sqrt v)` of the layer that creates it
    (:class:`~.gaussian_activation.ScaledFactor`), not as a matrix. Correlated weights add a factor of width
    ``r`` (the number of shared standard normals) to every activation, so the cost grows with ``r``;
    a dense covariance over ``k`` weights needs at least ``k^2`` multiply-adds per example for its
    quadratic form. Measured costs and accuracies are in ``benchmarks/results/analytic_predictive.txt``.

    :param model: a :class:`~pyro_subnet.nn.BayesianNet` (its plain network is walked layer by
        layer: ``nn.Sequential`` of ``Linear``, ``Conv2d``, elementwise activations, ``LayerNorm``,
        ``Dropout``, ``Flatten``/``Unflatten``, ``TransformerEncoderLayer``/``TransformerEncoder``),
        or any model the bridge reads whose forward calls such layers in a chain (traced once:
        :func:`~.forward_trace.walkable_network`).
    :param guide: ``AutoNormal``, ``AutoDiagonalNormal``, ``AutoMultivariateNormal``,
        ``AutoLowRankMultivariateNormal``, ``AutoDelta``, a guide with ``flat_posterior()``
        (``AutoSampledLaplace``: its samples as a low-rank factor; ``AutoDiagonalLaplace``) or
        ``flat_gaussian()`` (``AutoSubnetLaplace``: its covariance over the subnetwork, the MAP
        elsewhere), or a
        :class:`~pyro_subnet.infer.analytic.posterior.FlatPosterior`. The guide is read again
        whenever one of its tensors (module parameters and buffers, the Pyro param store) has been
        replaced or changed in place, so a guide trained further is picked up; otherwise what the
        layers derive from the posterior is reused.
    :param covariance: ``"full"``: a covariance between the features of each example (MLPs only),
        ``"diag"``: variances only (the paper's choice), ``"auto"`` (default): chosen per posterior
        by what it changes. Where the two cannot differ (not an MLP, or at most two linear layers:
        the first, on the data, is exactly diagonal and the output layer's covariance is kept
        anyway) the diagonal; otherwise both run on the first :data:`PROBE_ROWS` inputs and the full
        one is kept when the mean KL divergence of the diagonal predictive from it (for a softmax
        classifier an upper bound of it, :func:`utility_kl`) exceeds ``covariance_tolerance`` (the
        divergence is in :attr:`covariance_change`). The choice is made again when the guide changes.
    :param covariance_tolerance: nats; see ``covariance`` (default :data:`COVARIANCE_TOLERANCE`).
    :param batch_size: examples per pass (bounds memory); ``None``: all at once; ``"auto"``
        (default): all at once, except with correlated weights on CPU. There every activation carries
        an ``(N, F, r)`` tensor (a factor of width ``r``; ``F`` the largest activation of one example,
        traced once by :func:`widest_activation`), and passes whose largest such tensor holds
        about :data:`AUTO_BATCH_ELEMENTS` numbers are faster: they stay in cache and in the memory
        the allocator keeps, where whole-set tensors are handed back to the OS and page-faulted anew
        on every call (figures in ``docs/measured.md``).
    :param activations: ``"moments"``: exact mean and variance of each unit
        (:func:`~.nonlinear_moments.elementwise_moments`: rectified Gaussian for ReLU, Gauss-Hermite otherwise)
        with the expected slope for covariances, the predictive of the network at Gaussian weights;
        ``"linearise"``: linearisation at the mean (the paper's choice; it overestimates the variance
        of saturating units with a large variance); ``"auto"`` (default): ``"linearise"`` for a
        Laplace guide with ``predictive="glm"`` (its posterior is that of the network linearised at
        the MAP, so its predictive is the GLM one, the same that ``pyro.infer.Predictive`` draws
        through it; exact for its covariance over the weights, see ``products``), ``"moments"``
        otherwise.
    :param link: ``"auto"``, ``"gumbel_max"``, ``"sobol"`` or ``"probit"`` (classification; see above).
    :param products: where a layer's correlated weights meet a correlated input (a covariance that
        spans layers: ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``, a subnetwork
        over several layers), the products :math:`(G\\varepsilon)(A\\varepsilon)` (see
        :mod:`~pyro_subnet.infer.analytic.linear_moments`): ``True``: their mean and covariance (exact
        where the output is quadratic in the weights, e.g. two linear layers; memory ``P^2`` per
        example for ``P`` correlated weights in a layer; ``Conv2d`` keeps their mean only);
        ``False``: neither; ``"auto"`` (default): with ``activations="moments"`` their mean, and
        their covariance where it costs at most 8 times the layer's first-order terms (a
        subnetwork, not a dense factor over every weight); with ``activations="linearise"``
        neither, so that for a Gaussian without independent variances (a Laplace subnetwork) the
        predictive is exactly that of the network linearised in the weights, the GLM predictive.

    Calling ``pred(x)`` returns a dict with ``"f_mean"`` and ``"f_var"`` (the latent function's
    mean and variances, ``(N, O)``; ``"f_cov"`` ``(N, O, O)`` too with full covariance) and
    ``"probs"`` ``(N, C)`` (classification) or ``"mean"`` and ``"var"`` (regression; shaped as the
    observed site: ``(N,)`` for one output; ``var`` includes the noise).

    >>> pyro.set_rng_seed(0)
    >>> x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    >>> net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> model = ps.nn.BayesianNet(net, likelihood="classification")
    >>> guide = pyro.infer.autoguide.AutoNormal(model)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    >>> for _ in range(100):
    ...     loss = svi.step(x, y)
    >>> probs = ps.infer.AnalyticPredictive(model, guide)(x)["probs"]
    >>> probs.shape, torch.allclose(probs.sum(-1), torch.ones(10))
    (torch.Size([10, 3]), True)
    """

    def __init__(self, model, guide, covariance: str = "auto", batch_size: Union[int, str, None] = "auto",
                 activations: str = "auto", link: str = "auto", products="auto",
                 covariance_tolerance: float = COVARIANCE_TOLERANCE):
        check_model(model, "AnalyticPredictive")
        if covariance not in ("auto", "full", "diag"):
            raise ValueError(f"AnalyticPredictive: covariance must be 'auto', 'full' or 'diag', got {covariance!r}.")
        if not (isinstance(covariance_tolerance, numbers.Real) and covariance_tolerance >= 0):
            raise ValueError(f"AnalyticPredictive: covariance_tolerance must be a number >= 0 (nats), got "
                             f"{covariance_tolerance!r}.")
        self.covariance_tolerance = float(covariance_tolerance)
        if activations not in ("auto", "moments", "linearise"):
            raise ValueError(f"AnalyticPredictive: activations must be 'auto', 'moments' or 'linearise', got "
                             f"{activations!r}.")
        if activations == "auto":
            # a Laplace guide's posterior is that of the network linearised at the MAP: its
            # predictive (the one its own Predictive draws) is the linearised one
            activations = "linearise" if getattr(guide, "predictive", None) == "glm" else "moments"
        self.activations = activations
        if link not in ("auto", "sobol", "gumbel_max", "probit"):
            raise ValueError(f"AnalyticPredictive: link must be 'auto', 'gumbel_max', 'sobol' or 'probit', got "
                             f"{link!r}.")
        if link == "auto":
            # linearised, the logits are exactly Gaussian: integrate that Gaussian itself
            link = "sobol" if activations == "linearise" else "gumbel_max"
        self.link = link
        if products not in (True, False, "auto"):
            raise ValueError(f"AnalyticPredictive: products must be True, False or 'auto', got {products!r}.")
        self.products = products
        if batch_size is None or isinstance(batch_size, str):
            valid = batch_size in (None, "auto")
        else:
            valid = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size >= 1
            batch_size = int(batch_size) if valid else batch_size     # (a numpy integer: a plain int)
        if not valid:
            raise ValueError(f"AnalyticPredictive: batch_size must be a positive integer, 'auto' or None, got "
                             f"{batch_size!r}.")
        self.model = model
        self.guide = guide
        self.batch_size = batch_size
        self.covariance = covariance
        self.full = covariance == "full"
        self.covariance_change = None
        self._cache = None
        self._modules = None
        self._widest = {}
        self.bridge = None
        # The model is read now where the guide says on what inputs (a Laplace guide's bridge, or
        # the inputs an AutoGuide was set up with), else on the first call.
        bridge = getattr(guide, "bridge", None)
        if bridge is None:
            trace = getattr(guide, "prototype_trace", None)
            args = trace.nodes["_INPUT"]["args"] if trace is not None and "_INPUT" in trace.nodes else ()
            if args and torch.is_tensor(args[0]):
                bridge = _bridge_on_few(model, args[0])
        if bridge is not None:
            self._read_model(bridge)

    def prepare(self, x) -> torch.Tensor:
        """Read the model on inputs like ``x`` if that is not done yet (the first call does it), and
        return ``x`` checked against it."""
        if self.bridge is None:
            self._read_model(_bridge_on_few(self.model, x))
        return self.bridge.check(x)[0]

    def _read_model(self, bridge: ModelBridge) -> None:
        """The walkable network of the model (its own plain module, or the layers its forward runs,
        traced) and which covariance representations can differ on it."""
        self.bridge = bridge
        self.net = walkable_network(bridge)
        mlp = layers.is_mlp(self.net)
        if self.covariance == "full" and not mlp:
            raise ValueError("AnalyticPredictive: covariance='full' supports MLPs only (Linear layers and "
                             "elementwise activations); use covariance='diag'.")
        # "auto" weighs the two only where they can differ: an MLP with a hidden layer between two
        # others (the first on the data is exactly diagonal, the output's covariance is kept anyway)
        self._weigh_covariance = self.covariance == "auto" and mlp and layers.count_linear(self.net) > 2
        self._output_linear = layers.output_linear(self.net)

    def _noise_var(self) -> float:
        """The observation noise variance: a noise site at the guide's median (a Laplace guide
        holds its tuned value), else the likelihood's noise scale."""
        bridge = self.bridge
        if bridge.noise_site is not None and callable(getattr(self.guide, "median", None)):
            sigma = self.guide.median().get(bridge.noise_site)
            if sigma is not None:
                return float(sigma.reshape(())) ** 2
        return float(bridge.likelihood.noise_scale) ** 2

    def _site_posterior(self, x: torch.Tensor) -> Tuple[SitePosterior, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """The per-site posterior, read from the guide again only when one of its tensors has changed
        (a new tensor, or an in-place update such as an optimiser step: ``tensor._version``), so that
        repeated predictions skip reading the guide and everything the layers derive from it. Under
        ``covariance="auto"`` the representation is chosen then (:meth:`_choose_covariance`, on the
        first rows of ``x``) and kept while the posterior stays the same.

        :returns: the posterior and, where a choice was just made, the chosen representation's latent
            moments on those first rows (the probe's, part of the prediction at ``x``), else ``None``."""
        if self._modules is None and isinstance(self.guide, torch.nn.Module) and getattr(
                self.guide, "prototype_trace", True) is not None:
            self._modules = list(self.guide.modules())    # fixed once the guide is set up
        tensors = _guide_tensors(self.guide, self._modules)
        key = (x.dtype, x.device, self.activations, self.products, len(tensors))
        cached = self._cache
        if (cached is not None and cached[0] == key
                and all(a is b and v == b._version for (a, v), b in zip(cached[1], tensors))):
            return cached[2], None
        flat = self.posterior()
        head = None
        if self._weigh_covariance:
            post, head = self._choose_covariance(flat, x)
        else:
            post = self._site_view(flat, x, self.full)
        self._cache = (key, [(t, t._version) for t in tensors], post)
        return post, head

    def _site_view(self, flat: FlatPosterior, x: torch.Tensor, full: bool) -> SitePosterior:
        return SitePosterior(flat, self.bridge.layout, x.dtype, x.device, full=full, activations=self.activations,
                             products=self.products, full_output_at=self._output_linear)

    def _choose_covariance(self, flat: FlatPosterior, x: torch.Tensor) -> SitePosterior:
        """``covariance="auto"``: the diagonal representation unless the full one measurably changes
        the predictive. Both run on the first :data:`PROBE_ROWS` inputs; the full one is kept when
        the mean Kullback-Leibler divergence of the diagonal predictive from the full one,
        :math:`\\tfrac1n \\sum_i \\mathrm{KL}(p_{\\text{full}}(y \\mid x_i) \\,\\|\\, p_{\\text{diag}}(y \\mid x_i))`,
        exceeds ``covariance_tolerance`` nats: for a softmax classifier its upper bound, the
        divergence of the Gaussian utilities the link integrates (:func:`utility_kl`: it needs no
        call of the link, which costs as much on a few rows as on thousands), for regression and
        binary classification the divergence of the predictives themselves. The divergence is kept
        in :attr:`covariance_change`.

        :returns: the chosen representation and its latent moments on the probe rows."""
        probe = x[:PROBE_ROWS]
        diag = self._site_view(flat, x, False)
        views = {False: diag, True: diag.with_full(True)}      # (one reading of the posterior, shared)
        latents = {full: self._latent(probe, views[full]) for full in views}
        if self.bridge.likelihood.name == "classification":
            change = utility_kl(latents[True], latents[False])
        else:
            change = _predictive_kl(self._outputs(*latents[True]), self._outputs(*latents[False]))
        self.covariance_change = float(change)
        self.full = self.covariance_change > self.covariance_tolerance
        return views[self.full], latents[self.full]

    def posterior(self) -> FlatPosterior:
        """The guide's Gaussian over the flat weights, in the bridge's layout order."""
        return read_posterior(self.guide, self.bridge.layout)

    def _batch_rows(self, post: SitePosterior, x: torch.Tensor) -> int:
        """Examples per pass: ``batch_size``, or under ``"auto"`` (see the class docstring) enough for
        ``rows * r * F ~ AUTO_BATCH_ELEMENTS``, ``F`` the largest activation of one example (at least
        16 rows)."""
        if self.batch_size is None:
            return x.shape[0]
        if self.batch_size != "auto":
            return self.batch_size
        r = post.factor_width
        if not r or x.device.type != "cpu":   # (GPUs favour one large pass)
            return x.shape[0]
        net = self.net
        key = (id(net), tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._widest:
            self._widest[key] = widest_activation(net, x.shape[1:], x.dtype, x.device)
        widest = self._widest[key]
        return x.shape[0] if widest is None else max(16, AUTO_BATCH_ELEMENTS // (r * widest))

    @torch.no_grad()
    def latent(self, x: torch.Tensor):
        """Mean ``(N, O)`` and variances ``(N, O)`` or covariance ``(N, O, O)`` of ``f(x)``."""
        x = self.prepare(x)
        post, head = self._site_posterior(x)
        if head is None:
            return self._latent(x, post)
        # the probe rows are predicted already, by the representation chosen on them
        rows = head[0].shape[0]
        if rows == x.shape[0]:
            return head
        mean, var = self._latent(x[rows:], post)
        return torch.cat([head[0], mean]), torch.cat([head[1], var])

    def _latent(self, x: torch.Tensor, post: SitePosterior):
        net = self.net
        outs = []
        step = self._batch_rows(post, x)
        for start in range(0, x.shape[0], step):      # (step >= 1: check_model_data rejects an empty x)
            xb = x[start:start + step]
            # The data is known (var None): the first layer's output is then exactly diagonal.
            outs.append(layers.propagate(net, gaussian_activation.Gaussian(xb, None), post))
        if outs[0].mean.dim() != 2:
            raise ValueError(f"AnalyticPredictive: the network output has shape {tuple(outs[0].mean.shape)}, "
                             "expected (N, O).")
        mean = torch.cat([o.mean for o in outs])
        if post.full or outs[0].full:
            return mean, torch.cat([o.total_cov() for o in outs])
        return mean, torch.cat([o.total_var() for o in outs])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Predict at ``x`` (further model arguments such as ``y`` are ignored)."""
        return self._outputs(*self.latent(x))

    def _outputs(self, mean: torch.Tensor, var: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The prediction from the latent moments: the link (classification) or the noise (regression)."""
        full = var.dim() == 3
        out = {"f_mean": mean, "f_var": var.diagonal(dim1=-2, dim2=-1) if full else var}
        if full:
            out["f_cov"] = var
        lik = self.bridge.likelihood
        if lik.name == "classification":
            link = self.link
            if link == "probit":
                out["probs"] = links.probit(mean, out["f_var"])
            elif link == "sobol":
                out["probs"] = links.sobol_softmax(mean, var)
            else:
                out["probs"] = links.gumbel_max_softmax(mean, var)
        elif lik.name == "binary":
            out["probs"] = links.probit(mean, out["f_var"], binary=True)
        elif lik.name == "regression":
            m, v = mean, out["f_var"] + self._noise_var()
            if m.shape[-1] == 1:
                m, v = m[..., 0], v[..., 0]
            out["mean"], out["var"] = m, v
        else:
            raise ValueError(f"AnalyticPredictive: unsupported likelihood {lik.name!r}.")
        return out
