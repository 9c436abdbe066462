"""MagCache adapters: what differs between the FramePack transformers MagCache patches.

The plan, the run/branch bookkeeping, the residuals and calibration live in
:mod:`magcache_core` and are the same for every model.  What a model class does
differently lives here, one small class per model class:

* :class:`FramePackAdapter` for FramePack's own ``HunyuanVideoTransformer3DModelPacked``
  (lllyasviel's ``diffusers_helper``).  Its forward is restated operation by
  operation so that a computed step is bitwise FramePack's, and a skipped step
  runs only the noisy-latent patch embedding, the time embedding and the output
  head.
* :class:`DiffusersFramePackAdapter` for diffusers' ``HunyuanVideoFramepackTransformer3DModel``
  (0.34 and later), the same checkpoints converted.  A computed step runs the
  model's own forward untouched (bitwise equal on any diffusers version) and two
  hooks on the first and last block read the block stack's input and output; only
  the skipped step is written here.

Both models put the noisy-latent tokens last in the packed sequence (history
tokens are concatenated in front of them) and return exactly those tokens, so the
cached residual is the last ``frames * (height / p) * (width / p)`` tokens of
(stack output - stack input).

An adapter is chosen by the model's class name (anywhere in its MRO), or failing
that by the attributes it has; nothing of FramePack or of diffusers' pipelines is
imported.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from magcache_core import MagCacheState


def _output_tokens(hidden_states: torch.Tensor, config: Any) -> tuple[int, int, int, int]:
    """(tokens, frames, height, width) after patching: the noisy-latent tokens a forward returns."""
    _, _, num_frames, height, width = hidden_states.shape
    p, p_t = config["patch_size"], config["patch_size_t"]
    t, h, w = num_frames // p_t, height // p, width // p
    return t * h * w, t, h, w


def _unpatchify(x: torch.Tensor, config: Any, t: int, h: int, w: int) -> torch.Tensor:
    """(b, t*h*w, c*pt*p*p) tokens back to a (b, c, t*pt, h*p, w*p) latent."""
    p, p_t = config["patch_size"], config["patch_size_t"]
    x = x.reshape(x.shape[0], t, h, w, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], -1, t * p_t, h * p, w * p)


def _model_output(x: torch.Tensor, return_dict: bool) -> Any:
    if return_dict:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput  # loaded with the model already
        return Transformer2DModelOutput(sample=x)
    return (x,)


class ModelAdapter:
    """What MagCache needs to know of one transformer class.

    ``forward(model, state, ...)`` replaces the instance's forward while MagCache
    is enabled; ``install``/``uninstall`` add and remove whatever else the
    adapter needs on the instance (hooks).
    """

    class_name: str = ""
    title: str = ""
    required_attrs: tuple[str, ...] = ()

    @classmethod
    def missing(cls, model: torch.nn.Module) -> list[str]:
        return [a for a in cls.required_attrs if not hasattr(model, a)]

    def install(self, model: torch.nn.Module, state: MagCacheState) -> None:
        """Nothing to add by default."""

    def uninstall(self) -> None:
        """Nothing to remove by default."""

    def forward(self, model: Any, state: MagCacheState, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# FramePack's packed transformer
# ---------------------------------------------------------------------------

def _framepack_attention_mask(model: torch.nn.Module, encoder_attention_mask: torch.Tensor,
                              img_seq_len: int, txt_seq_len: int) -> tuple:
    """FramePack's var-len attention arguments for batch > 1, from the model's own module."""
    for cls in type(model).__mro__:
        if "process_input_hidden_states" in cls.__dict__:
            get_cu_seqlens = getattr(sys.modules[cls.__module__], "get_cu_seqlens")
            cu = get_cu_seqlens(encoder_attention_mask, img_seq_len)
            return cu, cu, img_seq_len + txt_seq_len, img_seq_len + txt_seq_len
    raise TypeError("cannot find FramePack's get_cu_seqlens for batch > 1")


class FramePackAdapter(ModelAdapter):
    """FramePack's ``HunyuanVideoTransformer3DModelPacked``: its forward restated with MagCache."""

    class_name = "HunyuanVideoTransformer3DModelPacked"
    title = "FramePack's HunyuanVideoTransformer3DModelPacked"
    required_attrs = ("process_input_hidden_states", "x_embedder", "time_text_embed", "context_embedder",
                      "transformer_blocks", "single_transformer_blocks", "norm_out", "proj_out",
                      "gradient_checkpointing_method", "config")

    def forward(self, model: Any, state: MagCacheState, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor,
                latent_indices: torch.Tensor | None = None,
                clean_latents: torch.Tensor | None = None, clean_latent_indices: torch.Tensor | None = None,
                clean_latents_2x: torch.Tensor | None = None,
                clean_latent_2x_indices: torch.Tensor | None = None,
                clean_latents_4x: torch.Tensor | None = None,
                clean_latent_4x_indices: torch.Tensor | None = None,
                image_embeddings: torch.Tensor | None = None,
                attention_kwargs: dict | None = None, return_dict: bool = True) -> Any:
        """Drop-in forward of the packed transformer with MagCache.

        A computed step runs the same operations in the same order as FramePack's
        forward (so its output is bitwise the same) and keeps the stack residual
        of the output tokens.  A skipped step embeds only the noisy latents, adds
        the cached residual and runs the output head: nothing else.
        """
        run_ckpt = model.gradient_checkpointing_method
        batch_size = hidden_states.shape[0]
        out_tokens, t_out, h_out, w_out = _output_tokens(hidden_states, model.config)

        step, branch = state.begin_call(timestep, guidance)
        residual = state.should_skip(step, branch, out_tokens)

        if residual is not None:
            x = run_ckpt(model.x_embedder.proj, hidden_states).flatten(2).transpose(1, 2)
            temb = run_ckpt(model.time_text_embed, timestep, guidance, pooled_projections)
            x = x + residual
            x = run_ckpt(model.norm_out, x, temb)
            state.record(step, branch, skipped=True)
        else:
            x, rope_freqs = model.process_input_hidden_states(
                hidden_states, latent_indices, clean_latents, clean_latent_indices,
                clean_latents_2x, clean_latent_2x_indices, clean_latents_4x, clean_latent_4x_indices)
            temb = run_ckpt(model.time_text_embed, timestep, guidance, pooled_projections)
            context = run_ckpt(model.context_embedder, encoder_hidden_states, timestep, encoder_attention_mask)
            context_mask = encoder_attention_mask
            if model.image_projection is not None:
                if image_embeddings is None:
                    raise ValueError("this transformer has an image projection: pass image_embeddings")
                extra = run_ckpt(model.image_projection, image_embeddings)
                extra_mask = torch.ones((batch_size, extra.shape[1]), dtype=context_mask.dtype,
                                        device=context_mask.device)
                context = torch.cat([extra, context], dim=1)   # image tokens first: the mask crops from the end
                context_mask = torch.cat([extra_mask, context_mask], dim=1)
            with torch.no_grad():
                if batch_size == 1:
                    context = context[:, :context_mask.sum().item()]
                    attention_mask = (None, None, None, None)
                else:
                    attention_mask = _framepack_attention_mask(model, context_mask, x.shape[1], context.shape[1])

            stack_in = x[:, -out_tokens:]     # a view: the blocks never write into their input
            for block in model.transformer_blocks:
                x, context = run_ckpt(block, x, context, temb, attention_mask, rope_freqs)
            for block in model.single_transformer_blocks:
                x, context = run_ckpt(block, x, context, temb, attention_mask, rope_freqs)
            state.store_residual(step, branch, x[:, -out_tokens:] - stack_in)
            x = run_ckpt(model.norm_out, x, temb)
            x = x[:, -out_tokens:, :]
            state.record(step, branch, skipped=False)

        if getattr(model, "high_quality_fp32_output_for_inference", False):
            x = x.to(dtype=torch.float32)
            if model.proj_out.weight.dtype != torch.float32:
                model.proj_out.to(dtype=torch.float32)
        x = run_ckpt(model.proj_out, x)
        return _model_output(_unpatchify(x, model.config, t_out, h_out, w_out), return_dict)


