"""Score networks and denoising score matching (DSM) with Tikhonov penalties.

A :class:`ScoreMLP` holds ``K`` independent MLPs of one shape as stacked weights and evaluates
them with batched matrix products, so a whole sweep (the paper's five ``lambda``, or the two
parameterizations) trains in one loop. Each model ``k`` sees the input
``[x, gaussian_fourier(t)]`` and has a parameterization:

* ``'score'`` (:class:`ScoreParameterization`): the network output is the score ``s``; DSM
  loss ``|sigma s + z|^2``;
* ``'noise'`` (:class:`NoiseParameterization`): the output predicts the (negative) noise; loss
  ``|net + z|^2``, score ``net / sigma`` (the "built-in singularity").

Training minimises, per model, ``E |a(t) net + z|^2 + E <s, Lambda_k(t) s>`` with
``t ~ U(t_min, 1)``, ``z ~ N(0, I)``, ``x_t = m(t) x_0 + sigma(t) z`` and ``a = sigma`` or 1.
For ``Lambda = lambda I`` the minimizer is the closed-form Tikhonov score with ``c = lambda``:
``s = (D_e - x) / (sigma^2 + lambda)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffmem._checks import (
    fail,
    finite_tensor,
    nonnegative,
    positive,
    positive_int,
    training_set,
)
from diffmem.schedules import Schedule, TimeLike, expand_as_batch, time_tensor
from diffmem.training import (
    EMA,
    Checkpoints,
    check_losses,
    decay_from_half_life,
    fingerprint,
    half_life_from_decay,
    restore_rng,
)


class Parameterization:
    """How a network output ``net`` relates to the score and which DSM loss trains it:
    ``loss = |a(sigma) net + z|^2 + lambda |s|^2`` with ``s = net * q(sigma)^-1``. Subclasses
    set ``a`` (:meth:`fit_scale`) and ``q`` (:meth:`to_score`)."""

    name: str = ""

    def fit_scale(self, sigma: Tensor) -> Tensor:
        """``a(sigma)`` of the fit term ``|a net + z|^2``."""
        raise NotImplementedError

    def penalty_scale(self, sigma: Tensor) -> Tensor:
        """``q^-2``: ``|s|^2 = q^-2 |net|^2``."""
        raise NotImplementedError

    def to_score(self, out: Tensor, sigma: Tensor) -> Tensor:
        """The score ``s`` from outputs ``out`` ``(B, d)`` at noise levels ``sigma`` ``(B,)``."""
        raise NotImplementedError

    def to_sigma2_score(self, out: Tensor, sigma: Tensor) -> Tensor:
        """``sigma^2 s``, finite at ``sigma = 0``."""
        raise NotImplementedError

    def loss(self, out: Tensor, z: Tensor, sigma: Tensor, penalty: Tensor | float) -> Tensor:
        """``mean_b |a net + z|^2 + mean_b sum_i Lambda_i s_i^2`` for one model: ``out`` and
        ``z`` ``(B, d)``, ``sigma`` ``(B,)``."""
        s = self.to_score(out, sigma)
        fit = ((self.fit_scale(sigma)[:, None] * out + z) ** 2).sum(-1).mean(-1)
        return fit + (penalty * s * s).sum(-1).mean(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScoreParameterization(Parameterization):
    """The network is the score: ``s = net``, loss ``|sigma net + z|^2`` (``a = sigma``,
    ``q = 1``)."""

    name = "score"

    def fit_scale(self, sigma: Tensor) -> Tensor:
        return sigma

    def penalty_scale(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def to_score(self, out: Tensor, sigma: Tensor) -> Tensor:
        return out

    def to_sigma2_score(self, out: Tensor, sigma: Tensor) -> Tensor:
        return expand_as_batch(sigma * sigma, out) * out


class NoiseParameterization(Parameterization):
    """The network predicts the negative noise: loss ``|net + z|^2`` (``a = 1``), score
    ``s = net / sigma`` (``q = sigma``: the built-in singularity)."""

    name = "noise"

    def fit_scale(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def penalty_scale(self, sigma: Tensor) -> Tensor:
        return 1 / (sigma * sigma)

    def to_score(self, out: Tensor, sigma: Tensor) -> Tensor:
        return out / expand_as_batch(sigma, out)

    def to_sigma2_score(self, out: Tensor, sigma: Tensor) -> Tensor:
        return expand_as_batch(sigma, out) * out


#: The parameterizations by name.
PARAMETERIZATIONS: dict[str, Parameterization] = {
    p.name: p for p in (ScoreParameterization(), NoiseParameterization())}


def parameterization(name: str) -> Parameterization:
    """Look a parameterization up by name (``'score'`` or ``'noise'``)."""
    if name not in PARAMETERIZATIONS:
        raise fail("parameterization", f"one of {tuple(PARAMETERIZATIONS)}", repr(name))
    return PARAMETERIZATIONS[name]


def _stacked(params: Sequence[Parameterization], method: str, sigma: Tensor) -> Tensor:
    """``getattr(param_k, method)(sigma[k])`` for every model ``k``, stacked (one call on the
    whole stack when all models share a parameterization: the same values, elementwise)."""
    if all(p is params[0] for p in params):
        return getattr(params[0], method)(sigma)
    return torch.stack([getattr(p, method)(sigma[k]) for k, p in enumerate(params)])

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu, "silu": nn.functional.silu, "tanh": torch.tanh,
    "gelu": nn.functional.gelu,
}


@dataclass(frozen=True)
class MLPConfig:
    """Shape of the score MLP: input ``[x, embedding(t)]``, one input layer, ``depth``
    hidden-to-hidden layers of ``width`` units, a linear output layer."""

    dim: int
    width: int = 256
    depth: int = 2
    activation: str = "relu"
    n_fourier: int = 8
    fourier_scale: float = 1.0
    cond_dim: int = 0

    def __post_init__(self) -> None:
        positive_int("dim", self.dim)
        if isinstance(self.cond_dim, bool) or int(self.cond_dim) != self.cond_dim or \
                self.cond_dim < 0:
            raise fail("cond_dim", "an integer >= 0", self.cond_dim)
        positive_int("width", self.width)
        if isinstance(self.depth, bool) or int(self.depth) != self.depth or self.depth < 0:
            raise fail("depth", "an integer >= 0", self.depth)
        if self.activation not in ACTIVATIONS:
            raise fail("activation", f"one of {sorted(ACTIVATIONS)}", repr(self.activation))
        if self.n_fourier < 2 or self.n_fourier % 2:
            raise fail("n_fourier", "an even integer >= 2", self.n_fourier)
        positive("fourier_scale", self.fourier_scale)


class ScoreMLP(nn.Module):
    """``K`` MLPs with stacked weights. ``forward(x, t)`` takes ``x`` ``(K, B, dim)`` and ``t``
    ``(K, B)`` and returns the raw outputs ``(K, B, dim)``; :class:`NetworkScore` turns model
    ``k`` into a score according to its parameterization."""

    def __init__(self, config: MLPConfig, parameterizations: Sequence[str],
                 seed: int = 0) -> None:
        super().__init__()
        if not parameterizations:
            raise fail("parameterizations", "at least one model", "an empty list")
        self.config = config
        self.parameterizations = tuple(parameterizations)
        self.params_k = [parameterization(p) for p in parameterizations]
        K = len(parameterizations)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "freqs", config.fourier_scale * torch.randn(K, config.n_fourier // 2, generator=gen))
        sizes = ([config.dim + config.cond_dim + config.n_fourier]
                 + [config.width] * (config.depth + 1)
                 + [config.dim])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation
            w = (torch.rand(K, fan_in, fan_out, generator=gen) * 2 - 1) * bound
            b = (torch.rand(K, 1, fan_out, generator=gen) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    @property
    def n_models(self) -> int:
        return len(self.parameterizations)

    def n_parameters(self) -> int:
        """Trainable parameters of one model."""
        return sum(p[0].numel() for p in self.parameters())

    def embed(self, t: Tensor, k: slice = slice(None)) -> Tensor:
        """Gaussian Fourier features ``[sin(2 pi w t), cos(2 pi w t)]`` of models ``k``,
        ``(K, B, n_fourier)``."""
        angle = 2 * math.pi * t[..., None] * self.freqs[k][:, None, :].to(t)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    def inputs(self, x: Tensor, t: Tensor, y: Tensor | None = None,
               k: slice = slice(None)) -> Tensor:
        """The network input ``[x, y, embedding(t)]`` (``y`` only for conditional models)."""
        if (y is None) != (self.config.cond_dim == 0):
            raise fail("y", f"a condition of {self.config.cond_dim} values per sample"
                       if self.config.cond_dim else "no condition (unconditional model)",
                       None if y is None else tuple(y.shape))
        parts = [x] if y is None else [x, y.to(x)]
        return torch.cat([*parts, self.embed(t, k).to(x)], dim=-1)

    def forward(self, x: Tensor, t: Tensor, k: slice = slice(None),
                y: Tensor | None = None) -> Tensor:
        """Raw outputs of models ``k`` (all by default) for ``x`` ``(K, B, dim)``, ``t``
        ``(K, B)`` and, for conditional models, ``y`` ``(K, B, cond_dim)``."""
        act = ACTIVATIONS[self.config.activation]
        h = self.inputs(x, t, y, k)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b[k], h, w[k])
            if i < last:
                h = act(h)
        return h


def dsm_loss(out: Tensor, z: Tensor, sigma: Tensor, params: Sequence[Parameterization],
             penalty: Tensor) -> Tensor:
    """Per-model DSM loss with Tikhonov penalty, ``(K,)``: :meth:`Parameterization.loss` of
    model ``k``'s parameterization on the stacked batch,

        mean_b |a net + z|^2 + mean_b sum_i Lambda_i s_i^2,

    ``a = sigma``, ``s = net`` (score models) or ``a = 1``, ``s = net / sigma`` (noise models);
    ``penalty`` ``Lambda`` broadcasts to ``(K, B, dim)``."""
    a = _stacked(params, "fit_scale", sigma)[..., None]
    s = torch.stack([p.to_score(out[k], sigma[k]) for k, p in enumerate(params)])
    fit = ((a * out + z) ** 2).sum(-1).mean(-1)
    reg = (penalty * s * s).sum(-1).mean(-1)
    return fit + reg


def manual_relu_step(model: ScoreMLP, x: Tensor, t: Tensor, z: Tensor, sigma: Tensor,
                     penalty: Tensor, y: Tensor | None = None) -> Tensor:
    """Forward pass, :func:`dsm_loss` and its exact gradients for ReLU models, written out
    by hand (no autograd graph: for these small networks the graph's bookkeeping costs more
    than the arithmetic). Sets ``.grad`` of every parameter; returns the losses ``(K,)``.

    With ``r = a out + z`` the output gradient is ``(2/B) (a r + Lambda out / q^2)`` where
    ``q = sigma`` for noise models and 1 for score models; it is propagated back through
    ``h_{i+1} = relu(h_i W_i + b_i)``.
    """
    hs = [model.inputs(x, t, y)]
    layers = list(zip(model.weights, model.biases, strict=True))
    for w, b in layers[:-1]:
        hs.append(torch.relu(torch.baddbmm(b, hs[-1], w)))
    w_out, b_out = layers[-1]
    out = torch.baddbmm(b_out, hs[-1], w_out)
    a = _stacked(model.params_k, "fit_scale", sigma)[..., None]
    inv_q2 = _stacked(model.params_k, "penalty_scale", sigma)[..., None]
    r = a * out + z
    pen = penalty * inv_q2
    losses = (r * r).sum(-1).mean(-1) + (pen * out * out).sum(-1).mean(-1)
    g = (2.0 / out.shape[1]) * (a * r + pen * out)
    for i in range(len(layers) - 1, -1, -1):
        w, b = layers[i]
        w.grad = torch.bmm(hs[i].transpose(1, 2), g)
        b.grad = g.sum(1, keepdim=True)
        if i > 0:
            g = torch.bmm(g, w.transpose(1, 2)).mul_(hs[i] > 0)
    return losses


def _flush_tiny_state(opt: torch.optim.Optimizer, threshold: float = 1e-30) -> None:
    """Zero Adam moments below ``threshold``. The moments of a dead ReLU unit decay
    geometrically (``0.9^n``, ``0.999^n``) into the denormal range, where CPU arithmetic runs
    several times slower (measured: 70 instead of 240 steps/s); values this small change
    no update (the step is ``m / (sqrt(v) + 1e-8)``). Called every 100 steps, it keeps every
    moment out of that range (``1e-30 * 0.9^100 > 1e-38``)."""
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            v = state.get(key)
            if v is not None:
                v.masked_fill_(v.abs() < threshold, 0.0)


@dataclass
class TrainConfig:
    """Everything that determines a training run (hashed into its checkpoints)."""

    lambdas: list[float]
    parameterizations: list[str]
    steps: int
    lr: float = 1e-3
    ema_half_life: float = half_life_from_decay(0.9999)
    batch_size: int | None = None
    t_min: float = 1e-5
    seed: int = 0
    schedule: str = "VP"
    mlp: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.lambdas) != len(self.parameterizations):
            raise fail("lambdas", f"one value per model ({len(self.parameterizations)})",
                       len(self.lambdas))
        self.lambdas = [nonnegative("lambda", v) for v in self.lambdas]
        for p in self.parameterizations:
            parameterization(p)
        positive_int("steps", self.steps)
        positive("lr", self.lr)
        decay_from_half_life(self.ema_half_life)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        if not 0 <= self.t_min < 1:
            raise fail("t_min", "a number in [0, 1)", self.t_min)

    @property
    def ema_decay(self) -> float:
        """The EMA's per-step decay ``0.5^(1 / ema_half_life)``."""
        return decay_from_half_life(self.ema_half_life)

    def fingerprint(self, train: Tensor, train_y: Tensor | None = None,
                    schedule: Schedule | None = None) -> str:
        """Hash of the configuration (without ``steps``, so a run may be extended), the
        schedule's parameters and the data."""
        cfg = asdict(self)
        cfg.pop("steps")
        if schedule is not None:
            cfg["schedule_parameters"] = repr(schedule)
        return fingerprint(cfg, train, train_y)


