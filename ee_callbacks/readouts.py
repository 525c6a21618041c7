"""Readouts beyond the logit lens: tuned lens, exit heads and CALM confidence classifiers; their save/load.

Plain PyTorch, no Lightning. Every readout covers a set of blocks ``layers`` (indices 1..L−1) and offers what the
probe (:func:`ee_callbacks.run_probe`, ``readouts=``) reads:

- ``kind == "logits"``: ``logits(h, layer) -> (N, V)`` next-token logits from the raw block output ``h`` (N, d);
- ``kind == "confidence"``: ``confidence(h, layer) -> (N,)`` the probability that the layer may exit.

Head kinds (``HEAD_KINDS``), with ``N``/``U``/``T`` the model's final norm, unembedding and logit transform:

==============  ======================================================================  ==========================
kind            readout                                                                 trainable parameters/layer
==============  ======================================================================  ==========================
``tuned_lens``  ``T(U(N(h + A_ℓ h + b_ℓ)))``, A, b zero-initialised (Belrose et al. 2023)  d² + d
``linear``      ``T(U_ℓ(N_ℓ(h)))``, own copies of N and U initialised from the model     V·d (+V) + |N|
``mlp``         ``T(U(N(h + W₂ gelu(W₁ LN(h) + c₁) + c₂)))``, W₂, c₂ zero-initialised     2·d·m + m + 3d
``confidence``  ``σ(w_ℓ · LN₀(h) + c_ℓ)`` (CALM, Schuster et al. 2022), zero-initialised    d + 1
==============  ======================================================================  ==========================

(LN₀ is a layer norm without parameters, m the MLP width.) The shared ``N``/``U``/``T`` of ``tuned_lens`` and ``mlp``
are the model's *live* modules, called with detached parameters (:class:`SharedHead`): the readout follows the
model as it trains, gradients reach the head's input but never the model's parameters (their ``.grad`` is never
touched), and a fresh ``tuned_lens`` or ``mlp`` reads out exactly the logit lens.

Saved heads (:func:`save_exit_heads`) are a directory with ``config.json`` (kinds, layers, options, model sizes and
a SHA-256 fingerprint of the final norm and unembedding they were trained against) and ``heads.safetensors``;
:func:`load_exit_heads` refuses a model whose fingerprint or sizes differ.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .model_parts import ModelParts, ModelPartsError, find_model_parts, prove_model_parts, unwrap_model

__all__ = [
    "HEAD_KINDS",
    "OBJECTIVES",
    "ExitHeadsMismatchError",
    "SharedHead",
    "HeadTargets",
    "ExitReadout",
    "TunedLens",
    "LinearHead",
    "MLPHead",
    "ConfidenceHead",
    "build_readout",
    "head_fingerprint",
    "save_exit_heads",
    "load_exit_heads",
    "resolve_layers",
]

HEAD_KINDS = ("tuned_lens", "linear", "mlp", "confidence")
OBJECTIVES = ("kl", "ce")
FORMAT = "ee_callbacks.exit_heads"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "heads.safetensors"


class ExitHeadsMismatchError(ValueError):
    """Saved exit heads do not belong to the model they are being loaded onto."""


# --------------------------------------------------------------------------------------------------------------------
# the model's own head, used without ever touching its parameters


def _call_detached(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the module's parameters detached (and cast to ``x``'s dtype when they differ).

    Gradients flow to ``x`` but never to the module's parameters; the module itself is not modified.
    """
    params = {}
    for name, p in module.named_parameters():
        q = p.detach()
        if q.is_floating_point() and x.is_floating_point() and q.dtype != x.dtype:
            q = q.to(x.dtype)
        params[name] = q
    return functional_call(module, params, (x,))


class SharedHead:
    """The model's final norm, unembedding and logit transform, applied with detached parameters.

    Not an ``nn.Module`` on purpose: the model's modules are referenced, never registered, so a head's
    ``state_dict``, ``.to()`` and optimizer never see them.
    """

    def __init__(self, parts: ModelParts):
        if parts.unembed is None:
            raise ModelPartsError("exit heads need the model's unembedding (LM head); this model has none")
        self.parts = parts

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.parts.final_norm
        return _call_detached(norm, h) if norm is not None else h

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        z = _call_detached(self.parts.unembed, self.normed(h))
        return self.parts.transform_logits(z)

    @property
    def d_model(self) -> int:  # the blocks' width (a final path may project it, as OPT's project_out)
        return int(getattr(self.parts, "hidden_size", None) or _unembed_weight(self.parts).shape[1])

    @property
    def vocab(self) -> int:
        return int(_unembed_weight(self.parts).shape[0])


