"""Reward model contract, registry and dispatcher.

Conventions:
    * Images are float tensors ``[B, 3, H, W]`` with values in ``[0, 1]`` (decoded VAE output).
    * ``prompts`` is a list of ``B`` strings aligned with the images.
    * Rewards are 1-D float tensors aligned with the inputs. A NaN means "abstain": the
      reward does not apply to that sample (the advantage code leaves it out).
    * Groups are identified by integer ``group_ids`` (one per sample), never by prompt text.
    * Videos (video model families) are ``[B, F, 3, H, W]`` frames in ``[0, 1]``. A reward's
      ``video`` attribute says how it takes them: ``"frames"`` (the default: an image reward)
      scores every frame as an image and a video's reward is the NaN-ignoring mean over its
      frames (pointwise, groupwise and pairwise alike: frame ``f`` of a group is scored with
      frame ``f`` of the others; Flow-Factory's PickScore convention for video); ``"native"``
      gets the ``[B, F, 3, H, W]`` tensor itself in ``score`` / ``score_group`` / ``compare``.
      :func:`score_all` and :func:`details_all` apply this; call them, not the methods.
    * Condition images (edit and image-to-video families): a reward whose ``condition_images``
      attribute is True also gets the samples' condition images as the keyword argument
      ``condition_images`` of ``score`` / ``score_group`` / ``compare``: a list (one entry per
      sample, aligned with the images; ``compare``: the ``a`` samples') of lists of RGB PIL images
      in their own sizes -- the source image(s) a sample was generated from, as Flow-Factory's
      reward call passes ``condition_images``. A video's frames share their sample's images.
    * Row metadata: a reward whose ``metadata`` attribute is True also gets the keyword argument
      ``metadata`` in ``score`` / ``score_group`` / ``compare`` / ``details``: one dict per sample
      (aligned like ``condition_images``), the JSON columns of its dataset row beyond the ones
      flowrl reads (e.g. GenEval's ``tag`` / ``include`` / ``exclude``), ``{}`` for a row without
      any -- what Flow-Factory passes as ``metadata`` (there a JSON string).

Three kinds of reward model (class attribute ``kind``):
    * ``pointwise``: ``score(images [B,3,H,W], prompts) -> [B]``, one sample at a time in
      any batch.
    * ``groupwise``: ``score_group(images [K,3,H,W], prompts) -> [K]``, called with exactly one
      prompt group (e.g. rank-within-group rewards).
    * ``pairwise``: ``compare(images_a [P,3,H,W], images_b [P,3,H,W], prompts) -> [P]``, the
      probability in ``[0, 1]`` that ``a`` is better than ``b``. :func:`score_all` turns it into
      a groupwise score: every sample's mean win probability against the rest of its group.

Options: a subclass declares the options it accepts as keyword-only arguments of its own
``__init__`` and forwards the rest to ``super().__init__(**options)``; the base class rejects
whatever is left with a ``TypeError`` that names the bad option and lists the accepted ones::

    class MyReward(RewardModel):
        kind = "pointwise"
        def __init__(self, *, scale: float = 1.0, **options):
            super().__init__(**options)
            self.scale = scale

Register with ``@REWARDS.register("my_reward")`` (or ``REWARDS.register("my_reward",
"pkg.module.MyReward")`` to import lazily); build with :func:`build_reward`.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Mapping, Sequence

import torch

from shared.registry import Registry, RegistryError, nearest

KINDS = ("pointwise", "pairwise", "groupwise")
VIDEO_MODES = ("frames", "native", "first_frame")

REWARDS: Registry = Registry("reward")


class RewardOutputError(ValueError):
    """A reward model returned something of the wrong shape or with invalid values.

    ``index``: the first offending sample's position in the scored batch (None when the error
    is not about one sample, e.g. a wrong shape); callers that know sample ids name it.
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class RewardModel:
    """Base class of every reward model (see the module docstring for the contract).

    Args:
        device: where the model runs; :func:`score_all` moves inputs there.
        dtype: the model's compute dtype name (``"float32"``, ``"bfloat16"``, ...).
        **options: must be empty here: options a subclass does not accept end up in this
            catch-all and raise ``TypeError``.
    """

    kind: ClassVar[str] = "pointwise"
    required_fields: ClassVar[tuple[str, ...]] = ("image", "prompt")
    #: how videos ``[B, F, 3, H, W]`` are scored: "frames" (per frame, averaged), "native" (whole
    #: videos; served, such a reward takes videos only) or "first_frame" (the first frame, as an image)
    video: ClassVar[str] = "frames"
    #: True: score / score_group / compare also get ``condition_images=`` (see the module docstring)
    condition_images: ClassVar[bool] = False
    #: True: score / score_group / compare / details also get ``metadata=`` (see the module docstring)
    metadata: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind not in KINDS:
            raise TypeError(f"{cls.__name__}.kind must be one of {', '.join(KINDS)}, got '{cls.kind}'")
        if cls.video not in VIDEO_MODES:
            raise TypeError(f"{cls.__name__}.video must be one of {', '.join(VIDEO_MODES)}, got '{cls.video}'")

    def __init__(self, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", **options) -> None:
        if options:
            accepted = self.accepted_options()
            described = []
            for bad in sorted(options):
                hint = nearest(bad, accepted)
                described.append(f"'{bad}'" + (f" (did you mean '{hint}'?)" if hint else ""))
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {', '.join(described)}. "
                f"Accepted options: {', '.join(accepted)}."
            )
        self.device = torch.device(device)
        if isinstance(dtype, str):
            resolved = getattr(torch, dtype, None)
            if not isinstance(resolved, torch.dtype):
                raise TypeError(f"{type(self).__name__}: dtype '{dtype}' is not a torch dtype name (e.g. 'float32')")
            dtype = resolved
        self.dtype = dtype

    @classmethod
    def accepted_options(cls) -> list[str]:
        """Names of the keyword-only ``__init__`` arguments along the class hierarchy."""
        return sorted(cls.keyword_options())

    @classmethod
    def declared(cls, attr: str, options: Mapping[str, Any]) -> Any:
        """Class flag ``attr`` (``kind``, ``condition_images``, ``video``, ``metadata``) as an entry
        with ``options`` would set it before the model is built: the option of that name where the
        reward takes one (a ``remote`` reward's ``kind: groupwise``), else the class's value."""
        return options[attr] if attr in options and attr in cls.keyword_options() else getattr(cls, attr)

    @classmethod
    def keyword_options(cls) -> dict[str, inspect.Parameter]:
        """The keyword-only ``__init__`` arguments along the class hierarchy, by name (the most
        derived class's declaration of each)."""
        params: dict[str, inspect.Parameter] = {}
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is inspect.Parameter.KEYWORD_ONLY:
                    params.setdefault(p.name, p)
        return params

    @property
    def name(self) -> str:
        """Used in error messages; defaults to the class name."""
        return type(self).__name__

    # --- the three interfaces; a subclass implements the one matching its kind ---

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Pointwise: ``images [B,3,H,W]`` in [0,1], ``prompts`` (B) -> ``[B]`` rewards."""
        raise NotImplementedError(f"{self.name} (kind '{self.kind}') does not implement score()")

    def score_group(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Groupwise: one prompt group, ``images [K,3,H,W]`` -> ``[K]`` rewards."""
        raise NotImplementedError(f"{self.name} (kind '{self.kind}') does not implement score_group()")

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Pairwise: ``images_a, images_b [P,3,H,W]`` -> ``[P]`` probability that ``a`` is better."""
        raise NotImplementedError(f"{self.name} (kind '{self.kind}') does not implement compare()")

    def details(self, images: torch.Tensor, prompts: list[str], **inputs) -> dict[str, torch.Tensor]:
        """Optional per-sample diagnostics for evaluation reports: ``{name: [B] float}``, NaN
        where a value does not apply to a sample (e.g. per-category accuracy). Evaluation
        reports the NaN-ignoring mean of each (then :meth:`summarize_details`). ``inputs``:
        ``metadata=`` for a reward that reads it. Default: none."""
        return {}

    @classmethod
    def row_problem(cls, metadata: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> str | None:
        """For a reward that reads row metadata: what is wrong with one dataset row's metadata
        (a dict, ``{}`` for none) for this reward built with ``options`` (its config entry's), or
        None. Checked when the dataset loads, for every row the reward will score, so a wrong
        dataset fails before any rollout (:func:`trainer.data.check_reward_rows`). Default:
        nothing is."""
        return None

    def summarize_details(self, means: dict[str, float]) -> dict[str, float]:
        """Aggregates computed from the eval-wide means of :meth:`details` (``{name: mean}``, only
        names some sample had a value for), e.g. a benchmark's overall score as the mean of its
        per-category accuracies; merged over ``means`` in the eval report. Default: none."""
        return {}


def option_problems(cls: type[RewardModel], options: dict[str, Any], entry_keys: Sequence[str] = ()) -> list[str]:
    """What is wrong with ``options`` for building ``cls``, before anything is built: one sentence
    per unknown option (with the nearest accepted name, the entry's own keys ``entry_keys``
    included, so ``wieght`` points at ``weight``) and per required option that is missing (a
    keyword-only ``__init__`` argument without a default). ``[]`` when ``cls(**options)`` would
    accept them. ``device`` and ``dtype`` are always supplied by the caller."""
    params = cls.keyword_options()
    problems = []
    for bad in sorted(set(options) - set(params)):
        hint = nearest(bad, sorted(set(params) | set(entry_keys)))
        problems.append(f"unknown option '{bad}'" + (f" (did you mean '{hint}'?)" if hint else ""))
    problems += [f"missing required option '{name}'" for name, p in params.items()
                 if p.default is inspect.Parameter.empty and name not in ("device", "dtype") and name not in options]
    return problems


def build_reward(name: str, **options) -> RewardModel:
    """Look ``name`` up in :data:`REWARDS` and construct it with ``options``.

    A ``name`` that is not registered but contains a dot is a custom reward given by its import
    path, ``package.module.Class`` (e.g. ``reward_model: my_pkg.rewards.MyReward`` in a config):
    the module is imported and the class must subclass :class:`RewardModel`.

    Raises:
        RegistryError: unknown name, or a dotted path whose module or class cannot be imported.
        TypeError: the dotted path names something that is not a :class:`RewardModel` subclass.
    """
    custom = name not in REWARDS and "." in name
    try:
        cls = REWARDS.get(name)
    except RegistryError as e:
        if not custom:
            raise
        raise RegistryError(
            f"{e}. Fix: check the spelling of '{name}' (package.module.Class) and that the module "
            f"is importable where flowrl runs (installed, or its folder on PYTHONPATH)."
        ) from e.__cause__
    if custom and not (isinstance(cls, type) and issubclass(cls, RewardModel)):
        raise TypeError(
            f"reward_model '{name}' is {cls!r}, not a RewardModel subclass. Fix: define it as "
            f"`class {name.rpartition('.')[2]}(shared.rewards.RewardModel)` with `kind` set and "
            f"score() (pointwise), score_group() (groupwise) or compare() (pairwise) implemented."
        )
    return cls(**options)


def _checked(out: object, n: int, model: RewardModel, call: str, *, probability: bool = False,
             indices: list[int] | None = None, prompts: list[str] | None = None) -> torch.Tensor:
    """``out`` as a CPU float32 ``[n]`` tensor, or a :class:`RewardOutputError` naming the reward
    (and, for an invalid value, the sample: ``indices`` maps positions in ``out`` to positions in
    the whole batch, ``prompts`` are the prompts of ``out``'s samples)."""
    if not isinstance(out, torch.Tensor):
        raise RewardOutputError(f"reward '{model.name}': {call} returned {type(out).__name__}, expected a tensor of shape ({n},)")
    if tuple(out.shape) != (n,):
        raise RewardOutputError(
            f"reward '{model.name}': {call} returned shape {tuple(out.shape)} for {n} inputs; expected ({n},)"
        )
    out = out.detach().to(device="cpu", dtype=torch.float32)
    bad = torch.isinf(out) | (((out < 0) | (out > 1)) if probability else torch.zeros_like(out, dtype=torch.bool))
    if bool(bad.any()):
        j = int(torch.nonzero(bad).flatten()[0])
        index = indices[j] if indices is not None else j
        prompt = f", prompt {prompts[j]!r}" if prompts is not None else ""
        rule = ("must return probabilities in [0, 1]" if probability and not torch.isinf(out[j])
                else "must return finite values, or NaN to abstain for a sample")
        raise RewardOutputError(f"reward '{model.name}': {call} returned {float(out[j])} for sample {index}{prompt}; "
                                f"it {rule}", index=index)
    return out


def _group_members(group_ids: torch.Tensor) -> list[torch.Tensor]:
    """Index tensors of the members of each group, groups in ascending id order."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return [torch.nonzero(inverse == g).flatten() for g in range(int(inverse.max()) + 1)] if inverse.numel() else []


def _pairwise_group_scores(
    model: RewardModel, images: torch.Tensor, prompts: list[str], batch_size: int,
    members: list[int] | None = None, conditions=None,
) -> torch.Tensor:
    """Mean win probability of each of the ``K`` members against the others (``[K]``).

    All unordered pairs ``i < j`` are compared once, in chunks of ``batch_size`` pairs:
    ``p = compare(i, j)`` counts ``p`` for ``i`` and ``1 - p`` for ``j``. NaN comparisons abstain;
    a member with no valid comparison (e.g. a group of one) gets NaN. ``members``: the members'
    positions in the whole batch (for error messages). ``conditions``: batch positions ->
    ``compare``'s extra keyword arguments (the ``a`` samples' condition images), see :func:`score_all`.
    """
    k = images.shape[0]
    wins = torch.zeros(k, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.float64)
    pairs = torch.combinations(torch.arange(k), r=2)  # [P, 2], i < j
    for start in range(0, pairs.shape[0], batch_size):
        a, b = pairs[start : start + batch_size].unbind(1)
        extra = conditions([members[int(i)] if members is not None else int(i) for i in a]) if conditions else {}
        p = model.compare(
            images[a].to(model.device), images[b].to(model.device), [prompts[int(i)] for i in a], **extra
        )
        p = _checked(p, a.numel(), model, "compare()", probability=True, prompts=[prompts[int(i)] for i in a],
                     indices=[members[int(i)] if members is not None else int(i) for i in a]).double()
        ok = ~torch.isnan(p)
        a, b, p = a[ok], b[ok], p[ok]
        wins.index_add_(0, a, p).index_add_(0, b, 1.0 - p)
        counts.index_add_(0, a, torch.ones_like(p)).index_add_(0, b, torch.ones_like(p))
    return (wins / counts).float()  # 0/0 -> NaN for members never compared


def score_all(
    model: RewardModel,
    images: torch.Tensor,
    prompts: list[str],
    group_ids: torch.Tensor,
    batch_size: int,
    condition_images: Sequence[Sequence[Any]] | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> torch.Tensor:
    """Score ``N`` samples with any kind of reward model.

    Args:
        model: a :class:`RewardModel`.
        images: ``[N, 3, H, W]`` float in ``[0, 1]``, or videos ``[N, F, 3, H, W]`` (scored as the
            model's ``video`` attribute says: per frame and averaged, or whole).
        prompts: ``N`` prompts, aligned with ``images``.
        group_ids: ``[N]`` int64 group ids (only groupwise/pairwise models use them; group
            members need not be contiguous).
        batch_size: images per ``score`` call (pointwise) or pairs per ``compare`` call
            (pairwise). Groupwise models get one whole group per call.
        condition_images: per sample, its condition images (RGB PIL); passed on, sliced like
            the images, to a model with ``condition_images = True`` (which then requires them).
        metadata: per sample its row metadata (a dict, ``{}`` for none); passed on, sliced like
            the images, to a model with ``metadata = True`` (``None``: every sample's is ``{}``).

    Returns:
        ``[N]`` float32 rewards on the CPU, aligned with ``images``; NaN where the model
        abstained. Pairwise models yield each sample's mean win probability in its group.

    Raises:
        ValueError: inconsistent inputs. RewardOutputError: the model returned the wrong shape,
        inf, or (pairwise) a value outside ``[0, 1]``; the message names the reward.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be [N, 3, H, W] (videos: [N, F, 3, H, W]), got shape {tuple(images.shape)}")
    if images.ndim == 5 and model.video == "frames":
        return _frame_mean([score_all(model, images[:, f], prompts, group_ids, batch_size, condition_images,
                                      metadata) for f in range(images.shape[1])])
    if images.ndim == 5 and model.video == "first_frame":
        images = images[:, 0]
    n = images.shape[0]
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images")
    conditions = _extras_for(model, condition_images, metadata, n)
    if group_ids.ndim != 1 or group_ids.numel() != n:
        raise ValueError(f"group_ids must have shape [{n}], got {tuple(group_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    group_ids = group_ids.cpu()

    if model.kind == "pointwise":
        chunks = []
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            out = model.score(images[s:e].to(model.device), list(prompts[s:e]), **conditions(range(s, e)))
            chunks.append(_checked(out, e - s, model, "score()", indices=list(range(s, e)), prompts=prompts[s:e]))
        return torch.cat(chunks) if chunks else torch.zeros(0)

    result = torch.full((n,), float("nan"), dtype=torch.float32)
    for idx in _group_members(group_ids):
        group_images = images[idx.to(images.device)]
        group_prompts = [prompts[int(i)] for i in idx]
        if model.kind == "groupwise":
            out = model.score_group(group_images.to(model.device), group_prompts, **conditions(idx.tolist()))
            result[idx] = _checked(out, idx.numel(), model, "score_group()", indices=idx.tolist(),
                                   prompts=group_prompts)
        else:  # pairwise
            result[idx] = _pairwise_group_scores(model, group_images, group_prompts, batch_size, idx.tolist(),
                                                 conditions)
    return result


def _extras_for(model: RewardModel, condition_images: Sequence[Sequence[Any]] | None,
                metadata: Sequence[Mapping[str, Any]] | None, n: int):
    """``positions -> {"condition_images": [...], "metadata": [...]}``, each key only for a model
    that reads it (``RewardModel.condition_images`` / ``.metadata``)."""
    conditions = _conditions_for(model, condition_images, n)
    if not model.metadata:
        return conditions
    if metadata is None:
        metadata = [{}] * n
    if len(metadata) != n:
        raise ValueError(f"got metadata for {len(metadata)} samples, expected {n} (one dict per sample)")
    return lambda positions: {**conditions(positions), "metadata": [metadata[int(i)] for i in positions]}


def _conditions_for(model: RewardModel, condition_images: Sequence[Sequence[Any]] | None, n: int):
    """``positions -> {"condition_images": [...]}`` for a model that reads condition images, else
    ``positions -> {}``; a model that needs them and got none (or a misaligned list) is an error
    naming the fix."""
    if not model.condition_images:
        return lambda positions: {}
    if condition_images is None or not any(len(row) for row in condition_images):
        raise ValueError(
            f"reward '{model.name}' scores an output against its condition (source) images, but these samples "
            f"have none. Fix: use it with an image-conditioned model (edit / image-to-video) whose dataset rows "
            f"have `image` / `images`, or remove it from rewards:.")
    if len(condition_images) != n:
        raise ValueError(f"got condition images for {len(condition_images)} samples, expected {n} (one list per sample)")
    return lambda positions: {"condition_images": [list(condition_images[int(i)]) for i in positions]}


def _frame_mean(per_frame: list[torch.Tensor]) -> torch.Tensor:
    """``F`` tensors ``[N]`` (one per frame) -> their NaN-ignoring mean ``[N]`` (NaN where every
    frame abstained)."""
    return torch.nanmean(torch.stack(per_frame, dim=1), dim=1)


def details_all(model: RewardModel, images: torch.Tensor, prompts: list[str],
                metadata: Sequence[Mapping[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """``model.details`` for images ``[N, 3, H, W]`` or videos ``[N, F, 3, H, W]`` (a ``"frames"``
    reward: each key's NaN-ignoring mean over the frames), ``{name: [N]}``. ``metadata``: per
    sample its row metadata, passed to a model with ``metadata = True``."""
    if metadata is not None and len(metadata) != len(prompts):
        raise ValueError(f"got metadata for {len(metadata)} samples and {len(prompts)} prompts; one dict per sample")
    extra = {"metadata": list(metadata) if metadata is not None else [{}] * len(prompts)} if model.metadata else {}
    if images.ndim == 5 and model.video == "first_frame":
        images = images[:, 0]
    if images.ndim != 5 or model.video == "native":
        return model.details(images, prompts, **extra)
    frames = [model.details(images[:, f], prompts, **extra) for f in range(images.shape[1])]
    return {k: _frame_mean([d[k].float().cpu() for d in frames]) for k in frames[0]}
