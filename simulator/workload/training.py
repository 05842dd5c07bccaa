"""A training step as a trace phase: forward, backward and optimizer ops, with the
lifetime of every tensor the step allocates.

The model runs forward and backward on the meta device under the capture's dispatch mode
(autograd through our custom ops, whose backward ops are kernels of their own). Every op is
tagged with its stage:

- `fwd`: the forward pass;
- `bwd_weight`: backward ops whose outputs only go into parameter gradients (the
  weight-gradient GEMMs, bias sums, the embedding's scatter-add); `bwd_act`: the rest of
  the backward (activation-gradient GEMMs, attention and norm backward kernels, …);
- `recompute`: a forward re-run inside the backward (activation checkpointing: `full`
  re-runs each block from its input, `selective` only the attention kernel);
- `optim`: the optimizer step, one fused kernel per parameter tensor (AdamW or SGD with
  momentum) over its fp32 master weights and state, added after the capture.

A backward op is attributed to the module whose forward created the autograd node that
runs it: each module's forward tags the nodes it made (`Node.metadata`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch
from torch.utils._pytree import tree_flatten

from simulator.errors import UserError
from simulator.workload.capture import _hook_paths, _layer, _nbytes, _Recorder
from simulator.workload.lora import Lora, apply_lora
from simulator.workload.trace import Op, Stage, Trace
from workloads.config import ModelConfig
from workloads.hf_config import HFConfig, moe_layers
from workloads.models import AnyModel

Recompute = Literal["none", "selective", "full"]
Optimizer = Literal["adamw", "sgd"]
RECOMPUTE: tuple[str, ...] = get_args(Recompute)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
#: fp32 values the optimizer keeps per trainable parameter besides a master copy: AdamW's
#: two moments, SGD's momentum.
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}
#: fp32 operations per element of one fused optimizer update (torch.optim's formulas):
#: AdamW m = β₁m + (1 − β₁)g (3), v = β₂v + (1 − β₂)g² (4), decay (2), the bias-corrected
#: step √v̂ + ε, division and update (5); SGD d = μd + g (2), decay (2), update (2, lr·d).
OPTIMIZER_OPS = {"adamw": 14, "sgd": 6}
_PATH = "mmsim_module"
#: Allocations the backward makes (AccumulateGrad's gradient buffer): no work of their own.
_ALLOCATIONS = frozenset({"new_empty_strided"})
#: Ops that only sum or move gradient parts into a parameter's gradient.
_ACCUMULATE = frozenset({"add", "add_", "copy_", "clone", "_to_copy"})
Category = Literal["weights", "optimizer", "gradients", "activations", "workspace"]
CATEGORIES: tuple[str, ...] = get_args(Category)


@dataclass(frozen=True)
class Buffer:
    """A tensor of the step: `bytes` of `category`, allocated by op `alloc` and freed after
    op `free` (its last reader); `free` −1: held to the end of the step (a gradient, which
    later micro-batches accumulate into and the optimizer reads)."""

    bytes: int
    category: Category
    alloc: int
    free: int


@dataclass(frozen=True)
class TrainingTrace:
    """One micro-batch's forward and backward, then the optimizer step, and what it holds.

    `param_bytes`: every parameter, in the model's dtype; `trainable`: the parameters that
    get gradients (elements); `master_bytes`/`state_bytes`: the optimizer's fp32 master
    copy and state; `buffers`: the tensors allocated by the micro-batch's ops."""

    trace: Trace
    buffers: tuple[Buffer, ...]
    params: int
    trainable: int
    param_bytes: int
    grad_bytes: int
    master_bytes: int
    state_bytes: int
    layers: int
    hidden: int
    recompute: Recompute
    optimizer: Optimizer
    #: an encoder (ViT, CLIP): trained on images; its model FLOPs are its traced ones
    encoder: bool = False


    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "trace"}
        data["buffers"] = [asdict(b) for b in self.buffers]
        data["trace"] = json.loads(self.trace.to_json())
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TrainingTrace:
        data = json.loads(text)
        data["trace"] = Trace.from_json(json.dumps(data["trace"]))
        data["buffers"] = tuple(Buffer(**b) for b in data["buffers"])
        return cls(**data)