def _unembed_weight(parts: ModelParts) -> torch.Tensor:
    weight = getattr(parts.unembed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ModelPartsError(
            f"exit heads need an unembedding with a 2-D .weight (V, d); {type(parts.unembed).__name__} has none"
        )
    return weight


# --------------------------------------------------------------------------------------------------------------------
# targets and readouts


@dataclass
class HeadTargets:
    """What the heads learn from, for N sampled tokens of one training forward.

    ``final_logp``: log-softmax of the model's own logits (N, V); ``labels``: next-token ids (N,) or None;
    ``lens_agree``: per layer, ``1[argmax z_ℓ = argmax z_L]`` with ``z_ℓ`` the logit lens (for ``confidence``).
    """

    final_logp: torch.Tensor
    labels: Optional[torch.Tensor] = None
    lens_agree: Optional[dict] = None


def resolve_layers(layers, n_layers: int) -> list:
    """Block indices a head covers: None/"all" → 1..L−1; an int k → every k-th block (k, 2k, … < L); a list → itself."""
    if n_layers < 2:
        raise ValueError(f"exit heads need a model with at least 2 blocks, this one has {n_layers}")
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(1, n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise ValueError(f"layers as an int is a stride and must be ≥ 1, got {layers}")
        return list(range(layers, n_layers, layers))
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if not 1 <= x < n_layers]
    if bad or not out:
        raise ValueError(
            f"exit-head layers must be block indices in 1..{n_layers - 1} (the final block {n_layers} is the model "
            f"itself); got {list(layers)}"
        )
    return out


class ExitReadout(nn.Module):
    """Base class: per-layer parameters in ``self.per_layer[str(ℓ)]``, the shared head bound with :meth:`bind`."""

    name = ""  # the head kind, one of HEAD_KINDS
    kind = "logits"  # what the probe reads: "logits" or "confidence"

    def __init__(self, layers: Sequence[int], d_model: int, vocab: int, objective: str = "kl"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        self.layers = [int(x) for x in layers]
        self.d_model = int(d_model)
        self.vocab = int(vocab)
        self.objective = objective
        self.per_layer = nn.ModuleDict()
        self._shared: Optional[SharedHead] = None

    def bind(self, shared: SharedHead) -> "ExitReadout":
        self._shared = shared
        return self

    @property
    def shared(self) -> SharedHead:
        if self._shared is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a model: call .bind(SharedHead(parts))")
        return self._shared

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def options(self) -> dict:
        """Constructor keyword arguments beyond layers/d_model/vocab (saved in config.json)."""
        return {"objective": self.objective}

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, h: torch.Tensor, layer: int, targets: HeadTargets) -> torch.Tensor:
        """Training loss of layer ``layer`` on hidden states ``h`` (N, d): KL(p_L ‖ p_head) or next-token CE."""
        return self.loss_from_logits(self.logits(h, layer), targets)

    def loss_from_logits(self, z: torch.Tensor, targets: HeadTargets) -> torch.Tensor:
        """The loss of readout logits ``z``: (N, V) for one layer, or (g, N, V) for g layers stacked (the mean of
        their g losses), against the same N tokens' targets."""
        logq = F.log_softmax(z.float(), dim=-1)
        if self.objective == "ce":
            if targets.labels is None:
                raise ValueError(f"{self.name}: objective='ce' needs next-token labels; none were found in the batch")
            stacked = logq.reshape(-1, logq.shape[-1])
            return F.nll_loss(stacked, targets.labels.repeat(stacked.shape[0] // targets.labels.shape[0]))
        logp = targets.final_logp
        return (logp.exp() * (logp - logq)).sum(dim=-1).mean()


class TunedLens(ExitReadout):
    """Per layer a residual affine translator ``h + A_ℓ h + b_ℓ`` (zero-initialised), then the model's shared head.

    A fresh lens is exactly the logit lens (``A h + b`` is exactly zero).
    """

    name = "tuned_lens"

    def __init__(self, layers, d_model, vocab, objective: str = "kl"):
        super().__init__(layers, d_model, vocab, objective)
        for layer in self.layers:
            translator = nn.Linear(self.d_model, self.d_model, bias=True)
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)
            self.per_layer[str(layer)] = translator

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        h = h.to(self._dtype())
        return h + self.per_layer[str(layer)](h)

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.shared(self.transform(h, layer))


class MLPHead(ExitReadout):
    """Per layer a residual MLP ``h + W₂ gelu(W₁ LN(h) + c₁) + c₂`` (output zero-initialised), then the shared head."""

    name = "mlp"

    def __init__(self, layers, d_model, vocab, objective: str = "kl", hidden: Optional[int] = None, seed: int = 0):
        super().__init__(layers, d_model, vocab, objective)
        self.hidden = int(hidden) if hidden else self.d_model
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)  # own stream: building heads never draws from the global RNG
        for layer in self.layers:
            block = nn.Sequential(
                nn.LayerNorm(self.d_model),
                nn.Linear(self.d_model, self.hidden),
                nn.GELU(),
                nn.Linear(self.hidden, self.d_model),
            )
            with torch.no_grad():
                block[1].weight.normal_(0.0, 1.0 / math.sqrt(self.d_model), generator=gen)
                block[1].bias.zero_()
                block[3].weight.zero_()
                block[3].bias.zero_()
            self.per_layer[str(layer)] = block

    def options(self) -> dict:
        return {"objective": self.objective, "hidden": self.hidden, "seed": self.seed}

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        h = h.to(self._dtype())
        return h + self.per_layer[str(layer)](h)

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.shared(self.transform(h, layer))


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A trainable float32 copy of ``module`` without any hooks the original carries."""
    if isinstance(module, nn.Linear):
        out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            out.weight.copy_(module.weight.detach().float().cpu())
            if module.bias is not None:
                out.bias.copy_(module.bias.detach().float().cpu())
        return out
    out = copy.deepcopy(module).float().cpu()
    for sub in out.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            store = getattr(sub, attr, None)
            if hasattr(store, "clear"):
                store.clear()
    for p in out.parameters():
        p.requires_grad_(True)
    return out


class LinearHead(ExitReadout):
    """Per layer its own norm and unembedding, initialised as copies of the model's (EE-LLM-style exit head).

    ``T(U_ℓ(N_ℓ(h)))``; costs V·d parameters per layer. Fresh, it equals the logit lens (up to float32 rounding when
    the model runs in lower precision).
    """

    name = "linear"

    def __init__(self, layers, d_model, vocab, objective: str = "kl", parts: Optional[ModelParts] = None):
        super().__init__(layers, d_model, vocab, objective)
        if parts is None:
            raise ValueError("LinearHead needs the model's parts to copy its norm and unembedding from")
        for layer in self.layers:
            norm = _fresh_copy(parts.final_norm) if parts.final_norm is not None else nn.Identity()
            self.per_layer[str(layer)] = nn.ModuleDict({"norm": norm, "unembed": _fresh_copy(parts.unembed)})

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        head = self.per_layer[str(layer)]
        z = head["unembed"](head["norm"](h.to(self._dtype())))
        return self.shared.parts.transform_logits(z)


class ConfidenceHead(ExitReadout):
    """CALM-style exit classifier: per layer ``σ(w_ℓ · LN₀(h) + c_ℓ)`` predicting ``1[argmax z_ℓ = argmax z_L]``.

    ``z_ℓ`` is the logit-lens readout; trained with binary cross-entropy. Zero-initialised (probability 0.5).
    """

    name = "confidence"
    kind = "confidence"

    def __init__(self, layers, d_model, vocab, objective: str = "kl"):
        super().__init__(layers, d_model, vocab, "kl")  # the objective is always BCE; the argument is ignored
        for layer in self.layers:
            clf = nn.Linear(self.d_model, 1)
            nn.init.zeros_(clf.weight)
            nn.init.zeros_(clf.bias)
            self.per_layer[str(layer)] = clf

    def options(self) -> dict:
        return {}

    def confidence_logit(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        x = F.layer_norm(h.to(self._dtype()), (self.d_model,))
        return self.per_layer[str(layer)](x).squeeze(-1)

    def confidence(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.sigmoid(self.confidence_logit(h, layer))

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        raise TypeError("a confidence head has no logits; use .confidence(h, layer)")

    def loss(self, h: torch.Tensor, layer: int, targets: HeadTargets) -> torch.Tensor:
        if not targets.lens_agree or layer not in targets.lens_agree:
            raise ValueError(f"confidence head: no logit-lens agreement target for layer {layer}")
        target = targets.lens_agree[layer].to(self._dtype())
        return F.binary_cross_entropy_with_logits(self.confidence_logit(h, layer).float(), target.float())


_CLASSES = {"tuned_lens": TunedLens, "linear": LinearHead, "mlp": MLPHead, "confidence": ConfidenceHead}


def build_readout(kind: str, parts: ModelParts, layers, objective: str = "kl", **options) -> ExitReadout:
    """A fresh head of ``kind`` for the model described by ``parts``, bound to its shared head (on CPU, float32)."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown exit-head kind {kind!r}; allowed: {list(HEAD_KINDS)}")
    shared = SharedHead(parts)
    layers = resolve_layers(layers, parts.n_layers)
    cls = _CLASSES[kind]
    if cls not in (LinearHead, MLPHead) and options:
        raise ValueError(f"{kind} takes no options, got {sorted(options)}")
    # nn.Linear's default initialisation draws from the global RNG: building heads must not shift the training's
    # random streams (dropout, data order), so the CPU stream is restored afterwards
    with torch.random.fork_rng(devices=[]):
        if cls is LinearHead:
            head = cls(layers, shared.d_model, shared.vocab, objective, parts=parts)
        elif cls is MLPHead:
            head = cls(layers, shared.d_model, shared.vocab, objective, **options)
        else:
            head = cls(layers, shared.d_model, shared.vocab, objective)
    return head.bind(shared)


