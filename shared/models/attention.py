"""``model.attn_backend``: the attention kernel of an adapter's transformer, through diffusers'
attention dispatcher (``ModelMixin.set_attention_backend``).

Names are diffusers' :class:`~diffusers.models.attention_dispatch.AttentionBackendName` values:
``native`` (PyTorch ``scaled_dot_product_attention``; CPU and GPU), ``_native_math`` /
``_native_flash`` / ``_native_efficient`` / ``_native_cudnn`` (one SDPA kernel forced), ``flash``
(the ``flash-attn`` package), ``flash_hub`` / ``_flash_3_hub`` / ``sage_hub`` (kernels fetched
from the Hub with the ``kernels`` package), ``_flash_3`` (FlashAttention-3 built from source),
``xformers``, ``sage``, ``flex``... ``None`` (the default) leaves the model as diffusers built it,
except that on CUDA PyTorch's cuDNN SDPA kernel is turned off (:func:`avoid_cudnn_attention`: its
backward crashed FLUX.1 LoRA training on an H200).

:func:`apply_attention_backend` checks everything at load, before any step runs: an unknown name
(with the nearest valid one), a backend whose package is not installed (what is missing and how to
install it), a GPU-only backend on a CPU model, and attention processors that do not go through
the dispatcher -- each a :class:`ValueError` that names the backend and the fix.

Most families' processors dispatch already (FLUX.1/2, Qwen-Image, Z-Image, Wan). SD3's
``JointAttnProcessor2_0`` (``sd3-5`` and the ``tiny`` toy model) calls PyTorch's SDPA directly, so
it is replaced by :class:`DispatchJointAttnProcessor`, the same computation with the attention
call dispatched (bit-identical under ``native``).

diffusers' ``set_attention_backend`` also sets a process-wide default backend; it is put back
afterwards, so one model's setting does not change another model in the same process (each
processor of this transformer carries its backend explicitly).
"""

from __future__ import annotations

import difflib
import logging

import torch
from torch import nn

#: backends that run on the CPU (the others need CUDA, or an NPU / XLA device)
CPU_BACKENDS = ("native", "_native_math", "_native_flash", "flex")