def get_training_trace(cfg: AnyModel, micro_batch: int, seq_len: int, recompute: Recompute,
                       optimizer: Optimizer, use_cache: bool = True,
                       lora: Lora | None = None, classes: int | None = None) -> TrainingTrace:
    """The training trace, from the trace cache when present, else captured (and cached)."""
    from simulator.workload.cache import cached

    key = f"train/{micro_batch}/{seq_len}/{recompute}/{optimizer}" + (
        f"/{lora.key()}" if lora else "") + (f"/classes{classes}" if classes else "")
    return cached(cfg, key, use_cache, TrainingTrace.from_json, TrainingTrace.to_json,
                  lambda: capture_training(cfg, micro_batch, seq_len, recompute, optimizer,
                                           lora, classes))


@dataclass
class _TrainingRecorder(_Recorder):
    """The capture's recorder, with each op's stage and the tensors it reads and makes."""

    stage: str = "fwd"
    recomputing: int = 0
    reads: list[list[int]] = field(default_factory=list)
    makes: list[list[int]] = field(default_factory=list)
    fresh: set[int] = field(default_factory=set)

    def module_now(self) -> str:
        if self.stage == "bwd" and not self.recomputing:
            node = torch._C._current_autograd_node()
            return "" if node is None else node.metadata.get(_PATH, "")
        return super().module_now()

    def _record(self, name: str, namespace: str, args: tuple[Any, ...],
                ins: list[torch.Tensor], outs: list[torch.Tensor], mutated: set[int]) -> None:
        if name in _ALLOCATIONS:
            self.fresh.update(id(t) for t in outs)
            return
        if name == "copy_" and id(args[0]) in self.fresh:
            # AccumulateGrad copying a gradient it could not steal (this recorder holds a
            # reference); a training run steals it: the buffer is the gradient itself
            self.base[id(args[0])] = self._base(args[1])
            return
        self.reads.append([self._base(t) for t in ins if id(t) not in mutated])
        self.makes.append([self._base(t) if id(t) in mutated else id(t) for t in outs])
        super()._record(name, namespace, args, ins, outs, mutated)
        stage = "recompute" if self.recomputing else self.stage
        self.ops[-1] = self.ops[-1].evolve(stage=stage)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, dict):
        value = list(value.values())
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _tag(tensors: list[torch.Tensor], path: str) -> None:
    """Give the autograd nodes behind `tensors` not yet claimed by a module to `path`."""
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or _PATH in node.metadata:
            continue
        node.metadata[_PATH] = path
        stack.extend(next_node for next_node, _ in node.next_functions)


def _tag_hooks(model: torch.nn.Module, recorder: _TrainingRecorder) -> list[Any]:
    """Before a module runs, the nodes its inputs came from belong to its caller; after, the
    unclaimed ones behind its outputs are its own (inner modules claimed theirs first)."""

    def before(_module: Any, args: Any, kwargs: Any) -> None:
        _tag(_tensors((args, kwargs)), recorder.module_now())

    def after(path: str) -> Any:
        return lambda _module, _args, out: _tag(_tensors(out), path)

    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after(path)))
    return handles


def _blocks(model: torch.nn.Module) -> list[str]:
    """The paths of the model's repeated blocks (`model.layers.3`, `transformer.h.3`)."""
    return [path for path, _ in model.named_modules()
            if path and path[-1].isdigit() and _layer(path) == path]


def _checkpoint(forward: Any, recorder: _TrainingRecorder, path: str | None) -> Any:
    """`forward` under non-reentrant activation checkpointing; its re-run in the backward is
    recorded as `recompute`, in module `path` (None: the module that called it)."""
    from torch.utils.checkpoint import checkpoint

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        module = recorder.module_now() if path is None else path

        def run(*args: Any, **kwargs: Any) -> Any:
            if recorder.stage != "bwd":
                return forward(*args, **kwargs)
            recorder.recomputing += 1
            recorder.modules.append(module)
            try:
                return forward(*args, **kwargs)
            finally:
                recorder.modules.pop()
                recorder.recomputing -= 1

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return checkpointed