# --------------------------------------------------------------------------------------------------------------------
# fingerprint, save, load


def head_fingerprint(parts: ModelParts) -> dict:
    """SHA-256 of the unembedding and final-norm parameters (values as float32, so fp32 ↔ bf16-exact copies match).

    Returns ``{"unembed": hex, "final_norm": hex or None, "combined": hex}``.
    """

    def digest(module: Optional[nn.Module]) -> Optional[str]:
        if module is None:
            return None
        sha = hashlib.sha256()
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            t = p.detach().float().cpu().contiguous()
            sha.update(f"{name}:{tuple(t.shape)}".encode())
            sha.update(t.numpy().tobytes())
        return sha.hexdigest()

    unembed = digest(parts.unembed)
    norm = digest(parts.final_norm)
    combined = hashlib.sha256(f"{unembed}|{norm}|{parts.logit_scale}|{parts.logit_softcap}".encode()).hexdigest()
    return {"algorithm": "sha256-float32", "unembed": unembed, "final_norm": norm, "combined": combined}


def _model_meta(parts: ModelParts) -> dict:
    weight = _unembed_weight(parts)
    return {
        "n_layers": parts.n_layers,
        "d_model": int(weight.shape[1]),  # what the unembedding reads (OPT's project_out narrows it)
        "hidden_size": SharedHead(parts).d_model,  # the blocks' width: what the heads read
        "vocab": int(weight.shape[0]),
        "blocks": parts.blocks_path,
        "final_norm": parts.final_norm_path,
        "unembed": parts.unembed_path,
        "logit_scale": parts.logit_scale,
        "logit_softcap": parts.logit_softcap,
    }


