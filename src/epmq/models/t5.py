"""T5 / FLAN-T5 encoder-decoders: ``T5ForConditionalGeneration`` (and ``T5EncoderModel``).

Two stages: the encoder's ``encoder.block.N``, then the decoder's ``decoder.block.N``. The
stack calls each ``T5Block`` positionally as ``block(hidden_states, attention_mask,
position_bias, encoder_hidden_states, encoder_attention_mask, encoder_decoder_position_bias)``
and gets ``(hidden_states, position_bias, encoder_decoder_position_bias)`` back; the first block
of a stack computes the relative position bias and the later blocks reuse it. Captured calls are
rewritten to keyword form, and :meth:`T5Adapter.next_block_inputs` carries the biases on.

The decoder stage is captured through the model's own forward, so its
``encoder_hidden_states`` are the final encoder output (after ``encoder.final_layer_norm``) of
the model as quantized so far; its inputs are the ``decoder_input_ids`` (teacher-forced
``labels`` shifted right). Linears per block in true-sequential order: self-attention
``q,k,v`` then ``o``; (decoder) cross-attention ``q,k,v`` then ``o``; ``wi`` or the gated
``wi_0, wi_1``; ``wo``.

Evaluation as text to text: :func:`score_label_words` picks, per input, the label word whose
tokens have the highest log-likelihood under the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.models.adapter import (
    Batch,
    BlockAdapter,
    BlockArgs,
    BlockKwargs,
    Stage,
    grouped_linears,
    register_adapter,
)
from epmq.models.folder import from_folder, read_config

_CALL_ORDER = (
    "hidden_states",
    "attention_mask",
    "position_bias",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "encoder_decoder_position_bias",
)

_SELF = "layer.0.SelfAttention"
_CROSS = "layer.1.EncDecAttention"
#: Decoder linears whose inputs are the encoder states (one row per encoder token).
_READS_ENCODER = (f"{_CROSS}.k", f"{_CROSS}.v")


def _groups(ff: str) -> tuple[tuple[str, ...], ...]:
    return (
        (f"{_SELF}.q", f"{_SELF}.k", f"{_SELF}.v"),
        (f"{_SELF}.o",),
        (f"{_CROSS}.q", f"{_CROSS}.k", f"{_CROSS}.v"),
        (f"{_CROSS}.o",),
        (f"{ff}.DenseReluDense.wi", f"{ff}.DenseReluDense.wi_0", f"{ff}.DenseReluDense.wi_1"),
        (f"{ff}.DenseReluDense.wo",),
    )


@register_adapter
class T5Adapter(BlockAdapter):
    """Adapter for T5 encoder-decoders (stages: ``encoder``, then ``decoder``)."""

    family = "t5"
    model_types = ("t5",)
    tasks = "epmq.heads.text_to_text:T5Tasks"
    # pre-norm sub-layers; layer.1 is the encoder's feed-forward, the decoder's cross-attention
    norm_sites = (
        ("layer.0.layer_norm", None),
        ("layer.1.layer_norm", f"{_SELF}.o"),
        ("layer.2.layer_norm", f"{_CROSS}.o"),
    )

    def stages(self, model: nn.Module) -> list[Stage]:
        stages = []
        for name in ("encoder", "decoder"):
            blocks = getattr(getattr(model, name, None), "block", None)
            if isinstance(blocks, nn.ModuleList):
                stages.append(Stage(name, f"{name}.block"))
        if not stages:
            raise EpmqError(f"model {type(model).__name__} has no T5 encoder.block list")
        return stages

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        ff = f"layer.{len(block.layer) - 1}" if hasattr(block, "layer") else "layer.1"
        return grouped_linears(block, _groups(ff))

    # -- capture ----------------------------------------------------------------------------
    def run_model(self, model: nn.Module, batch: Batch) -> None:
        """Run the model with teacher forcing and no cache.

        A batch holds ``input_ids`` (and ``attention_mask``) plus, for an encoder-decoder,
        ``decoder_input_ids`` or ``labels`` (shifted right into decoder inputs; ``-100``
        becomes padding).
        """
        model(**decoder_inputs(model, batch), use_cache=False)

    def prepare_block_inputs(
        self, stage: Stage, args: BlockArgs, kwargs: BlockKwargs
    ) -> tuple[BlockArgs, BlockKwargs]:
        """Name the positional arguments (see the module docs) and drop the cache."""
        if len(args) > len(_CALL_ORDER):
            raise EpmqError(f"T5 block called with {len(args)} positional arguments")
        named = dict(zip(_CALL_ORDER, args, strict=False))
        return super().prepare_block_inputs(stage, (), {**kwargs, **named})

    def token_mask(self, stage: Stage, batch: Batch) -> Tensor | None:
        """Encoder: the ``attention_mask``. Decoder: ``decoder_attention_mask``, else the
        positions whose ``labels`` are not ``-100`` (None: every decoder token counts)."""
        if stage.name != "decoder":
            return encoder_mask(batch)
        mask = batch.get("decoder_attention_mask")
        if mask is None and batch.get("labels") is not None:
            mask = batch["labels"] != -100
        return None if mask is None else mask.bool()

    def linear_token_mask(self, stage: Stage, batch: Batch, linear: str) -> Tensor | None:
        """The decoder's cross-attention ``k``/``v`` read the encoder states: their tokens are
        the encoder's, masked by the ``attention_mask``; every other linear uses
        :meth:`token_mask`."""
        if stage.name == "decoder" and linear in _READS_ENCODER:
            return encoder_mask(batch)
        return self.token_mask(stage, batch)

    # -- propagate --------------------------------------------------------------------------
    def next_block_inputs(
        self, stage: Stage, index: int, output: Any, args: BlockArgs, kwargs: BlockKwargs
    ) -> tuple[BlockArgs, BlockKwargs]:
        """The new hidden states, plus the position biases the block used (or computed)."""
        if not isinstance(output, tuple):
            raise EpmqError(f"T5 block returned {type(output).__name__}, expected a tuple")
        hidden, position_bias, cross_bias = (*output, None, None)[:3]
        kwargs = {**kwargs, "hidden_states": hidden, "position_bias": position_bias}
        if kwargs.get("encoder_hidden_states") is not None:
            kwargs["encoder_decoder_position_bias"] = cross_bias
        return args, kwargs

    def link_stage(
        self,
        model: nn.Module,
        stage: Stage,
        previous_output: Tensor,
        args: BlockArgs,
        kwargs: BlockKwargs,
    ) -> tuple[BlockArgs, BlockKwargs]:
        """Decoder: ``encoder_hidden_states = encoder.final_layer_norm(previous_output)``."""
        if stage.name != "decoder":
            return args, kwargs
        norm = model.get_submodule("encoder.final_layer_norm")
        with torch.no_grad():
            encoded = norm(previous_output)
        return args, {**kwargs, "encoder_hidden_states": encoded}

    @staticmethod
    def load(path: str | Path, **kwargs: Any) -> nn.Module:
        """:func:`load_t5`."""
        return load_t5(path, **kwargs)


def encoder_mask(batch: Batch) -> Tensor | None:
    """The encoder tokens that count: the batch's ``attention_mask`` as bool (None: all)."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