@contextmanager
def _recomputed_attention(recorder: _TrainingRecorder) -> Iterator[None]:
    """Selective recomputation: the attention kernel re-runs in the backward (its output is
    not kept), as Megatron-LM's selective checkpointing does for the core attention."""
    from workloads import ops

    original = ops.attention
    ops.attention = _checkpoint(original, recorder, None)  # type: ignore[assignment]
    try:
        yield
    finally:
        ops.attention = original  # type: ignore[assignment]


def _fused_norms(model: torch.nn.Module) -> None:
    """transformers' RMSNorm modules as one `mmsim::rms_norm` kernel (and its backward);
    one with another formula (Gemma's 1 + w) stays as its aten ops."""
    from workloads import ops

    for module in model.modules():
        if (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and isinstance(getattr(module, "weight", None), torch.nn.Parameter)):
            module.forward = (lambda x, m=module: ops.rms_norm(  # type: ignore[method-assign]
                x, m.weight, float(m.variance_epsilon)))


def check_trainable(cfg: AnyModel) -> None:
    """Refuse, in one line, a model whose training step is not modelled."""
    if isinstance(cfg, ModelConfig) and cfg.model_type == "hgrn_bit":
        raise UserError("--phase train", f"{cfg.name}: training the MatMul-free model (its "
                        "BitLinear's straight-through estimator) is not modelled yet; expected "
                        "a transformer")
    if isinstance(cfg, HFConfig):
        if moe_layers(cfg):
            raise UserError("--phase train", f"{cfg.name}: training an MoE model is not "
                            "modelled; expected a dense model")
    elif not isinstance(cfg, ModelConfig):
        raise UserError("--phase train", f"{cfg.name}: training is modelled for models "
                        "from configs; expected one, not an nn.Module")


def is_encoder(cfg: AnyModel) -> bool:
    """An image classifier (ViT) or CLIP: trained on images, not next-token prediction."""
    return isinstance(cfg, HFConfig) and cfg.task != "causal"


def image_tokens(cfg: HFConfig) -> int:
    """Tokens a vision tower runs per image: its patches and the class token."""
    vision = cfg.vision
    return (vision["image_size"] // vision["patch_size"]) ** 2 + 1


def _encoder_model(cfg: HFConfig, images: int,
                   classes: int | None) -> tuple[torch.nn.Module, Any, int, int]:
    """An encoder's training step on `images` images. ViT: cross-entropy over its class
    logits. CLIP: with `classes`, few-shot classification as CLIP-LoRA trains it (every
    class's prompt through the text tower each step, cross-entropy over the image-to-class
    similarities); without, contrastive pre-training on `images` image-caption pairs
    (transformers' symmetric CLIP loss). Layers and hidden size are the vision tower's."""
    from workloads.hf import build_hf

    model = build_hf(cfg)
    vision = cfg.vision
    size, channels = vision["image_size"], vision["num_channels"]
    meta = torch.device("meta")
    pixels = torch.zeros(images, channels, size, size, dtype=getattr(torch, cfg.torch_dtype),
                         device=meta)
    labels = torch.zeros(images, dtype=torch.long, device=meta)
    if cfg.task == "vision":
        def classify() -> torch.Tensor:
            logits = model(pixel_values=pixels).logits.float()
            return torch.nn.functional.cross_entropy(logits, labels)

        return model, classify, vision["num_hidden_layers"], vision["hidden_size"]
    length = cfg.config["text_config"]["max_position_embeddings"]
    ids = torch.zeros(images if classes is None else classes, length, dtype=torch.long,
                      device=meta)

    def clip_loss() -> torch.Tensor:
        out = model(input_ids=ids, pixel_values=pixels, return_loss=classes is None)
        if classes is None:
            return out.loss
        return torch.nn.functional.cross_entropy(out.logits_per_image.float(), labels)

    return model, clip_loss, vision["num_hidden_layers"], vision["hidden_size"]


def _model(cfg: AnyModel, ids: torch.Tensor,
           classes: int | None = None) -> tuple[torch.nn.Module, Any, int, int]:
    """(the model on meta, a call returning the step's loss, layers, hidden size). The loss
    is next-token cross-entropy over fp32 logits, as transformers' ForCausalLMLoss; an
    encoder's is its task's (`_encoder_model`)."""
    if isinstance(cfg, HFConfig) and cfg.task != "causal":
        return _encoder_model(cfg, ids.shape[0], classes)
    if isinstance(cfg, HFConfig):
        from workloads.hf import build_hf

        model = build_hf(cfg)
        _fused_norms(model)
        layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
        def hf_loss() -> torch.Tensor:
            from transformers.utils import logging

            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()  # its note that the config names no loss_type
            try:
                return model(input_ids=ids, labels=ids, use_cache=False).loss
            finally:
                logging.set_verbosity(verbosity)

        return model, hf_loss, layers, hidden
    assert isinstance(cfg, ModelConfig)
    from workloads.build import build_model
    from workloads.state import State

    model = build_model(cfg)

    def loss() -> torch.Tensor:
        logits = model(ids, State()).float()
        vocab = logits.shape[-1]
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                                 ids[:, 1:].reshape(-1))

    return model, loss, cfg.depth, cfg.hidden_size