#: what to install for the backends whose package diffusers did not find
INSTALL_HINTS = {
    "flash": "pip install flash-attn --no-build-isolation (FlashAttention 2)",
    "flash_varlen": "pip install flash-attn --no-build-isolation (FlashAttention 2)",
    "_flash_3": "build FlashAttention 3 from source (github.com/Dao-AILab/flash-attention, hopper/)",
    "_flash_varlen_3": "build FlashAttention 3 from source (github.com/Dao-AILab/flash-attention, hopper/)",
    "xformers": "pip install xformers",
    "sage": "pip install sageattention",
    "sage_varlen": "pip install sageattention",
}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def backend_names() -> list[str]:
    """Every attention backend name the installed diffusers knows."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def backends_without_mask() -> list[str]:
    """The backends of the installed diffusers that cannot take an attention mask (their function has no
    ``attn_mask`` argument or refuses one): flash, sage, xla, ..."""
    import inspect

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    out = []
    for name, fn in registry._backends.items():
        try:
            refuses = "`attn_mask` is not supported" in inspect.getsource(fn)
        except (OSError, TypeError):  # no source to read: trust the signature alone
            refuses = False
        if refuses or "attn_mask" not in registry._supported_arg_names.get(name, ()):
            out.append(getattr(name, "value", str(name)))
    return sorted(out)


def _install_hint(name: str) -> str:
    if name.endswith("_hub"):
        return ("pip install -U kernels (the kernel itself is downloaded from the Hugging Face Hub on "
                "first use, so the machine needs Hub access or a warm kernels cache)")
    return INSTALL_HINTS.get(name, f"install what the message above names for {name!r}")


def attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's attention modules (those holding a ``processor``)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    kinds = (Attention, MochiAttention, AttentionModuleMixin)
    return [m for m in transformer.modules() if isinstance(m, kinds)]


def _dispatch_processor_class():
    """:class:`DispatchJointAttnProcessor`, built on first use (diffusers imported lazily)."""
    global DispatchJointAttnProcessor
    if DispatchJointAttnProcessor is not None:
        return DispatchJointAttnProcessor
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class _DispatchJointAttnProcessor(JointAttnProcessor2_0):
        """SD3's ``JointAttnProcessor2_0`` with the attention call going through diffusers'
        dispatcher (``self._attention_backend``), so ``set_attention_backend`` reaches it.

        Shapes: ``hidden_states [B, N, D]``, ``encoder_hidden_states [B, M, D]`` (or ``None``) in;
        ``([B, N, D], [B, M, D])`` (or ``[B, N, D]``) out, as the parent class.
        """

        _attention_backend = None
        _parallel_config = None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     *args, **kwargs):
            residual = hidden_states
            batch_size = hidden_states.shape[0]
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            head_dim = key.shape[-1] // attn.heads
            split = lambda x: x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
            query, key, value = split(query), split(key), split(value)  # [B, H, N, d]
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if encoder_hidden_states is not None:
                q2 = split(attn.add_q_proj(encoder_hidden_states))
                k2 = split(attn.add_k_proj(encoder_hidden_states))
                v2 = split(attn.add_v_proj(encoder_hidden_states))
                if attn.norm_added_q is not None:
                    q2 = attn.norm_added_q(q2)
                if attn.norm_added_k is not None:
                    k2 = attn.norm_added_k(k2)
                query, key, value = (torch.cat([query, q2], dim=2), torch.cat([key, k2], dim=2),
                                     torch.cat([value, v2], dim=2))
            # the dispatcher takes [B, N, H, d]
            out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                        dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
            hidden_states = out.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            if encoder_hidden_states is not None:
                hidden_states, encoder_hidden_states = (hidden_states[:, :residual.shape[1]],
                                                        hidden_states[:, residual.shape[1]:])
                if not attn.context_pre_only:
                    encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if encoder_hidden_states is not None:
                return hidden_states, encoder_hidden_states
            return hidden_states

    _DispatchJointAttnProcessor.__name__ = _DispatchJointAttnProcessor.__qualname__ = "DispatchJointAttnProcessor"
    DispatchJointAttnProcessor = _DispatchJointAttnProcessor
    return DispatchJointAttnProcessor


DispatchJointAttnProcessor = None  # the class, once :func:`_dispatch_processor_class` built it


def route_through_dispatcher(transformer: nn.Module) -> None:
    """Replace processors that call SDPA directly by dispatching ones where flowrl has one (SD3's
    ``JointAttnProcessor2_0``); raise naming the processor class where it has none."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    direct = set()
    for module in attention_modules(transformer):
        processor = module.processor
        if processor is None or hasattr(processor, "_attention_backend"):
            continue
        if type(processor) is JointAttnProcessor2_0:
            module.set_processor(_dispatch_processor_class()())
        else:
            direct.add(type(processor).__name__)
    if direct:
        raise ValueError(
            f"model.attn_backend: {type(transformer).__name__}'s attention processor(s) {sorted(direct)} call "
            f"PyTorch's attention directly and do not go through diffusers' attention dispatcher "
            f"(diffusers {_diffusers_version()}), so no backend can be set on them. Fix: remove "
            f"model.attn_backend (PyTorch picks its fastest SDPA kernel itself), or update diffusers.")


def avoid_cudnn_attention(transformer: nn.Module) -> bool:
    """``model.attn_backend`` unset on a CUDA model: turn PyTorch's cuDNN SDPA kernel off
    (``torch.backends.cuda.enable_cudnn_sdp(False)``, process-wide), so PyTorch picks among its
    flash, memory-efficient and math kernels. Returns whether the model is on CUDA.

    Why: on an H200 (torch 2.11.0+cu130) PyTorch chose the cuDNN kernel for FLUX.1-dev's attention
    and its backward failed (``mha_graph.execute(...).is_good()``), leaving the CUDA context broken
    (illegal memory access), so a LoRA step of ``flux1`` / ``flux1-kontext`` could not run;
    ``_native_flash`` ran the same step (``bench/results/gpu_models*.json``,
    ``bench/results/logs/gpu_models_flux1_cudnn_backward.txt``). PyTorch's issue #190321 reports the
    same failure on H200 and the same mitigation. ``attn_backend: native`` (or ``_native_cudnn``)
    keeps PyTorch's own choice, cuDNN included."""
    params = next(transformer.parameters(), None)
    if params is None or params.device.type != "cuda":
        return False
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        logging.getLogger(__name__).info(
            "model.attn_backend unset on CUDA: PyTorch's cuDNN attention kernel is turned off (its backward "
            "failed on Hopper GPUs, see shared/models/attention.py); set model.attn_backend: native to keep it")
    return True