def decoder_inputs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """The model's keyword inputs for ``batch``: ``labels`` become ``decoder_input_ids``."""
    inputs = dict(batch)
    labels = inputs.pop("labels", None)
    if not hasattr(model, "decoder"):
        return {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
    if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
        if labels is None:
            raise EpmqError(
                "T5 calibration batch needs 'labels' or 'decoder_input_ids' (the decoder's "
                f"teacher-forced inputs); it has {', '.join(batch) or 'no keys'}"
            )
        inputs["decoder_input_ids"] = shift_right(model, labels)
    return inputs


def shift_right(model: nn.Module, labels: Tensor) -> Tensor:
    """Teacher-forced decoder inputs: ``labels`` shifted right after the start token, with
    ``-100`` replaced by padding.

    The start token is ``config.decoder_start_token_id``, else the generation config's, else
    ``pad_token_id`` (T5 starts decoding from its pad token).
    """
    config = model.config
    generation = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        start = pad
    if start is None or pad is None:
        raise EpmqError(
            "T5 config.json needs 'pad_token_id' (and 'decoder_start_token_id') to build "
            "decoder inputs from labels"
        )
    shifted = labels.new_full(labels.shape, int(start))
    shifted[..., 1:] = labels[..., :-1]
    return shifted.masked_fill(shifted == -100, int(pad))


def load_t5(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a T5 / FLAN-T5 model from a local folder (no hub access), in eval mode.

    ``T5ForConditionalGeneration`` unless ``config.json`` names ``T5EncoderModel``. A
    compressed-tensors export loads dequantized (:func:`~epmq.models.folder.from_folder`).
    """
    import transformers

    path = Path(path)
    config_file = path / "config.json"
    config = read_config(path)
    if config.get("model_type") != "t5":
        raise EpmqError(f"{config_file}: model_type {config.get('model_type')!r} is not 't5'")
    encoder_only = "T5EncoderModel" in (config.get("architectures") or [])
    name = "T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"
    model = from_folder(getattr(transformers, name), path, **kwargs)
    model.eval()
    return model


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def label_word_log_likelihoods(
    model: nn.Module,
    tokenizer: Any,
    inputs: Sequence[str],
    label_words: Sequence[str],
    *,
    batch_size: int = 16,
) -> Tensor:
    """``[len(inputs), len(label_words)]``: summed log-probabilities of each label's tokens.

    Each label word is tokenized as the tokenizer does for targets (with its special tokens,
    e.g. T5's ``</s>``) and scored by teacher forcing given the input text; the encoder runs
    once per batch of inputs.
    """
    if not label_words:
        raise EpmqError("score_label_words: label_words is empty")
    targets = []
    for word in label_words:
        ids = tokenizer(word)["input_ids"]
        if len(ids) == 0:
            raise EpmqError(f"label word {word!r} tokenizes to nothing")
        targets.append(torch.tensor(ids, dtype=torch.long))
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(inputs), batch_size):
        chunk = list(inputs[start : start + batch_size])
        enc = tokenizer(chunk, padding=True, return_tensors="pt").to(device)
        encoded = model.get_encoder()(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        )
        columns = []
        for target in targets:
            labels = target.to(device).expand(len(chunk), -1)
            logits = model(
                encoder_outputs=encoded,
                attention_mask=enc["attention_mask"],
                decoder_input_ids=shift_right(model, labels),
                use_cache=False,
            ).logits
            logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            columns.append(logp.sum(-1))
        scores.append(torch.stack(columns, dim=1))
    return torch.cat(scores).cpu()


def score_label_words(
    model: nn.Module,
    tokenizer: Any,
    inputs: Sequence[str],
    label_words: Sequence[str],
    *,
    batch_size: int = 16,
) -> Tensor:
    """Predicted label index per input: the label word with the highest log-likelihood."""
    scores = label_word_log_likelihoods(
        model, tokenizer, inputs, label_words, batch_size=batch_size
    )
    return scores.argmax(dim=1)