@dataclass
class Trained:
    """A trained stack: the model (raw weights), its EMA copy, the loss history
    ``(step, losses)``, the EMA's weight on the initialisation and what the callback returned
    at each checkpoint step (kept in the checkpoints, so a resumed run has them all)."""

    model: ScoreMLP
    ema: ScoreMLP
    history: list[tuple[int, list[float]]]
    ema_init_weight: float
    evaluations: dict[int, Any] = field(default_factory=dict)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the largest step in ``folder`` (``None`` if there is none)."""
    return Checkpoints(folder, "").latest()


def checkpoint_steps(steps: int, every: int | None = None, n_log: int | None = None) -> list[int]:
    """Steps at which to checkpoint: every ``every`` steps, or ``n_log`` log-spaced steps;
    always including the last step."""
    out = {steps}
    if every:
        out.update(range(every, steps + 1, positive_int("checkpoint_every", every)))
    if n_log:
        out.update(int(round(v)) for v in torch.logspace(0, math.log10(steps), n_log).tolist())
    return sorted(s for s in out if 1 <= s <= steps)


def _noisy_batch(flat: Tensor, cond: Tensor | None, K: int, batch_size: int | None,
                 t_min: float, schedule: Schedule, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """One DSM batch per model: ``x_0`` (all training points in order, or ``batch_size``
    drawn with replacement, with their conditions ``y``), ``t ~ U(t_min, T)``,
    ``z ~ N(0, I)`` and ``x_t = m(t) x_0 + sigma(t) z``. Returns ``x_t``, ``t``, ``z``,
    ``sigma`` and ``y``."""
    N, d = flat.shape
    dev = flat.device
    if batch_size is None:
        B = N
        x0 = flat.expand(K, N, d)
        y0 = None if cond is None else cond.expand(K, N, cond.shape[1])
    else:
        B = batch_size
        idx = torch.randint(0, N, (K, B), generator=gen, device=dev)
        x0 = flat[idx]
        y0 = None if cond is None else cond[idx]
    t = t_min + (schedule.T - t_min) * torch.rand(K, B, generator=gen, device=dev)
    z = torch.randn(K, B, d, generator=gen, device=dev)
    co = schedule.coefficients(t)
    sigma = co["sigma2"].sqrt()
    return co["m"][..., None] * x0 + sigma[..., None] * z, t, z, sigma, y0


def train_dsm(
    train: Tensor,
    schedule: Schedule,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    checkpoints: Sequence[int] = (),
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callable[[int, ScoreMLP, ScoreMLP], Any] | None = None,
    log_every: int = 100,
    manual_gradients: bool = True,
    train_y: Tensor | None = None,
    penalty: Callable[[Tensor], Tensor] | None = None,
) -> Trained:
    """Train a stack of score MLPs (one per entry of ``config.lambdas``) by DSM with penalty
    ``lambda_k E|s|^2``, Adam and an EMA of the weights (half-life ``config.ema_half_life``).

    Each step draws, per model, a batch of training points (all of them, in order, when
    ``batch_size`` is None; else with replacement), ``t ~ U(t_min, T)`` and ``z ~ N(0, I)``
    from one seeded generator. At each step in ``checkpoints`` (and at the end) the model,
    EMA, optimizer and generator states are written atomically to ``checkpoint_dir``;
    ``resume`` continues from the latest one there (its configuration and schedule must
    match) and ends with the same weights as an uninterrupted run. ``callback(step, model,
    ema)`` runs at each checkpoint step; what it returns is kept in ``Trained.evaluations``
    and in the checkpoints. With ``train_y`` (one condition per training point) the networks
    are conditional: ``y`` is an extra input, drawn with its ``x_0``. ReLU networks use the
    hand-written gradients of :func:`manual_relu_step` (equal to autograd's;
    ``manual_gradients=False`` uses autograd). ``penalty(t)`` (``t`` of shape ``(K, B)``)
    returns a diagonal weight broadcastable to ``(K, B, d)``: the penalty becomes
    ``lambda_k E <s, diag(penalty(t)) s>``, whose minimizer is
    ``(sigma^2 I + lambda_k diag(penalty(t)))^-1 sigma^2 grad log p_t``. A non-finite loss
    stops training with a ``ValueError`` naming the step and the learning rate.
    """
    flat, cond = _training_rows(train, schedule, config, torch.device(device), train_y)
    dev = flat.device
    mlp_cfg = MLPConfig(dim=flat.shape[1], cond_dim=0 if cond is None else cond.shape[1],
                        **config.mlp)
    K = len(config.lambdas)
    model = ScoreMLP(mlp_cfg, config.parameterizations, seed=config.seed).to(dev)
    ema = EMA(model, config.ema_half_life, config.steps)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    fingerprint = config.fingerprint(flat, cond, schedule) + (
        "" if penalty is None else f"-{getattr(penalty, '__name__', type(penalty).__name__)}")
    store = Checkpoints(checkpoint_dir, fingerprint)
    lambdas = torch.tensor(config.lambdas, dtype=torch.float32, device=dev)[:, None, None]
    start, history, evaluations = 0, [], {}
    if resume and checkpoint_dir is not None and (state := store.load_latest(dev, config.steps)):
        start, history, evaluations = _restored(state, model, ema, opt, gen, config.steps)
    marks = set(checkpoints) | {config.steps}
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               desc="DSM training", disable=not progress, leave=False)
    manual = mlp_cfg.activation == "relu" and manual_gradients
    for step in bar:
        x_t, t, z, sigma, y0 = _noisy_batch(flat, cond, K, config.batch_size, config.t_min,
                                            schedule, gen)
        weight = lambdas if penalty is None else lambdas * penalty(t).to(lambdas)
        losses = _dsm_step(model, opt, x_t, t, z, sigma, weight, y0, manual)
        check_losses(losses.detach(), step + 1, config.lr, store.latest())
        opt.step()
        ema.update()
        if step % 100 == 0:
            _flush_tiny_state(opt)
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            values = losses.detach().cpu().tolist()
            history.append((done, values))
            bar.set_postfix(loss=f"{sum(values) / K:.4f}")
        if done in marks:
            if callback is not None and (result := callback(done, model, ema.model)) is not None:
                evaluations[done] = result
            store.save(done, {"model": model.state_dict(), "ema": ema.model.state_dict(),
                              "optimizer": opt.state_dict(), "rng": gen.get_state(),
                              "history": history, "evaluations": evaluations,
                              "config": asdict(config)})
    bar.close()
    return Trained(model=model, ema=ema.model, history=history,
                   ema_init_weight=ema.init_share, evaluations=evaluations)


def _restored(state: dict[str, Any], model: ScoreMLP, ema: EMA, opt: torch.optim.Optimizer,
              gen: torch.Generator, steps: int) -> tuple[int, list[Any], dict[int, Any]]:
    """A checkpoint's weights, EMA, optimizer and generator states loaded; its step, loss
    history and evaluations (its step at most ``steps``)."""
    model.load_state_dict(state["model"])
    ema.model.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    restore_rng(gen, state["rng"])
    start = int(state["step"])
    if start > steps:
        raise fail("steps", f"at least the checkpoint's step {start}", steps)
    return start, [tuple(h) for h in state["history"]], dict(state.get("evaluations", {}))


def _training_rows(train: Tensor, schedule: Schedule, config: TrainConfig,
                   dev: torch.device, train_y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The training points as float32 rows on ``dev`` and their conditions (checked: the
    schedule is the configuration's, one condition per point)."""
    train = training_set("train", train)
    if not isinstance(schedule, Schedule):
        raise fail("schedule", "a diffmem.schedules.Schedule", type(schedule).__name__)
    if config.schedule != schedule.name:
        raise fail("schedule", f"the configuration's schedule {config.schedule!r}",
                   repr(schedule))
    flat = train.reshape(train.shape[0], -1).to(dtype=torch.float32, device=dev)
    if train_y is None:
        return flat, None
    N = flat.shape[0]
    if not isinstance(train_y, Tensor) or train_y.shape[0] != N:
        raise fail("train_y", f"one condition per training point ({N})",
                   tuple(train_y.shape) if isinstance(train_y, Tensor) else train_y)
    return flat, train_y.reshape(N, -1).to(dtype=torch.float32, device=dev)