def check_backend_name(backend: str, *, masked: str | None = None) -> str:
    """``backend`` normalized, when the installed diffusers knows it and (``masked``: the model type,
    when its transformer attends with a padding mask) it can take a mask; else ``ValueError`` naming
    the fix. What can be checked without a model (config load, ``flowrl check``)."""
    names = backend_names()
    name = backend.strip().lower()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise ValueError(
            f"model.attn_backend: {backend!r} is not an attention backend of diffusers {_diffusers_version()}."
            + (f" Did you mean {hint[0]!r}?" if hint else "")
            + " Fix: use 'native' (PyTorch scaled_dot_product_attention, needs nothing), 'flash' (flash-attn), "
              "'flash_hub' / '_flash_3_hub' (kernels from the Hub), 'xformers', 'sage', ... (all: "
            + ", ".join(names) + "), or remove the key.")
    without = backends_without_mask() if masked else []  # (reads every backend's source: once)
    if name in without:
        takes = [b for b in ("native", "_native_efficient", "flex", "flash_varlen", "_flash_varlen_3")
                 if b in names and b not in without]
        raise ValueError(
            f"model.attn_backend: {name!r} cannot take an attention mask, and {masked} attends with one (prompts "
            f"of different token lengths are padded and masked), so the first such batch would fail mid-run. "
            f"Fix: use one of {', '.join(takes)}, or remove the key.")
    return name


def apply_attention_backend(transformer: nn.Module, backend: str | None, *, masked: str | None = None) -> None:
    """Set ``transformer``'s attention backend to ``backend`` (``model.attn_backend``; ``None``:
    diffusers' default, with PyTorch's cuDNN SDPA kernel turned off on CUDA,
    :func:`avoid_cudnn_attention`). ``masked``: the model type, when its transformer attends with a
    padding mask (a backend that cannot take one is refused here, not on the first batch of prompts
    of different lengths). Raises :class:`ValueError` naming the backend, what is wrong and the fix
    (module docstring)."""
    if backend is None:
        avoid_cudnn_attention(transformer)
        return
    from diffusers.models.attention_dispatch import (AttentionBackendName, _AttentionBackendRegistry,
                                                     _check_attention_backend_requirements)

    name = check_backend_name(backend, masked=masked)
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as e:
        raise ValueError(
            f"model.attn_backend: {name!r} cannot be used in this environment: {e} Fix: "
            f"{_install_hint(name)}; or use 'native' (PyTorch scaled_dot_product_attention, no extra package)."
        ) from None
    params = next(transformer.parameters(), None)
    device = params.device if params is not None else torch.device("cpu")
    if device.type != "cuda" and name not in CPU_BACKENDS:
        raise ValueError(
            f"model.attn_backend: {name!r} needs a CUDA GPU, but the model is on {device.type}. Fix: use one "
            f"of {', '.join(CPU_BACKENDS)} on the CPU (or run on a GPU).")
    route_through_dispatcher(transformer)
    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(name)
    except Exception as e:  # e.g. a Hub kernel that cannot be downloaded here
        raise ValueError(
            f"model.attn_backend: setting {name!r} on {type(transformer).__name__} failed "
            f"({type(e).__name__}: {e}). Fix: {_install_hint(name)}; or use 'native'.") from e
    finally:  # keep the process-wide default: this model's processors carry the backend
        _AttentionBackendRegistry._active_backend = previous


def attention_backend_of(transformer: nn.Module) -> set[str | None]:
    """The backends the transformer's attention processors carry (``None``: the process default)."""
    out = set()
    for module in attention_modules(transformer):
        b = getattr(module.processor, "_attention_backend", None)
        out.add(None if b is None else getattr(b, "value", str(b)))
    return out