def save_exit_heads(directory: Union[str, Path], heads: Mapping[str, ExitReadout], parts: ModelParts,
                    extra: Optional[dict] = None) -> Path:
    """Write ``config.json`` and ``heads.safetensors`` for ``heads`` (``{kind: readout}``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    kinds = {}
    for kind, head in heads.items():
        kinds[kind] = {"class": head.name, "layers": list(head.layers), "options": head.options(),
                       "n_parameters": head.n_parameters()}
        for key, value in head.state_dict().items():
            tensors[f"{kind}.{key}"] = value.detach().cpu().contiguous().clone()
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kinds": kinds,
        "model": _model_meta(parts),
        "fingerprint": head_fingerprint(parts),
        **(extra or {}),
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def proven_parts(model: nn.Module, meta: dict, strict: bool = False) -> ModelParts:
    """The model's parts at the module paths in ``meta`` (``blocks``, ``final_norm``, ``unembed``; saved heads' paths
    or a user's hints), proven on a few seeded random token ids: only a proof knows the blocks' width where the final
    path changes it (OPT's ``project_out``: the heads read 32 wide, the unembedding 16) and a logit scale the config
    does not declare. Where the model cannot run on such ids, the structural parts. Paths that do not resolve are an
    error when ``strict`` (a user's hints), else dropped (saved paths of a renamed model)."""
    given = (lambda value: value is not None) if strict else bool  # a user's final_norm="" means "no final norm"
    paths = {key: meta.get(key) for key in ("blocks", "final_norm", "unembed") if given(meta.get(key))}
    try:
        parts = find_model_parts(model, **paths)
    except ModelPartsError:
        if strict:
            raise
        paths = {}
        parts = find_model_parts(model)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = int(getattr(embedding, "num_embeddings", None) or meta.get("vocab") or 2)
    device = _unembed_weight(parts).device
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        return prove_model_parts(model, ids, **paths)
    except Exception:  # noqa: BLE001 — e.g. a model that needs more than input_ids: the size check speaks next
        return parts


def load_exit_heads(directory: Union[str, Path], model: nn.Module, parts: Optional[ModelParts] = None,
                    check_fingerprint: bool = True, device=None, kinds: Optional[Iterable[str]] = None) -> dict:
    """Load heads saved by :func:`save_exit_heads` (or ``ExitHeads.save``) onto ``model``: ``{kind: readout}``.

    Args:
        directory: the saved heads.
        model: the language model they were trained against (its norm and unembedding are shared, not copied).
        parts: the model's parts (found at the saved module paths and proven on a few random token ids when None).
        check_fingerprint: refuse (``ExitHeadsMismatchError``) a model whose final norm/unembedding differ from the
            ones the heads were trained against. Sizes (layers, d, V) are always checked.
        device: where the heads go (default: the device of the model's unembedding).
        kinds: load only these kinds.

    The readouts are in eval mode with ``requires_grad`` off; pass them to ``run_probe(readouts=...)``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no saved exit heads (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT or int(config.get("version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{cfg_path} is not an ee_callbacks exit-heads config of version ≤ {FORMAT_VERSION}")
    model = unwrap_model(model)
    if parts is None:
        parts = proven_parts(model, config.get("model", {}))
    saved = config["model"]
    here = _model_meta(parts)
    diffs = [f"{key}: saved {saved.get(key)} vs model {here[key]}"
             for key in ("n_layers", "d_model", "hidden_size", "vocab") if key in saved and saved[key] != here[key]]
    if diffs:
        raise ExitHeadsMismatchError(
            f"the exit heads in {directory} were trained for another model ({'; '.join(diffs)}); if it is the same "
            "model, pass parts=ee_callbacks.prove_model_parts(model, input_ids)"
        )
    if check_fingerprint:
        want = config.get("fingerprint", {})
        got = head_fingerprint(parts)
        if want.get("combined") != got["combined"]:
            which = [name for name in ("unembed", "final_norm") if want.get(name) != got[name]]
            raise ExitHeadsMismatchError(
                f"the exit heads in {directory} were trained against a different {' and '.join(which) or 'logit head'} "
                f"(saved fingerprint {str(want.get('combined'))[:12]}…, this model {got['combined'][:12]}…): they "
                "would read out nonsense on this model. Load them onto the model (checkpoint) they were trained with, "
                "or pass check_fingerprint=False if you know the heads transfer."
            )
    tensors = load_file(str(directory / WEIGHTS_FILE))
    wanted = set(kinds) if kinds is not None else None
    out = {}
    for kind, spec in config["kinds"].items():
        if wanted is not None and kind not in wanted:
            continue
        options = dict(spec.get("options") or {})
        objective = options.pop("objective", "kl")
        head = build_readout(spec["class"], parts, spec["layers"], objective, **options)
        prefix = f"{kind}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        head.load_state_dict(state, strict=True)
        head.requires_grad_(False)
        head.eval()
        if device is None:
            device = _unembed_weight(parts).device
        out[kind] = head.to(device)
    return out