def check_options(recompute: str, optimizer: str) -> None:
    """Refuse an unknown recomputation or optimizer in one line."""
    if recompute not in RECOMPUTE:
        raise UserError("--recompute", f"expected one of {', '.join(RECOMPUTE)}, not "
                        f"{recompute!r}")
    if optimizer not in OPTIMIZERS:
        raise UserError("--optimizer", f"expected one of {', '.join(OPTIMIZERS)}, not "
                        f"{optimizer!r}")


def capture_training(cfg: AnyModel, micro_batch: int, seq_len: int,
                     recompute: Recompute = "none", optimizer: Optimizer = "adamw",
                     lora: Lora | None = None, classes: int | None = None) -> TrainingTrace:
    """Capture one micro-batch of `micro_batch` sequences of `seq_len` tokens (an encoder's:
    images; CLIP's text tower also takes `classes` prompts) (forward, loss, backward), then
    add the optimizer step."""
    check_trainable(cfg)
    check_options(recompute, optimizer)
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    model, run, layers, hidden = _model(cfg, ids, classes)
    if lora is not None:
        apply_lora(model, lora)
    params = list(dict.fromkeys(model.parameters()))
    roles = dict.fromkeys((id(p) for p in params), "weight")
    roles.update(dict.fromkeys((id(b) for b in model.buffers()), "weight"))
    recorder = _TrainingRecorder(roles=roles)
    handles = _tag_hooks(model, recorder) + _hook_paths(model, recorder)
    if recompute == "full":
        for path in _blocks(model):
            block = model.get_submodule(path)
            block.forward = _checkpoint(block.forward, recorder, path)  # type: ignore[method-assign]
    selective = _recomputed_attention(recorder) if recompute == "selective" else None
    try:
        with recorder, selective or nullcontext():
            loss = run()
            _tag([loss], "")
            recorder.stage = "bwd"
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = {recorder._base(p.grad) for p in params if p.grad is not None}
    if not grads:
        raise UserError("--lora" if lora else "--phase train", f"{cfg.name}: no parameter "
                        "gets a gradient; expected trainable weights")
    ops = _split_backward(recorder, grads)
    trainable = [p for p in params if p.requires_grad]
    ops += _optimizer_ops(model, trainable, len(ops), optimizer)
    trace = Trace(model=cfg.name, model_key=cfg.key(), phase="train", batch=micro_batch,
                  context=0, prompt=seq_len, tokens=micro_batch * seq_len,
                  weights_bytes=sum(_nbytes(p) for p in params), state_bytes=0,
                  activation_bytes=0, ops=tuple(ops))
    wide = any(p.element_size() < 4 for p in trainable)  # 16-bit weights: an fp32 master
    count = sum(p.numel() for p in trainable)
    return TrainingTrace(
        trace=trace, buffers=_buffers(recorder, ops, grads), params=sum(p.numel() for p in params),
        trainable=count, param_bytes=trace.weights_bytes,
        grad_bytes=sum(_nbytes(p) for p in trainable), master_bytes=4 * count if wide else 0,
        state_bytes=4 * OPTIMIZER_STATES[optimizer] * count, layers=layers, hidden=hidden,
        recompute=recompute, optimizer=optimizer, encoder=is_encoder(cfg))