# ---------------------------------------------------------------------------
# diffusers' HunyuanVideoFramepackTransformer3DModel
# ---------------------------------------------------------------------------

class DiffusersFramePackAdapter(ModelAdapter):
    """diffusers' ``HunyuanVideoFramepackTransformer3DModel``: own forward on computed steps, hooks read the stack.

    A forward pre-hook on the first block keeps a view of the stack input's
    output tokens; a forward hook on the last block hands (output - input) of
    those tokens to the state.  The hooks act only while this adapter's forward
    runs a computed step, so they cost nothing otherwise and are removed on
    disable.
    """

    class_name = "HunyuanVideoFramepackTransformer3DModel"
    title = "diffusers' HunyuanVideoFramepackTransformer3DModel"
    required_attrs = ("_pack_history_states", "x_embedder", "time_text_embed", "transformer_blocks",
                      "single_transformer_blocks", "norm_out", "proj_out", "config")

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._state: MagCacheState | None = None
        self._capture: tuple[int, int, int] | None = None   # (step, branch, output tokens) while computing
        self._stack_in: torch.Tensor | None = None

    def install(self, model: torch.nn.Module, state: MagCacheState) -> None:
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        if not blocks:
            raise TypeError("this transformer has no blocks: nothing for MagCache to skip")
        self._state = state
        self._handles = [blocks[0].register_forward_pre_hook(self._stack_input, with_kwargs=True),
                         blocks[-1].register_forward_hook(self._stack_output)]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._capture = self._stack_in = None

    def _stack_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capture is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._stack_in = hidden[:, -self._capture[2]:]   # a view: the blocks never write into their input

    def _stack_output(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._capture is None or self._stack_in is None:
            return
        step, branch, tokens = self._capture
        assert self._state is not None
        self._state.store_residual(step, branch, output[0][:, -tokens:] - self._stack_in)
        self._stack_in = None

    def forward(self, model: Any, state: MagCacheState, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                pooled_projections: torch.Tensor, image_embeds: torch.Tensor, indices_latents: torch.Tensor,
                guidance: torch.Tensor | None = None, *args: Any,
                attention_kwargs: dict | None = None, return_dict: bool = True, **kwargs: Any) -> Any:
        """Computed step: the model's own forward.  Skipped step: embed, add the residual, output head."""
        out_tokens, t_out, h_out, w_out = _output_tokens(hidden_states, model.config)
        step, branch = state.begin_call(timestep, guidance)
        residual = state.should_skip(step, branch, out_tokens)

        if residual is None:
            original = state.original_forward or type(model).forward.__get__(model)
            self._capture, self._stack_in = (step, branch, out_tokens), None
            try:
                out = original(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                               pooled_projections, image_embeds, indices_latents, guidance, *args,
                               attention_kwargs=attention_kwargs, return_dict=return_dict, **kwargs)
            finally:
                self._capture = self._stack_in = None
            state.record(step, branch, skipped=False)
            return out

        with _lora_scale(model, attention_kwargs):
            x = model.x_embedder(hidden_states)          # the noisy latents' tokens: the last of the sequence
            temb = model.time_text_embed(timestep, pooled_projections, guidance)
            if isinstance(temb, tuple):                  # (temb, token_replace_emb) in diffusers >= 0.33
                temb = temb[0]
            x = model.norm_out(x + residual, temb)
            x = model.proj_out(x)
        state.record(step, branch, skipped=True)
        return _model_output(_unpatchify(x, model.config, t_out, h_out, w_out), return_dict)


class _lora_scale:
    """The LoRA scale diffusers' forward applies from ``attention_kwargs["scale"]``, for the skipped step too."""

    def __init__(self, model: torch.nn.Module, attention_kwargs: dict | None) -> None:
        self.model = model
        self.scale = 1.0 if not attention_kwargs else attention_kwargs.get("scale", 1.0)
        self.active = False

    def __enter__(self) -> None:
        if self.scale != 1.0:
            from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers
            if USE_PEFT_BACKEND:
                scale_lora_layers(self.model, self.scale)
                self.active = True

    def __exit__(self, *exc: object) -> None:
        if self.active:
            from diffusers.utils import unscale_lora_layers
            unscale_lora_layers(self.model, self.scale)


ADAPTERS: tuple[type[ModelAdapter], ...] = (FramePackAdapter, DiffusersFramePackAdapter)


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """A fresh adapter for this model: by class name first, then by the attributes it has.

    TypeError says what each known class would need when none fits.
    """
    names = {cls.__name__ for cls in type(model).__mro__}
    for adapter in ADAPTERS:
        if adapter.class_name in names and not adapter.missing(model):
            return adapter()
    for adapter in ADAPTERS:
        if not adapter.missing(model):
            return adapter()
    wanted = " nor ".join(f"{a.title} (missing: {', '.join(a.missing(model))})" for a in ADAPTERS)
    raise TypeError(f"{type(model).__name__} does not look like {wanted}")