def _dsm_step(model: ScoreMLP, opt: torch.optim.Optimizer, x_t: Tensor, t: Tensor, z: Tensor,
              sigma: Tensor, weight: Tensor, y0: Tensor | None, manual: bool) -> Tensor:
    """Each model's DSM loss on one batch, its gradients set (by hand for ReLU networks,
    :func:`manual_relu_step`, else by autograd)."""
    if manual:
        with torch.no_grad():
            return manual_relu_step(model, x_t, t, z, sigma, weight, y0)
    losses = dsm_loss(model(x_t, t, y=y0), z, sigma, model.params_k, weight)
    opt.zero_grad(set_to_none=True)
    losses.sum().backward()
    return losses


class NetworkScore:
    """Model ``k`` of a :class:`ScoreMLP` as a score ``score(x, t)`` (``score(x, t, y)`` for a
    conditional model) usable by every sampler: ``x`` ``(B, *data_shape)`` with
    ``prod(data_shape)`` the model's dimension, ``t`` a float or ``(B,)``, ``y``
    ``(B, cond_dim)``. Inputs are checked (``ValueError`` naming the argument); an empty batch
    gives an empty result. The noise parameterization's score ``net / sigma`` is singular at
    ``t = 0`` and raises there (its ``sigma2_score`` is finite)."""

    def __init__(self, model: ScoreMLP, schedule: Schedule, k: int = 0) -> None:
        if not isinstance(model, ScoreMLP):
            raise fail("model", "a diffmem.nn.ScoreMLP", type(model).__name__)
        if not isinstance(schedule, Schedule):
            raise fail("schedule", "a diffmem.schedules.Schedule", type(schedule).__name__)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < model.n_models:
            raise fail("k", f"a model index in [0, {model.n_models})", k)
        self.model, self.schedule, self.k = model, schedule, k

    def _raw(self, x: Tensor, t: TimeLike, y: Tensor | None) -> tuple[Tensor, Tensor]:
        dim = self.model.config.dim
        if not isinstance(x, Tensor) or x.dim() < 2 or math.prod(x.shape[1:]) != dim:
            raise fail("x", f"a tensor (batch, ...) with {dim} values per sample",
                       f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
        if not x.is_floating_point():
            raise fail("x", "a floating-point tensor", x.dtype)
        finite_tensor("x", x)
        B = x.shape[0]
        tt = time_tensor(t)
        if tt.dim() > 1 or (tt.dim() == 1 and tt.shape[0] != B):
            raise fail("t", f"a float or a tensor of shape () or ({B},)",
                       f"shape {tuple(tt.shape)}")
        tt = tt.to(device=x.device, dtype=torch.float32).expand(B)
        sigma = self.schedule.sigma(tt)
        flat = x.reshape(B, dim).to(torch.float32)
        if y is not None:
            if not isinstance(y, Tensor) or y.shape[0] != B:
                raise fail("y", f"a tensor with one condition per sample ({B})",
                           tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__)
            finite_tensor("y", y.to(torch.float64))
        yy = None if y is None else y.reshape(B, self.model.config.cond_dim).to(flat)[None]
        out = self.model(flat[None], tt[None], slice(self.k, self.k + 1), y=yy)[0]
        return out, sigma

    @property
    def parameterization(self) -> Parameterization:
        return self.model.params_k[self.k]

    @torch.no_grad()
    def __call__(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """The score ``s(x, t)`` of model ``k`` (:meth:`Parameterization.to_score`)."""
        out, sigma = self._raw(x, t, y)
        if isinstance(self.parameterization, NoiseParameterization) and bool(
                (sigma == 0).any()):
            raise fail("t", "t > 0 (the noise parameterization's score net / sigma is "
                       "singular at t = 0; use sigma2_score or stop at t_end > 0)", "t = 0")
        return self.parameterization.to_score(out, sigma).reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def sigma2_score(self, x: Tensor, t: TimeLike, y: Tensor | None = None) -> Tensor:
        """``sigma^2 s``, finite at ``t = 0`` for both parameterizations."""
        out, sigma = self._raw(x, t, y)
        return self.parameterization.to_sigma2_score(out, sigma).reshape(x.shape).to(x.dtype)
