"""Is the large-noise region of the latent-noise gap network a posterior mode? NUTS from there.

The 1-20-1 tanh network of :mod:`gap_reference` with ``sigma ~ HalfNormal(1)`` has a region where
the noise explains the signal (sigma about 0.3, the weights near the prior): Adam fitted jointly
from the start (``fit_map(noise_warmup=0)``) and AnnealedSMC from the prior both end there. This
script starts Pyro's NUTS at that MAP and prints where its draws go: back to the small noise
(about 0.1) means the region is no posterior mode that a sampler from the prior would have to
weigh, only a trap of local moves on the annealed targets.

    python benchmarks/nuts_noise_modes.py            # 200 warm-up + 200 draws, about 5-10 minutes
"""

from __future__ import annotations

import time

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from pyro_subnet.infer import fit_map
from pyro_subnet.nn import ModelBridge
from gap_reference import TanhBNN, gap_data, nuts_parser


def main(argv=None):
    args = nuts_parser(__doc__.split("\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    ds, _ = gap_data(args.n)
    pyro.set_rng_seed(0)
    model = TanhBNN(args.hidden, noise=None)
    bridge = ModelBridge(model, ds.x_train)
    fit = fit_map(bridge, ds.x_train, ds.y_train, num_steps=3000, progress=False, noise_warmup=0)
    start = {name: value.detach() for name, value in bridge.layout.unflatten(fit.theta).items()}
    start["sigma"] = torch.tensor(fit.noise_scale)
    pyro.set_rng_seed(1)
    mcmc = MCMC(NUTS(model, init_strategy=init_to_value(values=start)), num_samples=args.samples,
                warmup_steps=args.warmup, disable_progbar=True)
    t0 = time.perf_counter()
    mcmc.run(ds.x_train, ds.y_train)
    sigma = mcmc.get_samples()["sigma"].reshape(-1)
    print(f"1-{args.hidden}-1 tanh, {args.n} points, latent noise: NUTS from the joint-from-start MAP "
          f"(sigma {fit.noise_scale:.4f}), {args.warmup} warm-up + {args.samples} draws: sigma mean "
          f"{sigma.mean():.4f}, sd {sigma.std():.4f}, first 20 draws {sigma[:20].mean():.4f}, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