def _split_backward(recorder: _TrainingRecorder, grads: set[int]) -> list[Op]:
    """Backward ops as bwd_weight (every output is a parameter's gradient, or a part of one
    that is only added or copied into it, as a tied weight's two parts are) or bwd_act;
    decided from the last op back, so each tensor's readers are known first."""
    readers: dict[int, list[int]] = {}
    for index, reads in enumerate(recorder.reads):
        for base in reads:
            readers.setdefault(base, []).append(index)
    weight = [False] * len(recorder.ops)

    def into_grads(base: int) -> bool:
        found = readers.get(base, [])
        return base in grads or (bool(found) and all(
            weight[i] and recorder.ops[i].fn in _ACCUMULATE for i in found))

    for index in range(len(recorder.ops) - 1, -1, -1):
        made = recorder.makes[index]
        weight[index] = (recorder.ops[index].stage == "bwd" and bool(made)
                         and all(into_grads(base) for base in made))
    return [op.evolve(stage="bwd_weight" if weight[op.index] else "bwd_act")
            if op.stage == "bwd" else op for op in recorder.ops]


def _buffers(recorder: _TrainingRecorder, ops: list[Op], grads: set[int]) -> tuple[Buffer, ...]:
    """Every tensor an op allocated: a parameter's gradient, or an activation (made by the
    forward or a recompute) or workspace (the backward's other tensors) until its last
    reader."""
    found = []
    for base, size in recorder.sizes.items():
        alloc = recorder.producer.get(base, 0)
        stage: Stage = ops[alloc].stage
        category: Category = ("gradients" if base in grads else
                              "activations" if stage in ("fwd", "recompute") else "workspace")
        free = -1 if category == "gradients" else recorder.last_use.get(base, alloc)
        found.append(Buffer(size, category, alloc, free))
    return tuple(sorted(found, key=lambda b: (b.alloc, b.free, b.category, b.bytes)))


def _optimizer_ops(model: torch.nn.Module, trainable: list[torch.nn.Parameter], start: int,
                   optimizer: Optimizer) -> list[Op]:
    """One fused update kernel per trainable parameter tensor: it reads the gradient, the
    fp32 master copy and state, and writes them back with the model-dtype weights."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    states = OPTIMIZER_STATES[optimizer]
    ops = []
    for number, param in enumerate(trainable):
        n, elem = param.numel(), param.element_size()
        master = 4 * n if elem < 4 else 0
        name = names.get(id(param), f"param{number}")
        module = name.rpartition(".")[0]
        fp32 = 4 * n * states + master + (4 * n if not master else 0)  # master or the weights
        ops.append(Op(
            index=start + number, name=f"optim.{optimizer}", fn=optimizer, kind="elementwise",
            module=module, layer=_layer(module), dtype="fp32",
            ops=OPTIMIZER_OPS[optimizer] * n, weight_bytes=0,
            state_read_bytes=elem * n + fp32, state_write_bytes=fp32 + (elem * n if master else 0),
            input_bytes=0, output_bytes=0,
            dims={"numel": n, "rows": 1, "parallel": n, "weight_bytes": elem * n},
            deps=(start - 1,) if start else (), stage="optim",
            shapes=f"[{n}]{'bf16' if elem == 2 else 'fp32'}"))
    return ops
