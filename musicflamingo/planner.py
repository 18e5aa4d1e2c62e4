"""The memory planner: the peak a training step or a generation run will need per device, from the settings alone.

Nothing is allocated: parameter counts come from the config's shapes (`parameter_counts`), activations from the
tensors each block keeps for backward (read off the code of `model/`, checked against
`torch.autograd.graph.saved_tensors_hooks` in tests/test_planner.py). `train.py`, `infer.py` and `eval.py` print
the table with `plan=true` and refuse, before loading anything, a run predicted not to fit (`memory_check`).
`plan=true` reads the settings only: it plans devices this machine lacks and compares the peak with
`plan_memory_gb`, the device's free memory here, or `DEVICE_MEMORY`.

Notation: per device and step, N padded decoder tokens, K labelled positions (only they reach the last layer's
queries, its MLP and the head), S tokens per row, W audio windows of P encoder positions (P/2 audio tokens each
after the pool). Bytes: w a weight (and its gradient and AdamW states: torch keeps those in the parameter's
dtype), c a matmul output (bf16 under `bf16-mixed`), s the residual stream (= w: fp32 under autocast).

Kept for backward, per position (D, q, kv, I, H: width, query / key-value width, MLP width, heads):

* decoder layer: s*D + 4 (its input and RMSNorm's rstd; the fused q/k/v GEMM rebuilds the rest), c*(q + 2 kv)
  (q, k after RoPE, v), c*q + 4H (attention output, logsumexp), s*D + 4 (the MLP's input), 2c*I (gate, up:
  SwiGLU is recomputed). A LoRA'd linear adds its normalised input (one autocast copy per adapter) and c*r (with
  LoRA dropout, per adapter its own dropped input and dropout's noise, in the input's dtype on CPU, or bool mask); an
  unfused down_proj adds 2c*I. Over a bf16 base without autocast (`bf16-true`) adapters, their gradients and AdamW
  states are float32 (as peft's; under FSDP whole on every device, not sharded): each adapter keeps a float32 copy
  of its input and a float32 middle. The last layer keeps only the key/value part for all N positions, the rest for K,
  plus its (K, S) attention mask. With checkpointing a layer keeps only its input, s*D, and one layer is rebuilt
  at a time in backward. Packed rows (`data.pack`) attend run by run and keep nothing more; with compiled layers
  they take the (S, S) mask instead: every layer keeps SDPA's additive copy, c*S, and the batch holds the bool one.
* encoder layer (only when the audio tower trains): s*d + 8, 3c*d (q, k, v), c*d + 4H attention output and
  logsumexp (CPU bf16 training attends with plain matmuls and keeps the probabilities, c*H*P, instead), s*d + 8,
  c*f (fc1 output); plus per window the conv stem's inputs c*5P*d (and c*2P*mel when the float32 features are
  cast), the pool's input s*P*d and the final LayerNorm's s*(P/2)*d, and RoTE's float64 cos/sin.
* projector (when it or the tower trains): its three inputs, (P/2)*(c*d_a + 2c*D) per window.
* head: the final norm's input s*K*D, dL/dh (K*D) and, when the head trains, dL/dW in float32 (V*D*4, formed in
  the forward by `fused.linear_cross_entropy`); its chunked logits live only inside the loss: chunk*V*(c + 12).
* under autocast the bf16 copies of weights that go through plain `F.linear` (o_proj, out_proj, the projector, the
  convolutions, LoRA bases) stay alive until backward: c per such weight.

The peak, on top of weights, AdamW states and the batch, is the largest of three moments walked block by block:
in the forward (what the blocks before keep + this block's working memory: q/k/v and RoPE temporaries or SwiGLU's;
CPU bf16 attention's scores, float32 softmax and probabilities, c + 8 bytes per score; one loss chunk at the
head), in backward (a block's gradients appear, then its activations go; a checkpointed layer is rebuilt with its
working memory) and at the optimizer step (gradients + one parameter-sized foreach temporary). DDP adds its
gradient buckets (one more gradient copy, on one device too: Lightning wraps the model all the same); FSDP divides
weights, gradients and states by the device count (not the float32 LoRA adapters over a bf16-true base: each
device holds them whole) and adds the gathered units (the root + two blocks).

Generation (`plan_inference`): weights, then the largest of a few moments. The KV cache holds 2 * layers * kv_heads *
head_dim * slots * capacity * bytes: `engine.generate` (eval.py, GRPO) makes it for prompt + new tokens; infer.py's
and serve.py's engine starts at one key block and doubles it as answers grow, old and new buffers alive while it
copies (`engine_capacities`). Encoding a prompt's audio (all its windows at once): the features in the weights'
dtype, the stem's conv outputs or an encoder layer's attention / MLP temporaries, the projector's output, beside the
processor's float32 features. A prefill: one decoder layer on the prompt (the MLP's gate, up, SiLU and product for
up to `MLP_CHUNK_ROWS` rows at a time), the float32 features still held, the last position's logits. On a CPU the
processor's log-mel (~10x the features, `feature_extraction_bytes`) runs in the same memory while the cache exists.
infer.py prepares and encodes one request at a time inside the engine's prefill; `engine.generate` (eval.py) embeds
the whole batch before the cache exists. `check_serving` plans serve.py: `max_batch` slots grown to the longest
sequence a request may reach, the queue's features on a CPU.

GRPO (`plan_grpo`): the worst split of the batch's prompt tokens into B prompts of P tokens; per split the larger of
the rollouts (resident weights, states, gradients and a full fine-tune's reference copy, then the audio of every
prompt, or the prompt embeddings + the engine's KV cache + a prompt's prefill + the slots' logits, in the weights'
dtype) and the update (the SFT step on a micro-batch of completions of P + max_new positions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from musicflamingo.model.config import MusicFlamingoConfig, TextConfig


class MemoryPlanError(ValueError):
    """A run predicted not to fit in the device's memory; the message lists the settings that would (one a line)."""

    multiline = True  # cli.py prints every line of the message


GB = 1e9
NF4_BYTES = 0.5 + 1 / 64  # 4 bits + one 8-bit absmax per 64-weight block (bitsandbytes' double quantisation)
LOSS_CHUNK = 2048  # rows per chunk of `fused.linear_cross_entropy` (model/musicflamingo.py's default)
LOGPROB_CHUNK = 1024  # rows per chunk of GRPO's `token_logprobs` (grpo.py's default)
KEY_BLOCK = 256  # the engine rounds KV-cache capacity up to this (engine.KEY_BLOCK)
MLP_CHUNK_ROWS = 4096  # rows of one decoder MLP pass in inference (model/qwen2.py's MLP_CHUNK_ROWS)
PROMPT_TEXT_TOKENS = 256  # system prompt, chat markup and a question, on top of the audio tokens
# What `plan=true` compares a plan with for a device this machine does not have, unless `plan_memory_gb` is set:
# a data-centre GPU's 80 GB (H100, A100 80 GB).
DEVICE_MEMORY = {"cuda": 80 * GB}
# bitsandbytes' 4-bit weights have not been run inside FSDP's sharded flat parameters here, and the planner would
# count their gathered blocks at full precision: refused (settings.py, training_setup) rather than guessed.
QLORA_FSDP = (
    "model.net.quantize_base={value} with trainer.strategy FSDP: 4-bit base weights are not supported under FSDP "
    "here; use trainer=ddp (each GPU holds the whole 4-bit model) or one GPU (trainer=gpu)"
)


@dataclass(frozen=True)
class Precision:
    """Bytes of a weight (and of the residual stream), of a matmul output; whether autocast runs."""

    weight: int
    compute: int
    autocast: bool


# Lightning's precision names (`trainer.precision`), "bf16"/"16" being its short forms of the mixed ones.
PRECISIONS: dict[str, Precision] = {
    "64": Precision(8, 8, False),
    "64-true": Precision(8, 8, False),
    "32": Precision(4, 4, False),
    "32-true": Precision(4, 4, False),
    "bf16-mixed": Precision(4, 2, True),
    "16-mixed": Precision(4, 2, True),
    "bf16": Precision(4, 2, True),
    "16": Precision(4, 2, True),
    "bf16-true": Precision(2, 2, False),
    "16-true": Precision(2, 2, False),
}


def precision_of(name: Any) -> Precision:
    key = str(name)
    if key not in PRECISIONS:
        raise MemoryPlanError(f"trainer.precision={name!r}: the planner knows {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def linear_shapes(t: TextConfig) -> dict[str, tuple[int, int, bool]]:
    """A decoder layer's linears: name -> (in, out, bias)."""
    D, q, kv, inter = (
        t.hidden_size,
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
        t.intermediate_size,
    )
    return {
        "q_proj": (D, q, True),
        "k_proj": (D, kv, True),
        "v_proj": (D, kv, True),
        "o_proj": (q, D, False),
        "gate_proj": (D, inter, False),
        "up_proj": (D, inter, False),
        "down_proj": (inter, D, False),
    }


def parameter_counts(config: MusicFlamingoConfig) -> dict[str, int]:
    """Parameters per part: `audio_tower` (of which `audio_layer` per layer, `audio_positions` frozen),
    `projector`, `embed`, `decoder_layer` (per layer), `final_norm`, `lm_head` (0 when tied). Sums to
    `config.num_parameters()`."""
    a, t = config.audio, config.text
    d, f = a.hidden_size, a.intermediate_size
    audio_layer = 4 * d * d + 3 * d + 2 * d * f + f + d + 4 * d  # k_proj has no bias; 2 LayerNorms
    stem = a.num_mel_bins * d * 3 + d + d * d * 3 + d
    linears = sum(i * o + (o if b else 0) for i, o, b in linear_shapes(t).values())
    projector = d * t.hidden_size + t.hidden_size**2 + (2 * t.hidden_size if config.projector_bias else 0)
    return {
        "audio_tower": stem + a.max_source_positions * d + a.num_hidden_layers * audio_layer + 2 * d,
        "audio_layer": audio_layer,
        "audio_positions": a.max_source_positions * d,
        "audio_convs": stem,
        "projector": projector,
        "embed": t.vocab_size * t.hidden_size,
        "decoder_layer": linears + 2 * t.hidden_size,
        "final_norm": t.hidden_size,
        "lm_head": 0 if t.tie_word_embeddings else t.vocab_size * t.hidden_size,
    }


@dataclass(frozen=True)
class GRPOSetup:
    """What a GRPO step adds (`musicflamingo.grpo`, `model.rollout` and `model.loss`): rollouts of `group_size`
    completions of up to `max_new_tokens` per prompt, `slots` decoded at once (None: all), updates over
    `micro_batch_size` completions (whole groups; below `group_size`, pieces of one), and with `kl` a frozen reference copy of full fine-tuning in
    `reference_bytes` per parameter (None: the weights' dtype); LoRA's reference is the model with adapters off."""

    group_size: int
    max_new_tokens: int
    slots: int | None
    micro_batch_size: int
    kl: bool = True
    reference_bytes: int | None = None


@dataclass(frozen=True)
class TrainingSetup:
    """What decides a training step's memory. `tokens`: padded decoder tokens per step and device
    (`data.batch_max_tokens`); `windows`: audio windows per step (None: as many as `tokens` holds, audio filling
    the batch); `labelled`: positions with a label (None: all, an upper bound); `rows`: sequences per step."""

    precision: str = "32"
    device: str = "cpu"  # "cpu" or "cuda": CPU bf16 training keeps the encoder's attention probabilities
    devices: int = 1  # per node (`trainer.devices`)
    strategy: str = "single"  # "single", "ddp" or "fsdp"
    nodes: int = 1  # `trainer.num_nodes`
    train_audio_tower: bool = True
    train_projector: bool = True
    train_language_model: bool = True
    lora_rank: int = 0  # 0: no LoRA
    lora_targets: tuple[str, ...] = ()
    lora_dropout: bool = False  # `model.net.lora.dropout` > 0: adapters keep dropped inputs and noise
    # `model.net.lora.rank` and `.targets` as configured, LoRA on or off: what `alternatives` suggests enabling
    # (None: rank 8 on q/k/v/o)
    lora_configured: tuple[int, tuple[str, ...]] | None = None
    quantize_base: str | None = None  # "nf4": the frozen decoder linears in 4 bits (QLoRA)
    checkpointing: bool = False
    tokens: int = 4096
    windows: int | None = None
    labelled: int | None = None
    rows: int = 1
    accumulate: int = 1
    grpo: GRPOSetup | None = None  # GRPO: `tokens` is then the data's budget of prompt tokens per batch
    loss_chunk: int = LOSS_CHUNK  # rows of logits the loss makes at a time
    packed: bool = False  # `data.pack`: rows of several conversations, attended run by run
    compiled: bool = False  # `model.net.compile`: compiled layers take packed rows' (S, S) mask instead

    @property
    def shards(self) -> int:
        """How many pieces FSDP cuts weights, gradients and states into: every device of every node (1 without
        FSDP: DDP keeps a whole copy per device however many there are)."""
        return self.devices * self.nodes if self.strategy == "fsdp" else 1


@dataclass
class MemoryPlan:
    """A predicted peak (bytes per device, reached `when`) and its items, each with how it was counted. The items
    are full sizes: gradients and activations, for one, are never all alive at once."""

    title: str
    items: list[tuple[str, int, str]]
    peak: int
    when: str
    notes: list[str] = field(default_factory=list)

    def item(self, name: str) -> int:
        return next(b for n, b, _ in self.items if n == name)

    def table(self) -> str:
        width = max(len(n) for n, _, _ in self.items)
        lines = [self.title]
        lines += [f"  {n:<{width}}  {_fmt(b):>9}  {how}" for n, b, how in self.items]
        lines.append(f"  {'peak':<{width}}  {_fmt(self.peak):>9}  per device, {self.when}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _fmt(n: float) -> str:
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Block:
    """One stage of the forward: bytes it keeps for backward, the gradients its backward makes, and its working
    memory beyond those (forward, backward)."""

    name: str
    kept: int
    grad: int = 0
    forward: int = 0
    backward: int = 0


def adapter_bytes(setup: TrainingSetup, p: Precision) -> int:
    """Bytes of a LoRA adapter weight (and its gradient and AdamW states): float32 over a half-precision base
    (model/lora.py's `FloatAdapters`, as peft), under FSDP too (`distributed.MusicFlamingoFSDP`)."""
    return 4 if p.weight == 2 else p.weight


def replicated_adapters(setup: TrainingSetup, p: Precision) -> bool:
    """Whether FSDP keeps the LoRA adapters whole on every device: the float32 ones over a half-precision base
    stay out of its flat parameters (`distributed.MusicFlamingoFSDP`), with their gradients and AdamW states;
    under a float32 base (bf16-mixed) they are sharded with their blocks."""
    return setup.shards > 1 and bool(setup.lora_rank) and adapter_bytes(setup, p) != p.weight


def _decoder_layer(
    t: TextConfig, setup: TrainingSetup, p: Precision, full: int, rows: int, seq: int
) -> tuple[int, int]:
    """(bytes one decoder layer keeps for backward, of them its autocast weight copies): `full` positions make
    keys and values, `rows` positions the rest (fewer in the last layer, which also keeps a (rows, seq) mask)."""
    D, hd, H = t.hidden_size, t.head_dim, t.num_attention_heads
    q, kv, inter = H * hd, t.num_key_value_heads * hd, t.intermediate_size
    c, s, r = p.compute, p.weight, setup.lora_rank
    adapted = set(setup.lora_targets) if r else set()
    shapes = linear_shapes(t)
    plain = setup.quantize_base is None  # 4-bit linears keep no autocast copy and are never fused
    copy = c if p.autocast else 0
    copies = 0
    # LoRA dropout: an adapter's input is its own dropped tensor (under autocast its bf16 copy, as without dropout)
    # plus what dropout keeps for backward: on CPU its noise in the input's dtype (at::dropout multiplies by it), on
    # CUDA the fused kernel's bool mask
    dropout = bool(r) and setup.lora_dropout
    noise = (lambda b: b) if setup.device == "cpu" else (lambda b: 1)
    # float32 adapters over a bf16 base without autocast: each casts its input to float32 and keeps that copy (and
    # its dropped one); the rank-r middle is float32 too
    wide = 0 if p.autocast else adapter_bytes(setup, p) - s
    m = c + wide  # bytes of an adapter's own input copy and middle

    def reads(names: Sequence[str], n: int) -> int:
        """What one normalised input and the linears reading it keep. Fused (plain linears, no adapter): the
        norm's input and rstd. Unfused: those, and each adapter's input (its own copy under autocast) and rank-r
        middle; under autocast every plain weight's bf16 copy, kept for the input gradient."""
        nonlocal copies
        mine = [x for x in names if x in adapted]
        if plain and not mine:
            return n * (s * D + 4)
        copies += sum(copy * shapes[x][0] * shapes[x][1] for x in names) if plain else 0
        copies += sum(copy * r * (shapes[x][0] + shapes[x][1]) for x in mine)
        xn = (len(mine) * m * D if p.autocast or wide else s * D) if mine else 0
        if mine and dropout:  # the normalised input is dropped anew per adapter
            xn = len(mine) * D * ((c if p.autocast else s + wide) + noise(s + wide))
        return n * (s * D + 4 + xn + len(mine) * m * r)

    if full == rows:
        kept = reads(("q_proj", "k_proj", "v_proj"), full)
    else:  # the last layer: q from the gathered rows (their input, index, cos/sin again) and a (rows, seq) mask
        kept = (
            reads(("k_proj", "v_proj"), full) + reads(("q_proj",), rows) + rows * (8 + 2 * hd * s + c * seq)
        )
    if setup.packed and setup.compiled and full == rows:  # SDPA keeps the (S, S) mask as an additive one in c
        kept += full * c * seq
    kept += full * 2 * c * kv + rows * (2 * c * q + 4 * H)  # k, v; q after RoPE, attention output, logsumexp
    copies += copy * q * D if plain else 0  # o_proj: a plain F.linear
    if "o_proj" in adapted:  # reads the attention output (c bytes, kept already); dropout makes its own copy
        own = q * (m + noise(m)) if dropout else (q * m if wide else 0)  # a float32 adapter: its float32 copy
        kept += rows * (m * r + own)
        copies += copy * r * (q + D)
    kept += reads(("gate_proj", "up_proj"), rows) + rows * 2 * c * inter  # gate, up
    # unfused SwiGLU: silu(gate) too, and the product where an adapter reads it (a frozen 4-bit down_proj keeps
    # nothing of its input: bitsandbytes saves only the packed weight)
    if "down_proj" in adapted or not plain:
        down = m * inter + m * r if "down_proj" in adapted else 0
        if "down_proj" in adapted and dropout:  # the dropped product instead of the product, and the noise
            down += inter * noise(m)
        kept += rows * (c * inter + down)
        copies += copy * inter * D if plain else 0
    return kept + copies, copies


def _encoder(config: MusicFlamingoConfig, setup: TrainingSetup, p: Precision, windows: int) -> list[Block]:
    """The audio tower's blocks in forward order. Frozen, it keeps nothing but still runs (its working memory,
    SDPA's attention); training on a CPU in bf16 it runs attention as plain matmuls (model/encoder.py) whose
    scores, their float32 softmax and the bf16 probabilities are alive at once: (c + 8) bytes per score, H*P^2
    scores per window."""
    a = config.audio
    P, d, f, H = a.max_source_positions, a.hidden_size, a.intermediate_size, a.num_attention_heads
    c, s, copy = p.compute, p.weight, (p.compute if p.autocast else 0)
    wp = windows * P
    if not setup.train_audio_tower:  # no gradient flows through it: SDPA, whatever the device and dtype
        work = wp * (2 * s * d + c * max(6 * d, 2 * f))
        return [Block("audio tower (frozen)", 0, forward=max(work, 2 * windows * c * 2 * P * d))]
    matmul_attention = setup.device == "cpu" and c == 2  # the encoder's bf16 CPU training attention
    scores = windows * H * P * P if matmul_attention else 0
    # conv1's input (a copy of the batch's float32 features, unless they are used as they are), the GELUs' and
    # conv2's inputs
    features = 0 if c == 4 else c * 2 * P * a.num_mel_bins
    stem = windows * (features + c * 5 * P * d) + copy * parameter_counts(config)["audio_convs"]
    attention = c * H * P + c * d if matmul_attention else c * d + 4 * H  # probabilities + output, or flash
    layer = wp * (2 * (s * d + 8) + 3 * c * d + attention + c * f) + copy * d * d
    forward = wp * c * max(3 * d, 2 * f) + (c + 8) * scores
    backward = wp * c * max(3 * f, 3 * d) + 2 * c * scores
    if setup.checkpointing:  # the input is kept; backward rebuilds the rest, one layer at a time
        layer, backward = wp * s * d, layer + backward
    tail = windows * (s * P * d + (P // 2) * (s * d + 8))  # the pool's and the final LayerNorm's inputs
    tail += 2 * windows * (P // 2) * 2 * config.rote_dim_per_axis * 8  # RoTE cos/sin, float64
    layers = [Block("audio layer", layer, forward=forward, backward=backward)] * a.num_hidden_layers
    return [Block("audio stem", stem, forward=windows * c * 2 * P * d), *layers, Block("audio tail", tail)]


def _trainable(config: MusicFlamingoConfig, setup: TrainingSetup) -> dict[str, int]:
    """Trainable parameters per part (`language_model`: its LoRA adapters when LoRA is on)."""
    n = parameter_counts(config)
    L = config.text.num_hidden_layers
    if setup.lora_rank:
        shapes = linear_shapes(config.text)
        lm = L * sum(setup.lora_rank * (shapes[x][0] + shapes[x][1]) for x in setup.lora_targets)
    elif setup.train_language_model:
        lm = n["embed"] + L * n["decoder_layer"] + n["final_norm"] + n["lm_head"]
    else:
        lm = 0
    return {
        "audio_tower": n["audio_tower"] - n["audio_positions"] if setup.train_audio_tower else 0,
        "projector": n["projector"] if setup.train_projector else 0,
        "language_model": lm,
    }


def _weight_bytes(config: MusicFlamingoConfig, setup: TrainingSetup, p: Precision) -> tuple[int, int]:
    """(bytes of the weights, adapters included; the 4-bit decoder linears' share of them)."""
    total = config.num_parameters()
    adapters = _trainable(config, setup)["language_model"] * adapter_bytes(setup, p) if setup.lora_rank else 0
    if setup.quantize_base is None:
        return total * p.weight + adapters, 0
    quantized = config.text.num_hidden_layers * sum(i * o for i, o, _ in linear_shapes(config.text).values())
    four_bit = int(quantized * NF4_BYTES)
    return (total - quantized) * p.weight + four_bit + adapters, four_bit


def training_blocks(config: MusicFlamingoConfig, setup: TrainingSetup) -> list[Block]:
    """Every stage of a training step in forward order, gradients in bytes per device."""
    p = precision_of(setup.precision)
    a, t = config.audio, config.text
    c, s, L = p.compute, p.weight, t.num_hidden_layers
    D, inter = t.hidden_size, t.intermediate_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    N = setup.tokens
    K = N if setup.labelled is None else min(setup.labelled, N)
    S = max(1, N // max(1, setup.rows))
    W = step_windows(config, setup)
    shard = setup.shards
    n, trainable = parameter_counts(config), _trainable(config, setup)
    full_lm = setup.train_language_model and not setup.lora_rank

    blocks = []
    for block in _encoder(config, setup, p, W):
        grad = n["audio_layer"] if block.name == "audio layer" else 0
        if block.name == "audio stem":  # the convolutions and the final LayerNorm (positions are frozen)
            grad = trainable["audio_tower"] - a.num_hidden_layers * n["audio_layer"]
        blocks.append(replace(block, grad=grad))
    if setup.train_audio_tower or setup.train_projector:
        Pa = W * a.tokens_per_window
        kept = Pa * (c * a.hidden_size + 2 * c * D + 1) + (c * n["projector"] if p.autocast else 0)
        blocks.append(Block("projector", kept, trainable["projector"], Pa * c * D, Pa * c * 2 * D))
    blocks.append(Block("embeddings", N * 9 + 2 * N * t.head_dim * s, n["embed"] if full_lm else 0))
    layer_grad = (
        trainable["language_model"] // L if setup.lora_rank else (n["decoder_layer"] if full_lm else 0)
    )
    # SwiGLU's backward, per row and I: the fused kernel (fused.swiglu_linear) holds silu(gate), the product's
    # gradient, up's and gate's gradients and one temporary at once (5), and the product too when down_proj's weight
    # trains (6); autograd's unfused path (adapted down_proj, 4-bit bases) frees each node's saved tensors as it
    # goes: the product's gradient, then those of silu(gate) and up (3), or, when an adapter kept the product
    # (counted in the layer's activations), the product's two gradients summed in place, then the product freed (2)
    down_adapted = bool(setup.lora_rank) and "down_proj" in setup.lora_targets
    fused_mlp = setup.quantize_base is None and not down_adapted
    swiglu_backward = (6 if full_lm else 5) if fused_mlp else (2 if down_adapted else 3)
    for i in range(L):
        rows = K if i == L - 1 else N
        kept, _ = _decoder_layer(t, setup, p, N, rows, S)
        # working memory: the output and q/k/v with RoPE's temporaries, or SwiGLU's; in backward the residual's
        # gradients and SwiGLU's backward
        forward = N * s * D + rows * c * max(3 * q + 2 * kv, 2 * inter)
        if setup.packed and setup.compiled and setup.checkpointing:  # the additive mask, made anew per layer
            forward += N * c * S
        backward = N * s * 2 * D + rows * c * swiglu_backward * inter
        if setup.checkpointing:  # the input is kept; backward rebuilds the rest, one layer at a time
            kept, backward = N * s * D, kept + backward
        blocks.append(Block(f"decoder layer {i}", kept, layer_grad, forward, backward))
    # the head: the final norm's input, dL/dh and (when it trains) dL/dW in float32, made in the forward; its
    # working memory is one loss chunk: logits in the compute dtype, float32 copies for the loss and its gradient,
    # and the head's autocast copy
    head = K * (s * D + 4) + K * D * (c if p.autocast else s) + (t.vocab_size * D * 4 if full_lm else 0)
    chunk = min(K, setup.loss_chunk) * t.vocab_size * (c + 12) + (t.vocab_size * D * c if p.autocast else 0)
    head_grad = n["lm_head"] + n["final_norm"] if full_lm else 0
    blocks.append(Block("head", head, head_grad, chunk, t.vocab_size * D * 4 if full_lm else 0))
    adapter = adapter_bytes(setup, p) if setup.lora_rank else s
    whole = replicated_adapters(setup, p)  # the adapters' gradients are each device's whole ones
    return [
        replace(b, grad=b.grad * adapter // (1 if whole else shard))
        if b.name.startswith("decoder layer")
        else replace(b, grad=b.grad * s // shard)
        for b in blocks
    ]


def trained_config(config: MusicFlamingoConfig, setup: TrainingSetup) -> MusicFlamingoConfig:
    """`config` as training holds it: a tied head (`tie_word_embeddings=true`, a Qwen2.5-0.5B/1.5B-like base) gets
    its own copy when the language model trains without LoRA (`lit.untie_trained_head`: a head that requires grad),
    so it is planned untied, its V x D weights, gradients and AdamW moments counted; a frozen tied pair (LoRA, a
    frozen language model) stays shared."""
    if config.text.tie_word_embeddings and setup.train_language_model and not setup.lora_rank:
        return replace(config, text=replace(config.text, tie_word_embeddings=False))
    return config


def _noted_untied(plan: MemoryPlan) -> MemoryPlan:
    plan.notes.append(
        "tie_word_embeddings=true and the language model trains: lm_head gets its own copy (lit.untie_trained_head), "
        "planned untied (its V x D weights, gradients and AdamW moments)"
    )
    return plan


def plan_training(config: MusicFlamingoConfig, setup: TrainingSetup) -> MemoryPlan:
    """The predicted peak of one training step per device (the formulas: this module's docstring); a tied head
    that trains is planned untied (:func:`trained_config`)."""
    trained = trained_config(config, setup)
    if trained is not config:
        return _noted_untied(plan_training(trained, setup))
    if setup.grpo is not None:
        return plan_grpo(config, setup)
    p = precision_of(setup.precision)
    t, s = config.text, p.weight
    shard = setup.shards
    blocks = training_blocks(config, setup)
    acts = sum(b.kept for b in blocks)
    dequant = 0
    if setup.quantize_base:  # one 4-bit linear dequantised per use
        dequant = max(i * o for i, o, _ in linear_shapes(t).values()) * p.compute
    weights, four_bit = _weight_bytes(config, setup, p)
    trainable = _trainable(config, setup)
    train_params = sum(trainable.values())
    adapters = trainable["language_model"] if setup.lora_rank else 0
    adapter_b = adapters * adapter_bytes(setup, p)
    if replicated_adapters(setup, p):  # whole on every device, their gradients too
        weights = (weights - adapter_b) // shard + adapter_b
        grads = (train_params - adapters) * s // shard + adapter_b
    else:
        weights //= shard
        grads = ((train_params - adapters) * s + adapter_b) // shard
    states = 2 * grads  # AdamW's two moments, in the parameters' dtype

    batch = batch_bytes(config, setup)
    held = grads if setup.accumulate > 1 else 0  # gradients accumulate across micro-batches
    live, forward = batch, 0
    for b in blocks:
        forward = max(forward, live + b.forward)
        live += b.kept
    backward = 0
    for b in reversed(blocks):  # a block's gradients appear, then its activations go
        live += 0 if held else b.grad
        backward = max(backward, live + b.backward)
        live -= b.kept
    moments = {
        "in the forward": held + forward + dequant,
        "in backward": held + backward + dequant,
        "at the optimizer step": batch + 2 * grads,  # foreach AdamW: one parameter-sized temporary
    }
    when = max(moments, key=moments.get)
    extra, extra_how, notes = 0, "", []
    n = parameter_counts(config)
    if setup.strategy == "ddp":  # one process too: Lightning wraps it in DDP all the same (`_strategy`)
        extra, extra_how = grads, "DDP: its gradient buckets hold one more copy of the gradients"
    if shard > 1:
        root = n["embed"] + n["lm_head"] + n["projector"] + n["audio_convs"] + n["audio_positions"]
        extra = (root + 2 * max(n["decoder_layer"], n["audio_layer"])) * s
        extra_how = f"FSDP over {shard} devices: the root unit and two blocks gathered at a time"
    peak = weights + states + moments[when] + extra

    whole = replace(setup, checkpointing=False, train_audio_tower=True, tokens=1024, labelled=1024, rows=1)
    per_token = _decoder_layer(t, whole, p, 1024, 1024, 1024)[0] / 1024
    per_window = sum(b.kept for b in _encoder(config, whole, p, 1))
    notes.append(
        f"per token and decoder layer: {per_token / 1e3:.1f} KB kept ({s * t.hidden_size / 1e3:.1f} KB "
        f"checkpointed); per audio window, the encoder when it trains: {per_window / 1e6:.1f} MB"
    )
    N, K = setup.tokens, setup.labelled if setup.labelled is not None else setup.tokens
    acts_how = f"{N} tokens ({K} labelled), {step_windows(config, setup)} audio windows"
    head = blocks[-1]
    sharded = f", / {shard} devices" if shard > 1 else ""
    if replicated_adapters(setup, p):
        sharded += ", the adapters' whole on each"
    a = adapter_bytes(setup, p)
    wide = f" (the {adapters:,} of the adapters x {a} B)" if adapters and a != s else ""
    items = [
        ("weights", weights, _weights_how(config, setup, p, four_bit)),
        ("gradients", grads, f"{train_params:,} trainable parameters x {s} B{wide}{sharded}"),
        ("optimizer states", states, f"AdamW: 2 x {s} B per trainable parameter{wide}{sharded}"),
        ("batch", batch, "float32 features, ids, labels and masks"),
        ("activations", acts, acts_how + (", checkpointed" if setup.checkpointing else "")),
        (
            "loss chunk",
            head.forward,
            f"{min(K, setup.loss_chunk)} rows x {t.vocab_size} logits, never all at once",
        ),
    ]
    if dequant:
        items.append(("dequantised linear", dequant, "the largest 4-bit linear, rebuilt per use"))
    if extra:
        items.append(("distributed", extra, extra_how))
    title = (
        f"training plan: {config.name}, precision {setup.precision}, {setup.strategy} x {setup.devices} "
        f"({setup.device}){f' x {setup.nodes} nodes' if setup.nodes > 1 else ''}, {_what_trains(setup)}"
    )
    return MemoryPlan(title, items, peak, when, notes)


def plan_grpo(config: MusicFlamingoConfig, setup: TrainingSetup) -> MemoryPlan:
    """A GRPO step's peak: the worst, over how the batch's prompt tokens (`setup.tokens`, padded) split into B
    prompts of P tokens, of the rollouts (resident state + the engine's KV cache, a prompt's prefill, the batch's
    audio and prompt embeddings) and of the update (SFT's step on a micro-batch of completions, P + max_new rows).
    A tied head that trains is planned untied (:func:`trained_config`; its KL reference copies it too)."""
    trained = trained_config(config, setup)
    if trained is not config:
        return _noted_untied(plan_grpo(trained, setup))
    g = setup.grpo
    assert g is not None
    p = precision_of(setup.precision)
    G, budget = g.group_size, max(1, setup.tokens)
    per = max(1, g.micro_batch_size // G)  # prompts per micro-batch (whole groups, or a piece of one)
    # Memory grows with P at a fixed B, so P = budget // B; the KV cache peaks near B = slots / G, the update near
    # B = per: those, and a spread of others
    counts = {1, 2, 4, 8, 16, 32, 64, per, per + 1}
    if g.slots:
        counts |= {max(1, g.slots // G), g.slots // G + 1}
    worst = None
    for B in sorted(b for b in counts if b <= max(1, budget // 16)):
        plan = _grpo_plan_for(config, setup, p, B, budget // B)
        if worst is None or plan.peak > worst.peak:
            worst = plan
    assert worst is not None
    return worst


def _grpo_plan_for(
    config: MusicFlamingoConfig, setup: TrainingSetup, p: Precision, prompts: int, prompt_tokens: int
) -> MemoryPlan:
    g = setup.grpo
    assert g is not None
    G, Nn, P = g.group_size, g.max_new_tokens, prompt_tokens
    windows = math.ceil(P / config.audio.tokens_per_window)  # audio fills the prompt, as in `step_windows`
    used = min(prompts, max(1, g.micro_batch_size // G))
    # whole groups; below group_size, `grpo` splits a group into pieces of micro_batch_size completions
    m = used * G if g.micro_batch_size >= G else g.micro_batch_size
    step = plan_training(
        config,
        replace(
            setup,
            grpo=None,
            tokens=m * (P + Nn),
            rows=m,
            labelled=m * Nn,
            windows=used * windows,
            loss_chunk=LOGPROB_CHUNK,
        ),
    )
    slots = min(g.slots or prompts * G, prompts * G)
    # rollouts run in the weights' dtype (no autocast) and encode every prompt's audio at once, before the engine
    rollout = plan_inference(
        config,
        dtype_bytes=p.weight,
        slots=slots,
        prompt_tokens=P,
        new_tokens=Nn,
        windows=prompts * windows,
        device=setup.device,
        preallocated=True,  # grpo.py makes the engine's cache for prompt + max_new_tokens
    )
    kv, audio = rollout.item("KV cache"), rollout.item("audio encoder")
    embeds = prompts * P * config.text.hidden_size * p.weight
    shard = setup.shards
    reference = 0
    if g.kl and not setup.lora_rank:
        # `grpo.frozen_copy`: in the weights' dtype the frozen parts are shared, only the trained ones copied
        copied = config.num_parameters() if g.reference_bytes else sum(_trainable(config, setup).values())
        reference = copied * (g.reference_bytes or p.weight) // shard
    resident = step.item("weights") + step.item("optimizer states") + step.item("gradients") + reference
    rolling = resident + max(
        audio, embeds + kv + rollout.item("prefill") + rollout.item("logits")
    )  # the last step's gradients live until the next update zeroes them
    updating = step.peak + reference
    items = [*step.items]
    if reference:
        items.insert(
            1,
            (
                "KL reference",
                reference,
                "a frozen copy of the weights (full fine-tuning, beta > 0; frozen parts shared unless "
                "reference_dtype)",
            ),
        )
    items += [
        ("rollout KV cache", kv, f"{slots} slots x ({P} + {Nn}) positions in {p.weight} B"),
        ("rollout prefill", rollout.item("prefill"), f"one decoder layer on a {P}-token prompt"),
        ("rollout audio", audio, f"{prompts * windows} windows encoded at once"),
        ("rollout embeddings", embeds, f"{prompts} prompts x {P} tokens"),
    ]
    when = "during rollouts" if rolling > updating else f"in the update ({step.when})"
    title = step.title.replace("training plan:", "GRPO plan:", 1)
    notes = [
        f"worst case over the batch's {setup.tokens} prompt tokens: {prompts} prompt(s) of {P} tokens, "
        f"{G} completions each, {m} completions per micro-batch of {P + Nn} positions",
        *step.notes,
    ]
    return MemoryPlan(title, items, max(rolling, updating), when, notes)


def batch_bytes(config: MusicFlamingoConfig, setup: TrainingSetup) -> int:
    """The collated batch: float32 log-mel windows and their int64 frame masks, ids, attention mask, labels."""
    a, W = config.audio, step_windows(config, setup)
    tokens = W * 2 * a.max_source_positions * (4 * a.num_mel_bins + 8) + 3 * 8 * setup.tokens
    if setup.packed:  # seq_ids and position_ids (compiled layers: and the (S, S) bool mask built from them)
        tokens += 2 * 8 * setup.tokens
        if setup.compiled:
            tokens += setup.tokens * max(1, setup.tokens // max(1, setup.rows))
    return tokens


def step_windows(config: MusicFlamingoConfig, setup: TrainingSetup) -> int:
    """Audio windows per step: `setup.windows`, or as many as the token budget holds."""
    if setup.windows is not None:
        return setup.windows
    return max(1, math.ceil(setup.tokens / config.audio.tokens_per_window))


def _weights_how(config: MusicFlamingoConfig, setup: TrainingSetup, p: Precision, four_bit: int) -> str:
    how = f"{config.num_parameters():,} parameters x {p.weight} B"
    if setup.lora_rank:
        how += f" + LoRA adapters x {adapter_bytes(setup, p)} B"
    if four_bit:
        how += f", decoder linears in 4 bits ({_fmt(four_bit)})"
    if setup.shards > 1:
        how += f", / {setup.shards} devices"
        if replicated_adapters(setup, p):
            how += ", the adapters whole on each"
    return how


def _what_trains(setup: TrainingSetup) -> str:
    parts = [
        n for n, on in (("audio tower", setup.train_audio_tower), ("projector", setup.train_projector)) if on
    ]
    if setup.lora_rank:
        parts.append(f"{'QLoRA' if setup.quantize_base else 'LoRA'} r={setup.lora_rank}")
    elif setup.train_language_model:
        parts.append("language model")
    return "trains " + (" + ".join(parts) or "nothing")


# ---------------------------------------------------------------------------------------------- generation
def weight_bytes(config: MusicFlamingoConfig, dtype_bytes: int, method: str | None = None) -> int:
    """Bytes of a `config` model's weights in `dtype_bytes` floats; with `method`, every linear as `quantize_model`
    makes it (one byte per weight, one scale per row). Counted on a meta-device model: nothing is allocated."""
    if not method:
        return config.num_parameters() * dtype_bytes
    from musicflamingo.model.quantize import stored_tensors

    # integers (int8 weights, uint8 bytes of two int4 weights) as stored; floats in `dtype_bytes`
    return sum(
        t.numel() * (dtype_bytes if t.dtype.is_floating_point else t.element_size())
        for t in stored_tensors(_quantized_meta_model(config, method))
    )


# (repr(config), method) -> its meta model (`_quantized_meta_model`)
_META_MODELS: dict[tuple[str, str], Any] = {}


def _quantized_meta_model(config: MusicFlamingoConfig, method: str):  # noqa: ANN202 (imports torch lazily)
    """A `config` model quantized with `method` on the meta device: the structure, nothing allocated. Kept for the
    next call (read only): building the release's takes ~0.5 s, and a refusal plans a dozen alternatives."""
    import torch

    from musicflamingo.model.musicflamingo import MusicFlamingo
    from musicflamingo.model.quantize import quantize_model

    key = (repr(config), method)
    if key not in _META_MODELS:
        with torch.device("meta"):
            model = MusicFlamingo(config)
        if len(_META_MODELS) >= 8:  # a few configs per process; tests make many
            _META_MODELS.pop(next(iter(_META_MODELS)))
        _META_MODELS[key] = quantize_model(model, method)
    return _META_MODELS[key]


def quant_workspace_bytes(
    config: MusicFlamingoConfig,
    method: str,
    dtype_bytes: int,
    *,
    prompt_tokens: int,
    slots: int,
    windows: int,
) -> int:
    """The scratch a quantized model's prefill keeps for the process on CPU (`quantize.workspace_bytes`): the rows
    each linear sees are `windows` x `max_source_positions` frames in the audio tower, half of that in the
    projector, the prompt in the decoder (its MLP in chunks of `MLP_CHUNK_ROWS`), one row per slot in the head and
    in a decode step."""
    from musicflamingo.model.quantize import workspace_bytes

    frames = windows * config.audio.max_source_positions

    def rows(name: str) -> int:
        if name.startswith("audio_tower"):
            return frames
        if name.startswith("multi_modal_projector"):
            return frames // 2
        if name == "lm_head":  # a prefill keeps the last position's logits only
            return slots
        return max(min(prompt_tokens, MLP_CHUNK_ROWS) if ".mlp." in name else prompt_tokens, slots)

    return workspace_bytes(_quantized_meta_model(config, method), rows, dtype_bytes)


def engine_capacities(
    prompt_tokens: int, new_tokens: int, limit: int, capacity: int | None = None, layers: int = 1
) -> tuple[int, int, int]:
    """Positions per slot of an `engine.Engine` cache for prompts of `prompt_tokens` and answers of `new_tokens`:
    (after the prefill, at the end, the most alive at once). With `capacity` the cache is made that size
    (`engine.generate`, GRPO). Without, it starts at one `KEY_BLOCK` and grows as `Engine._ensure_capacity` grows
    it (infer.py, serve.py): to the prompt at the prefill, then doubling as answers reach its end; a growth replaces
    the `layers` layers' keys and values one tensor at a time (`KVCache.resize`): the new cache and one old
    tensor, 1 / (2 layers) of the old cache, alive at once."""

    def rnd(n: int) -> int:  # `Engine._round`
        return min(-(-n // KEY_BLOCK) * KEY_BLOCK, limit)

    if capacity is not None:
        cap = rnd(capacity)
        return cap, cap, cap
    cap = most = rnd(KEY_BLOCK)
    if prompt_tokens + 1 > cap:  # the prefill: the prompt and the first token's position
        grown = rnd(max(prompt_tokens + 1, 2 * cap))
        cap, most = grown, max(most, grown + -(-cap // (2 * layers)))
    after_prefill = cap
    # decode steps write positions up to prompt + new - 2 (the first token comes from the prefill)
    final = min(prompt_tokens + new_tokens - 1, limit)
    while final > cap:
        grown = rnd(2 * cap)
        cap, most = grown, max(most, grown + -(-cap // (2 * layers)))
    return after_prefill, cap, most


def feature_bytes(config: MusicFlamingoConfig, windows: int, dtype_bytes: int = 4) -> int:
    """The log-mel features of `windows` windows, (W, n_mels, mel_frames), in `dtype_bytes` floats."""
    return windows * config.audio.num_mel_bins * config.audio.mel_frames * dtype_bytes


def feature_extraction_bytes(config: MusicFlamingoConfig, windows: int, seconds: float) -> int:
    """Peak bytes of the processor making `windows` windows' features from `seconds` of decoded audio at once, on
    the CPU (`audio.features.LogMelExtractor.log_mel`, ~10x the features): the float32 waveform, the zero-padded
    windows, the STFT's complex output, its power, and the mel matmul's output with three elementwise steps alive
    at its end. Measured within 1 % in tests/test_planner_review9.py."""
    from musicflamingo.audio.features import N_FFT, SAMPLING_RATE

    frames = config.audio.mel_frames
    samples = int(config.window_seconds * SAMPLING_RATE)
    bins = N_FFT // 2 + 1
    per_window = samples * 4 + (frames + 1) * bins * 8 + bins * frames * 4 + 4 * feature_bytes(config, 1)
    return windows * per_window + int(seconds * SAMPLING_RATE) * 4


def plan_inference(
    config: MusicFlamingoConfig,
    *,
    dtype_bytes: int,
    slots: int = 1,
    prompt_tokens: int,
    new_tokens: int,
    windows: int,
    embed_batch: bool = False,
    device: str = "cpu",
    quantize: str | None = None,
    requests: int | None = None,
    audio_seconds: float | None = None,
    preallocated: bool | None = None,
    prepared: int = 0,
    extracting: int = 1,
    any_split: bool = False,
    cache_positions: int | None = None,
    compiled: bool = False,
) -> MemoryPlan:
    """The predicted peak of generating `new_tokens` for `slots` requests of `prompt_tokens` tokens with
    `windows` audio windows each. `embed_batch`: every request's prompt is embedded before the first prefill
    (`engine.generate`, eval.py), not one request at a time (`infer.py`, serve.py). `quantize`: int8 / int4
    linears. `requests`: how many go through the slots (default `slots`): past `slots`, later prefills meet the
    cache at its largest. `audio_seconds`: a request's audio (default: its windows, full) that the processor
    decodes and cuts on the CPU. `preallocated`: the cache is made for prompt + new at once (default: with
    `embed_batch`, as `engine.generate` does), else it grows as the engine needs (`engine_capacities`).
    `prepared`: requests that hold their float32 features on the CPU besides (serve.py's queue and live requests),
    `extracting` requests' features made at once (serve.py's prepare threads); CPU plans only. `any_split`: a
    slot may hold any prompt of up to prompt + new tokens (serve.py): a short prompt's answer doubles the cache
    from its first block, to more than the longest prompt's prefill leaves. `cache_positions`: the cache is fitted
    within that many positions in all, rows x capacity (serve.py's `max_cached_tokens`); `compiled`: its capacity
    doubles (one traced step per capacity)."""
    a, t = config.audio, config.text
    b = dtype_bytes
    requests = slots if requests is None else requests
    preallocated = embed_batch if preallocated is None else preallocated
    weights = weight_bytes(config, b, quantize)
    per_position = (
        2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * b
    )  # keys and values, per slot
    limit = max(t.max_position_embeddings, 1)
    L = t.num_hidden_layers
    at_prefill, capacity, most = engine_capacities(
        prompt_tokens, new_tokens, limit, prompt_tokens + new_tokens if preallocated else None, L
    )
    if any_split and not preallocated:
        _, short, short_most = engine_capacities(1, prompt_tokens + new_tokens - 1, limit, layers=L)
        capacity, most = max(capacity, short), max(most, short_most)
    kv = per_position * slots * capacity
    # later requests are prefilled into the grown cache
    kv_prefill = per_position * slots * (capacity if requests > slots else at_prefill)
    # the processor prepares the first request before any prefill (the cache at its first block), the others after
    first = min(-(-KEY_BLOCK // KEY_BLOCK) * KEY_BLOCK, limit) if not preallocated else at_prefill
    kv_extract = kv_prefill if requests > 1 else per_position * slots * first
    growing = per_position * slots * most
    if cache_positions is not None:
        # a fitted cache (serve.py's max_cached_tokens, `Engine(max_positions=...)`): rows x capacity within the
        # bound, sized for a request's whole reach at its admission; a resize holds one old tensor besides
        reach = min(-(-(prompt_tokens + new_tokens) // KEY_BLOCK) * KEY_BLOCK, limit)
        if (
            compiled
        ):  # every slot a row; capacity doubling up to each row's share of the bound (`Engine._target`)
            cap = min(KEY_BLOCK, limit)
            while cap < reach:
                cap = min(2 * cap, limit)
            if slots * cap > cache_positions:
                cap = max(min(prompt_tokens + new_tokens, limit), cache_positions // slots)
            reach = cap
        kv = kv_prefill = kv_extract = per_position * min(cache_positions, slots * reach)
        growing = kv + -(-kv // (2 * L))
    D, q, kvw, inter = (
        t.hidden_size,
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
        t.intermediate_size,
    )
    P, d, f = a.max_source_positions, a.hidden_size, a.intermediate_size
    encoded = windows * (slots if embed_batch else 1)
    # the encoder: the features it reads in the weights' dtype, then the larger of the stem's conv outputs and a
    # layer's attention (h, x_norm, q, k, v, scaled q, output, its reshape) or MLP (h, fc1 output, its GELU, fc2
    # output); the projector's output after it
    stem = encoded * b * 3 * 2 * P * d
    layer = encoded * P * b * max(8 * d, 2 * d + 2 * f)
    audio = feature_bytes(config, encoded, b) + max(stem, layer) + encoded * (P // 2) * b * 3 * D
    # the processor's float32 features besides the encoder's copy: infer.py holds a request's (on the device: the
    # engine moves them there) through its whole prefill, the encoder casts them; eval.py casts a batch's once
    # (`.to(device, dtype)`), the float32 ones staying on the CPU
    if embed_batch:
        float32 = feature_bytes(config, encoded) if device == "cpu" and b != 4 else 0
        kept = float32 + feature_bytes(config, encoded, b)  # alive until the batch is generated
    else:
        float32 = feature_bytes(config, encoded) if b != 4 else 0
        kept = feature_bytes(config, encoded)
    seconds = (
        windows * config.window_seconds
        if audio_seconds is None
        else min(audio_seconds, windows * config.window_seconds)
    )
    extraction = (
        extracting * feature_extraction_bytes(config, encoded, seconds * (slots if embed_batch else 1))
        if device == "cpu" and windows
        else 0
    )
    queued = prepared * feature_bytes(config, windows) if device == "cpu" else 0
    embeds = (slots if embed_batch else 1) * prompt_tokens * D * b
    # one decoder layer on the prompt: h and the embeddings, then attention, or the MLP's gate, up, silu and product
    # for one chunk of rows with every chunk's output and their concatenation
    attn = prompt_tokens * b * (D + 2 * q + 3 * kvw + q + D)
    mlp = b * (min(prompt_tokens, MLP_CHUNK_ROWS) * 4 * inter + 2 * prompt_tokens * D)
    prefill = prompt_tokens * b * 2 * D + max(attn, mlp) + 2 * prompt_tokens * t.head_dim * b
    logits = slots * t.vocab_size * (b + 4)
    if embed_batch:  # the batch's features and embeddings are made before the engine (and its cache) exists
        moments = {
            "while extracting features": extraction,
            # the token embeddings exist before the audio is encoded into them
            "while encoding audio": float32 + embeds + audio,
            "during a prefill": kept + embeds + kv + prefill + logits,
        }
    else:  # the engine's cache exists; each request's features are made, then encoded inside its prefill
        moments = {
            "while extracting features": kv_extract + extraction,
            "while encoding audio": kv_prefill + float32 + audio,
            "during a prefill": kv_prefill + kept + prefill + logits,
            "while the KV cache grows": growing + logits,
        }
    moments["while decoding"] = kv + logits
    # int8 / int4 on CPU: the quantized prefill's reused scratch, made by the first prefill and kept
    work = (
        quant_workspace_bytes(config, quantize, b, prompt_tokens=prompt_tokens, slots=slots, windows=encoded)
        if quantize and device == "cpu"
        else 0
    )
    when = max(moments, key=lambda k: moments[k])
    peak = weights + work + queued + moments[when]
    how = (
        "made for prompt + new tokens" if preallocated else f"grown as needed: {at_prefill} after the prefill"
    )
    size = f"{slots} slots x {capacity} positions"
    if cache_positions is not None:
        how = "fitted to the live requests, rows x capacity"
        size = f"{kv // per_position} positions (max_cached_tokens {cache_positions})"
    items = [
        (
            "weights",
            weights,
            f"{config.num_parameters():,} parameters"
            + (f", {quantize} linears" if quantize else f" x {b} B"),
        ),
        (
            "KV cache",
            kv,
            f"2 x {t.num_hidden_layers} layers x {t.num_key_value_heads} kv heads x {t.head_dim} x {size} x {b} B "
            f"({how})",
        ),
        ("audio encoder", audio, f"{encoded} windows at once ({_fmt(audio / max(encoded, 1))} per window)"),
        ("audio features", kept, f"{encoded} windows' log-mel features kept through the prefill"),
        ("prefill", prefill, f"one decoder layer on {prompt_tokens} prompt tokens"),
        ("logits", logits, f"{slots} x {t.vocab_size} vocab, last position"),
    ]
    if growing > kv:
        items.append(("KV cache growth", growing, f"old and new buffers at once, {most} positions per slot"))
    if extraction:
        items.append(
            (
                "feature extraction",
                extraction,
                f"log-mel of {extracting} x {encoded} windows on the CPU (processor)",
            )
        )
    if queued:
        items.append(
            ("prepared features", queued, f"{prepared} queued or live requests' float32 features (CPU)")
        )
    if embed_batch:
        items.append(("prompt embeddings", embeds, f"{slots} prompts embedded before their prefills"))
    if work:
        items.append(("quantized workspace", work, f"{quantize} prefill scratch, reused and kept (CPU)"))
    title = f"generation plan: {config.name}, {b * 8}-bit weights ({device}), {slots} slots, {prompt_tokens} + {new_tokens} tokens"
    return MemoryPlan(title, items, peak, when)


# ---------------------------------------------------------------------------------------------- checks
def alternatives(config: MusicFlamingoConfig, setup: TrainingSetup, budget: int) -> list[tuple[str, int]]:
    """Changes to `setup` (as command-line overrides) predicted to fit `budget` bytes per device, with their peaks,
    lightest change first (at most six; for FSDP and the batch size only the smallest change that fits). When no
    single change fits, changes with the largest smaller `data.batch_max_tokens` they fit; when none of those fits
    either: the one with the lowest peak, alone."""
    # the adapters the run would get: those configured (`model.net.lora.rank` / `.targets`; dropout is in `setup`)
    rank, targets = setup.lora_configured or (8, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if setup.lora_rank:
        rank, targets = setup.lora_rank, setup.lora_targets
    lora = dict(lora_rank=rank, lora_targets=targets, train_language_model=False, train_audio_tower=False)
    ckpt, bf16 = "model.net.gradient_checkpointing=true", "trainer.precision=bf16-true"
    lora_cli = (
        f"model.net.lora.enabled=true model.net.lora.rank={rank} 'model.net.lora.targets=[{','.join(targets)}]' "
        "model.net.freeze.language_model=true model.net.freeze.audio_tower=true"
    )
    lean = dict(checkpointing=True, precision="bf16-true")
    candidates: list[tuple[str, dict[str, Any]]] = [
        (ckpt, dict(checkpointing=True)),
        (bf16, dict(precision="bf16-true")),
        (f"{ckpt} {bf16}", lean),
        (lora_cli, lora),
        (f"{lora_cli} {ckpt} {bf16}", {**lora, **lean}),
    ]
    # 4-bit bases and sharding need GPUs, and never go together (QLORA_FSDP)
    if setup.device == "cuda" and setup.strategy != "fsdp":
        candidates.append(
            (
                f"{lora_cli} model.net.quantize_base=nf4 {ckpt} {bf16}",
                {**lora, **lean, "quantize_base": "nf4"},
            )
        )
    if setup.device == "cuda" and not setup.quantize_base:
        candidates += [
            (f"trainer=fsdp trainer.devices={n}", dict(strategy="fsdp", devices=n, **lean))
            for n in (2, 4, 8, 16, 32, 64)
        ]
    g = setup.grpo
    if g is not None:  # GRPO's own levers: one group per update, one group's completions decoded at a time
        if g.micro_batch_size > g.group_size:
            candidates.append(
                (
                    f"model.loss.micro_batch_size={g.group_size}",
                    dict(grpo=replace(g, micro_batch_size=g.group_size)),
                )
            )
        if (g.slots or 1 << 30) > g.group_size:
            candidates.append(
                (f"model.rollout.slots={g.group_size}", dict(grpo=replace(g, slots=g.group_size)))
            )
    batches = [
        (
            f"data.batch_max_tokens={setup.tokens // k}",
            dict(
                tokens=setup.tokens // k,
                windows=None if setup.windows is None else max(1, setup.windows // k),
            ),
        )
        for k in (2, 4, 8, 16)
        if setup.tokens // k >= 64
    ]
    tried, fit, kinds = [], [], set()
    for cli, change in candidates + batches:
        changed = replace(setup, **change)
        if changed == setup:
            continue
        peak = plan_training(config, changed).peak
        tried.append((cli, peak))
        kind = cli.split("=")[0]  # `trainer`, `data.batch_max_tokens`: the smallest such change is enough
        if peak <= budget and not (kind in ("trainer", "data.batch_max_tokens") and kind in kinds):
            fit.append((cli, peak))
            kinds.add(kind)
    # no change alone is enough: each with the largest smaller batch it fits, a heavier one (they come lightest
    # first) listed only when it allows a larger batch than those before it
    best = 0
    for cli, change in [] if fit else candidates:
        for bcli, bchange in batches:
            peak = plan_training(config, replace(setup, **change, **bchange)).peak
            tried.append((f"{cli} {bcli}", peak))
            if peak <= budget:
                if bchange["tokens"] > best:
                    fit.append((f"{cli} {bcli}", peak))
                    best = bchange["tokens"]
                break
    return fit[:6] or sorted(tried, key=lambda x: x[1])[:1]


def check_fits(
    plan: MemoryPlan,
    available: int | None,
    where: str,
    fixes: Sequence[tuple[str, int]] = (),
    processes: int = 1,
    levers: str = "LoRA, QLoRA, checkpointing, bf16-true, FSDP, a smaller batch",
) -> None:
    """MemoryPlanError when `processes` x the plan's peak exceeds `available` bytes (None: unknown, no check);
    the message lists `fixes` (overrides, peak), one a line, or says that none of `levers` fits."""
    need = plan.peak * processes
    if available is None or need <= available:
        return
    times = f" x {processes} processes" if processes > 1 else ""
    fit = [(cli, peak) for cli, peak in fixes if peak * processes <= available]
    lines = [
        f"predicted peak {_fmt(plan.peak)}{times} per device ({plan.title.split(':')[0]}, {plan.when}) exceeds the "
        f"{_fmt(available)} available on {where}; "
        + ("settings that would fit:" if fit else f"none of the usual changes ({levers}) fits")
    ]
    lines += [f"  {cli}   ({_fmt(peak)})" for cli, peak in fit]
    if not fit:
        lines += [f"  the lightest, {cli}, still needs {_fmt(peak)}" for cli, peak in fixes[:1]]
    lines.append("plan=true prints the breakdown; memory_check=false runs anyway")
    raise MemoryPlanError("\n".join(lines))


# ---------------------------------------------------------------------------------------------- from settings
def _get(settings: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = settings
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def checkpoint_config(folder: str | Path) -> MusicFlamingoConfig:
    """A checkpoint folder's config as loading builds the model, for counting its parameters: with
    `tie_word_embeddings`, a folder that stores `language_model.lm_head.weight` is planned with that head as its own
    weight. `MusicFlamingo.from_pretrained` keeps a stored head apart when it differs from the embedding (and ties
    it again when equal), which only reading both tensors could tell: the header is read, no data, and the head
    counted (at worst V x D parameters too many, never too few). Our saves write the head whatever the flag. A
    folder whose weights cannot be listed is planned with the head too (loading then names what is wrong)."""
    from musicflamingo.checkpoint import CheckpointError, checkpoint_files, hf_to_ours, load_config

    config = load_config(folder)
    if not config.text.tie_word_embeddings:
        return config
    try:
        stored = any(hf_to_ours(name) == "lm_head.weight" for name in checkpoint_files(Path(folder)))
    except CheckpointError:
        stored = True
    return replace(config, text=replace(config.text, tie_word_embeddings=False)) if stored else config


def model_config(net: Mapping[str, Any]) -> MusicFlamingoConfig:
    """The config `model.net` describes (a checkpoint's config.json, or a preset and overrides), no weights."""
    if net.get("init_from"):
        from musicflamingo.model.build import check_trainable

        config = checkpoint_config(net["init_from"])
        check_trainable(config, net["init_from"])
        return config
    if not net.get("preset"):
        raise MemoryPlanError(
            "model.net: set either `init_from` (a checkpoint folder) or `preset` (tiny, small, ...)"
        )
    return MusicFlamingoConfig.from_name(net["preset"], **dict(net.get("overrides") or {}))


DEVICES_EXPECTED = "a number of processes >= 1, -1 or auto (every visible GPU), or a list of GPU indices"


def _devices(value: Any, device: str) -> int:
    """Processes per node `trainer.devices` starts, as Lightning counts them: a number, a list (or "0,1") of GPU
    indices, or -1 / "auto" for every visible GPU ("auto" on CPU: one). What Lightning refuses (0, an empty list,
    -2, 1.5, "two", GPU indices on CPU, repeated indices) is refused here, naming the setting."""

    def bad(why: str = "") -> MemoryPlanError:
        return MemoryPlanError(f"trainer.devices={value!r}: {why or 'expected ' + DEVICES_EXPECTED}")

    if isinstance(value, str):
        text = value.strip()
        if "," in text:  # "0,1": GPU indices
            parts = [v.strip() for v in text.split(",") if v.strip()]
            if not all(v.isdigit() for v in parts):
                raise bad()
            value_list: Any = [int(v) for v in parts]
        elif text.lstrip("-").isdigit():
            value_list = int(text)
        elif text == "auto":
            value_list = -1 if device == "cuda" else 1
        else:
            raise bad()
    else:
        value_list = value
    if isinstance(value_list, Sequence) and not isinstance(value_list, str):
        if not value_list or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value_list
        ):
            raise bad("expected a non-empty list of GPU indices (integers >= 0)")
        if device != "cuda":
            raise bad(
                "a list of GPU indices, but the run is on CPU (trainer.accelerator); give the number of processes"
            )
        if len(set(value_list)) != len(value_list):
            raise bad("a GPU index is listed twice")
        return len(value_list)
    if isinstance(value_list, bool) or not isinstance(value_list, int) or value_list == 0 or value_list < -1:
        raise bad()
    if value_list > 0:
        return value_list
    if device != "cuda":
        raise MemoryPlanError(f"trainer.devices={value} (every GPU) on CPU: give the number of processes")
    import torch

    count = torch.cuda.device_count()
    if count == 0:  # plan=true on a machine without the GPUs
        raise MemoryPlanError(
            f"trainer.devices={value}: every visible GPU, and none is visible here; give the number to plan for "
            "(trainer.devices=8)"
        )
    return count


# the `trainer.strategy` values the planner models (Lightning's names, or a `_target_`)
STRATEGIES_KNOWN = (
    "null, auto, single_device, ddp* or DDPStrategy (trainer=ddp), trainer=fsdp's fsdp_strategy"
)


def _strategy(value: Any, processes: int, strict: bool) -> str:
    """`single`, `ddp` or `fsdp` for `trainer.strategy`. With `strict`, a strategy whose memory the planner does
    not model (DeepSpeed, XLA, Lightning's FSDP without a wrapping policy: the whole model one unit) or that
    Lightning does not know is refused, naming it; without, it is planned as DDP (or one device). A DDP strategy
    named on one device is DDP all the same: Lightning wraps the model in DistributedDataParallel whatever the
    process count, and its reducer holds the gradient buckets with one process too (`auto` picks one device)."""
    default = "ddp" if processes > 1 else "single"
    if isinstance(value, Mapping):
        target = str(value.get("_target_", ""))
        if target == "musicflamingo.distributed.fsdp_strategy":  # one FSDP unit per block
            return "fsdp"
        name = target.rsplit(".", 1)[-1]
        if name in ("DDPStrategy", "SingleDeviceStrategy"):
            return "ddp" if name == "DDPStrategy" else "single"
        shown = target or dict(value)
    else:
        name = "auto" if value is None else str(value).strip().lower()
        if name in ("auto", "single_device"):
            return default
        if name.startswith("ddp"):
            return "ddp"
        shown = value
    if not strict:
        return default
    raise MemoryPlanError(
        f"trainer.strategy={shown!r}: the memory planner models {STRATEGIES_KNOWN} (Lightning's own fsdp, without "
        "a wrapping policy, gathers the whole model at once); use trainer=ddp or trainer=fsdp, or "
        "memory_check=false to run without the plan"
    )


def training_setup(
    settings: Mapping[str, Any], strict: bool = True
) -> tuple[MusicFlamingoConfig, TrainingSetup]:
    """(model config, setup) of a composed, resolved `configs/train.yaml`. `strict`: a `trainer.strategy` the
    planner does not model is refused (:func:`_strategy`); `check_training` drops it under `memory_check=false`."""
    import torch

    from musicflamingo.model.lora import check_lora_rank, check_lora_targets

    net = _get(settings, "model.net", {}) or {}
    config = model_config(net)
    accelerator = str(_get(settings, "trainer.accelerator", "cpu"))
    device = (
        "cuda"
        if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    devices = _devices(_get(settings, "trainer.devices", 1), device)
    nodes = _setting_int(settings, "trainer.num_nodes", 1, minimum=1)
    strategy_cfg = _get(settings, "trainer.strategy")
    strategy = _strategy(strategy_cfg, devices * nodes, strict)
    fsdp_ckpt = (
        isinstance(strategy_cfg, Mapping)
        and bool(strategy_cfg.get("activation_checkpointing", True))
        and strategy == "fsdp"
    )
    freeze = net.get("freeze") or {}
    lora = net.get("lora") or {}
    lora_on = bool(lora.get("enabled"))
    rank, targets = int(lora.get("rank", 8)), tuple(lora.get("targets") or ())
    if (
        lora_on
    ):  # settings.py checks the names; the rank against the layers is known only here, from the shapes
        try:
            check_lora_targets(targets)
            check_lora_rank(rank, {x: linear_shapes(config.text)[x][:2] for x in targets})
        except ValueError as e:
            raise MemoryPlanError(str(e)) from None
    if net.get("quantize_base") and strategy == "fsdp":
        raise MemoryPlanError(QLORA_FSDP.format(value=net["quantize_base"]))
    setup = TrainingSetup(
        precision=str(_get(settings, "trainer.precision", "32")),
        device=device,
        devices=devices,
        strategy=strategy,
        nodes=nodes,
        train_audio_tower=not freeze.get("audio_tower", False),
        train_projector=not freeze.get("multi_modal_projector", False),
        train_language_model=not freeze.get("language_model", False) and not lora_on,
        lora_rank=rank if lora_on else 0,
        lora_targets=targets if lora_on else (),
        # kept with LoRA off too: `alternatives` suggests enabling the adapters as configured
        lora_dropout=bool(lora.get("dropout") or 0),
        lora_configured=_configured_lora(config, rank, targets),
        quantize_base=net.get("quantize_base"),
        checkpointing=bool(net.get("gradient_checkpointing")) or fsdp_ckpt,
        tokens=int(_get(settings, "data.batch_max_tokens", 4096)),
        accumulate=int(_get(settings, "trainer.accumulate_grad_batches", 1) or 1),
        grpo=_grpo_setup(settings),
        packed=bool(_get(settings, "data.pack", False)),
        compiled=bool(net.get("compile")),
    )
    return config, setup


def _configured_lora(
    config: MusicFlamingoConfig, rank: int, targets: tuple[str, ...]
) -> tuple[int, tuple[str, ...]] | None:
    """The configured adapters (`model.net.lora.rank`, `.targets`) for `alternatives` to suggest; None (its default,
    rank 8 on q/k/v/o) when they would be refused: targets that are not the decoder's linears, or a rank above the
    narrowest one (the suggestion would not run; settings.py checks the names, the rank is known only here)."""
    from musicflamingo.model.lora import check_lora_rank, check_lora_targets

    if not targets:
        return None
    try:
        check_lora_targets(targets)
        check_lora_rank(rank, {x: linear_shapes(config.text)[x][:2] for x in targets})
    except ValueError:
        return None
    return rank, targets


def _grpo_setup(settings: Mapping[str, Any]) -> GRPOSetup | None:
    """`model.rollout` / `model.loss` of a GRPO run (`model._target_` names `GRPOLit`), else None."""
    if not str(_get(settings, "model._target_", "")).endswith("GRPOLit"):
        return None
    from musicflamingo.runtime import RuntimeConfigError, parse_dtype

    # The planner runs before GRPOLit exists, so it checks what it reads as GRPOLit will (the same bounds)
    slots = _get(settings, "model.rollout.slots")
    try:
        dtype = parse_dtype(_get(settings, "model.reference_dtype"))  # what GRPOLit casts its copy to
    except RuntimeConfigError as e:
        raise MemoryPlanError(f"model.reference_dtype: {e}") from None
    return GRPOSetup(
        group_size=_setting_int(settings, "model.rollout.group_size", 2, minimum=2),
        max_new_tokens=_setting_int(settings, "model.rollout.max_new_tokens", 512, minimum=1),
        slots=None if slots is None else _setting_int(settings, "model.rollout.slots", None, minimum=1),
        micro_batch_size=_setting_int(settings, "model.loss.micro_batch_size", 1, minimum=1),
        kl=_setting_number(settings, "model.loss.beta", 0.0, minimum=0.0) > 0,
        reference_bytes=None if dtype is None else dtype.itemsize,
    )


def _setting_int(settings: Mapping[str, Any], key: str, default: int | None, minimum: int) -> int:
    """The integer `key` of `settings` (`default` when absent), at least `minimum`; else a MemoryPlanError."""
    value = _get(settings, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MemoryPlanError(f"{key}={value!r}: expected an integer >= {minimum}")
    return value


def _setting_number(settings: Mapping[str, Any], key: str, default: float, minimum: float) -> float:
    """The finite number `key` of `settings` (`default` when absent), at least `minimum`; else a MemoryPlanError."""
    value = _get(settings, key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise MemoryPlanError(f"{key}={value!r}: expected a number >= {minimum}")
    return float(value)


def device_memory(device: str) -> int | None:
    """Bytes free on the device the run will use (`runtime.available_memory`); None when unknown."""
    import torch

    from musicflamingo.runtime import available_memory

    return available_memory(torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"))


def check_training(
    settings: Mapping[str, Any], available: Callable[[str], int | None] | None = None
) -> MemoryPlan:
    """The plan of a composed `configs/train.yaml`. Unless `plan` or `memory_check=false`, a MemoryPlanError when
    it does not fit the device's free memory (`available(device)`, default `device_memory`; processes on one CPU
    share its memory), listing the changes that would fit (`alternatives`)."""
    config, setup = training_setup(
        settings, strict=bool(settings.get("plan")) or settings.get("memory_check", True) is not False
    )
    plan = plan_training(config, setup)
    if settings.get("plan"):
        plan.notes += _training_fit(config, setup, plan, settings, available or device_memory)
        return plan
    if not settings.get("memory_check", True):
        return plan
    budget = (available or device_memory)(setup.device)
    processes = setup.devices if setup.device == "cpu" else 1
    if budget is not None and plan.peak * processes > budget:
        fixes = alternatives(config, setup, budget // processes)
        check_fits(plan, budget, setup.device, fixes, processes)
    return plan


def _plan_budget(
    settings: Mapping[str, Any], device: str, present: bool, free: Callable[[], int | None]
) -> tuple[int | None, str]:
    """(bytes per device `plan=true` compares with, where the number comes from): `plan_memory_gb`, else the free
    memory of the device here (`free()`), else :data:`DEVICE_MEMORY` for a device this machine does not have."""
    gb = settings.get("plan_memory_gb")
    if gb is not None:
        return int(gb * GB), f"plan_memory_gb={gb}"
    if present:
        return free(), "free here"
    default = DEVICE_MEMORY.get(device)
    return default, f"assumed for {device}; plan_memory_gb=N sets it"


def _training_fit(
    config: MusicFlamingoConfig,
    setup: TrainingSetup,
    plan: MemoryPlan,
    settings: Mapping[str, Any],
    available: Callable[[str], int | None],
) -> list[str]:
    """`plan=true`'s lines after the table: the devices planned for (present here or not), whether the peak fits
    their memory (:func:`_plan_budget`), and if not the settings that would."""
    import torch

    visible = torch.cuda.device_count() if setup.device == "cuda" else setup.devices
    where = f"{setup.devices} x {setup.device}" + (
        f" on each of {setup.nodes} nodes" if setup.nodes > 1 else ""
    )
    if visible < setup.devices:
        where += f" (not present here: {visible} visible)" if visible else " (not present here)"
    budget, source = _plan_budget(settings, setup.device, visible > 0, lambda: available(setup.device))
    if budget is None:
        return [f"planned for {where}"]
    processes = setup.devices if setup.device == "cpu" else 1  # processes on one CPU share its memory
    if plan.peak * processes <= budget:
        return [f"planned for {where}: fits the {_fmt(budget)} per device ({source})"]
    fixes = alternatives(config, setup, budget // processes)
    return [
        f"planned for {where}: does not fit the {_fmt(budget)} per device ({source}); settings that would fit:",
        *[f"  {cli}   ({_fmt(peak)})" for cli, peak in fixes if peak * processes <= budget],
    ]


def max_audio_seconds(folder: str | Path, config: MusicFlamingoConfig) -> float:
    """Seconds of audio a request may carry: the processor's `max_audio_len` (processor_config.json), whole windows."""
    seconds = 1200.0
    path = Path(folder) / "processor_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_audio_len")
    except (OSError, ValueError, AttributeError):
        value = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        # JSON's Infinity parses: no whole number of windows to plan for
        if not math.isfinite(value):
            raise MemoryPlanError(f"{path}: max_audio_len={value!r}: expected a finite number of seconds")
        seconds = float(value)
    window = config.window_seconds
    return max(1, int(seconds // window)) * window


def request_size(
    config: MusicFlamingoConfig, seconds: float | None, cap: float, text_chars: int = 0
) -> tuple[int, int]:
    """(prompt tokens, audio windows) of one request with `seconds` of audio (None: unknown, `cap` assumed): the
    `<sound>` tokens the processor makes for it (a short last window makes fewer; the encoder still runs it
    whole), a character of the prompt per token and `PROMPT_TEXT_TOKENS` of markup."""
    from musicflamingo.audio.features import SAMPLING_RATE, audio_token_count

    seconds = cap if seconds is None or not math.isfinite(seconds) else min(seconds, cap)
    if seconds <= 0:
        return PROMPT_TEXT_TOKENS + text_chars, 0
    windows = max(1, math.ceil(seconds / config.window_seconds))
    samples = max(1, round(seconds * SAMPLING_RATE))
    tokens = audio_token_count(samples, config.window_seconds, cap)
    return PROMPT_TEXT_TOKENS + text_chars + tokens, windows


@dataclass(frozen=True)
class GenerationKnobs:
    """The setting names of an entry point's generation levers, for the refusals' suggestions."""

    batch: str = "batch_size"
    new_tokens: str = "max_new_tokens"
    queue: str | None = None  # serve.py's max_queue: waiting requests keep their features (CPU)

    def levers(self) -> str:
        """What the refusals try, for the line that says none of it fits."""
        queue = f", {self.queue}" if self.queue else ""
        return f"dtype, quantize, {self.batch}{queue} and {self.new_tokens}, alone or together"


def generation_alternatives(
    plan_for: Callable[..., MemoryPlan],
    config: MusicFlamingoConfig,
    nbytes: int,
    quantize: str | None,
    slots: int,
    new_tokens: int,
    budget: int,
    knobs: GenerationKnobs = GenerationKnobs(),
    queued: int = 0,
) -> list[tuple[str, int]]:
    """Settings predicted to fit `budget` with their peaks: bfloat16, a lighter quantization (unless the checkpoint
    is quantized: it cannot be re-quantized), the largest smaller batch, the largest smaller token budget. When no
    change alone fits: the weights' changes each with the largest smaller batch (then token budget) that fits, a
    heavier one listed only when it allows more (as `alternatives` does for training); when nothing fits, the
    lightest of them all, which does not fit (`check_fits` says so).
    `plan_for(nbytes=, slots=, new_tokens=, quantize=)` plans one change."""
    fixes = []
    weights: list[tuple[str, dict[str, Any]]] = [("", {})]
    if nbytes > 2:
        weights.append(("dtype=bfloat16", {"nbytes": 2}))
        peak = plan_for(nbytes=2).peak
        if peak <= budget:
            fixes.append(("dtype=bfloat16", peak))
    methods = ("int8", "int4")
    lighter = () if config.quantization else methods[methods.index(quantize) + 1 if quantize else 0 :]
    weights += [(f"quantize={method}", {"nbytes": 2, "quantize": method}) for method in lighter]
    for method in lighter:
        peak = plan_for(nbytes=2, quantize=method).peak
        if peak <= budget:  # the lighter of the two that fits
            fixes.append((f"quantize={method}", peak))
            break
    batches = [n for n in sorted({slots // 2, slots // 4, slots // 8, 1}, reverse=True) if 1 <= n < slots]
    tokens = [
        n
        for n in sorted({new_tokens // 2, new_tokens // 4, new_tokens // 8, 256, 64}, reverse=True)
        if 1 <= n < new_tokens
    ]
    for n in batches:
        peak = plan_for(slots=n).peak
        if peak <= budget:
            fixes.append((f"{knobs.batch}={n}", peak))
            break
    for n in tokens:
        peak = plan_for(new_tokens=n).peak
        if peak <= budget:
            fixes.append((f"{knobs.new_tokens}={n}", peak))
            break
    for n in sorted({queued // 2, queued // 4, queued // 8, 1}, reverse=True) if knobs.queue else ():
        if 1 <= n < queued:
            peak = plan_for(queued=n).peak
            if peak <= budget:
                fixes.append((f"{knobs.queue}={n}", peak))
                break
    if not fixes:
        # a 20-minute song at batch 32 on one GPU: neither bfloat16, int8 nor a smaller batch alone (was: "none of
        # the usual changes", training's levers named); the answers' length is cut last
        best = (0, 0)  # (tokens, batch) of the last listed
        for cli, change in weights:
            for t, n in ((t, n) for t in [new_tokens, *tokens] for n in [slots, *batches]):
                if (t, n) <= best:
                    break
                if (t, n) == (new_tokens, slots):  # this change alone: planned above
                    continue
                peak = plan_for(**change, slots=n, new_tokens=t).peak
                if peak <= budget:
                    parts = [cli] * bool(cli) + [f"{knobs.batch}={n}"] * (n != slots)
                    parts += [f"{knobs.new_tokens}={t}"] * (t != new_tokens)
                    fixes.append((" ".join(parts), peak))
                    best = (t, n)
                    break
        if not fixes and (batches or tokens or len(weights) > 1):
            cli, change = weights[-1]
            n, t = min([slots, *batches]), min([new_tokens, *tokens])
            parts = [cli] * bool(cli) + [f"{knobs.batch}={n}"] * (n != slots)
            parts += [f"{knobs.new_tokens}={t}"] * (t != new_tokens)
            fixes.append((" ".join(parts), plan_for(**change, slots=n, new_tokens=t).peak))
    return fixes


def check_generation(
    settings: Mapping[str, Any],
    ckpt: str | Path,
    audio_seconds: Sequence[float | None],
    *,
    prompt_chars: int = 0,
    slots: int = 1,
    new_tokens: int = 1024,
    embed_batch: bool = False,
    available: Callable[[Any], int | None] | None = None,
    serving: Mapping[str, Any] | None = None,
) -> MemoryPlan:
    """The generation plan of `ckpt` (its config.json only) for requests with `audio_seconds` of audio each (None:
    unknown, the processor's maximum) on `settings`' device and dtype. Unless `plan` or `memory_check=false`, a
    MemoryPlanError when it does not fit the device's free memory, listing a dtype, quantization, batch size or
    token budget that would (`plan=true` lists them under the table). `serving` (see `check_serving`): a server's
    worst case, `prepared` queued requests besides."""
    import torch

    from musicflamingo.model.quantize import load_method
    from musicflamingo.runtime import RuntimeConfigError, available_memory, resolve_device_dtype

    config = checkpoint_config(ckpt)
    device, dtype = settings.get("device", "auto"), settings.get("dtype", "auto")
    quantize = load_method(settings.get("quantize"), config.quantization, str(ckpt))  # what loading will run
    try:  # the dtype loading will use (`auto` may fall back to bfloat16 when float32 weights do not fit)
        dev, dt = resolve_device_dtype(device, dtype, config.num_parameters(), quantize)
    except RuntimeConfigError:
        # the weights alone do not fit (the runtime's message says so, or the plan shows it), or the device is not
        # on this machine: plan=true plans for it all the same
        if not settings.get("plan"):
            raise
        dev, dt = _requested_device_dtype(device, dtype, quantize)
    serving = dict(serving or {})
    knobs = GenerationKnobs(**serving.pop("knobs", {}))
    if serving:
        # requests come and go for as long as the server runs: later ones meet the cache at its largest
        prompt, windows, requests = serving["prompt_tokens"], serving["windows"], serving["slots"] + 1
        seconds = windows * config.window_seconds
    else:
        cap = max_audio_seconds(ckpt, config)
        sizes = [request_size(config, x, cap, prompt_chars) for x in audio_seconds] or [
            (PROMPT_TEXT_TOKENS, 0)
        ]
        prompt, windows, requests = max(t for t, _ in sizes), max(w for _, w in sizes), len(sizes)
        seconds = max(
            (cap if x is None or not math.isfinite(x) else min(x, cap)) for x in audio_seconds or [0.0]
        )

    longest = new_tokens

    def plan_for(
        nbytes: int = dt.itemsize, slots: int = min(slots, requests), new_tokens: int = new_tokens, **kw: Any
    ) -> MemoryPlan:
        # a server's `new_tokens` is the longest sequence of a slot (max_cached_tokens), its prompt within it
        first = min(prompt, new_tokens - 1) if serving else prompt
        return plan_inference(
            config,
            dtype_bytes=nbytes,
            slots=slots,
            prompt_tokens=first,
            new_tokens=new_tokens - first if serving else new_tokens,
            windows=windows,
            embed_batch=embed_batch,
            device=dev.type,
            quantize=kw.get("quantize", quantize),
            requests=max(requests, slots),
            audio_seconds=seconds,
            prepared=kw.get("queued", queued) + (slots if serving else 0),
            extracting=serving.get("extracting", 1),
            any_split=bool(serving),
            # a server's bound; an alternative with fewer tokens than the longest is max_cached_tokens=new_tokens
            cache_positions=new_tokens
            if serving and new_tokens < longest
            else serving.get("cache_positions"),
            compiled=bool(serving.get("compiled")),
        )

    slots = max(1, min(slots, requests))
    queued = serving.get("queued", 0)
    nbytes = dt.itemsize
    plan = plan_for(nbytes, slots)

    def fixes(budget: int) -> list[tuple[str, int]]:
        return generation_alternatives(
            plan_for, config, nbytes, quantize, slots, new_tokens, budget, knobs, queued
        )

    if settings.get("plan"):
        present = dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available())
        budget, source = _plan_budget(
            settings, dev.type, present, lambda: (available or available_memory)(dev)
        )
        where = f"{dev}" + ("" if present else " (not present here)")
        if budget is None:
            plan.notes.append(f"planned for {where}")
        elif plan.peak <= budget:
            plan.notes.append(f"planned for {where}: fits the {_fmt(budget)} per device ({source})")
        else:
            tried = fixes(budget)
            fit = [(cli, peak) for cli, peak in tried if peak <= budget]
            plan.notes.append(
                f"planned for {where}: does not fit the {_fmt(budget)} per device ({source})"
                + ("; settings that would fit:" if fit else f"; none of {knobs.levers()} fits")
            )
            plan.notes += [f"  {cli}   ({_fmt(peak)})" for cli, peak in fit]
            if not fit:
                plan.notes += [f"  the lightest, {cli}, still needs {_fmt(peak)}" for cli, peak in tried[:1]]
        return plan
    if not settings.get("memory_check", True):
        return plan
    budget = (available or available_memory)(dev)
    if budget is None or plan.peak <= budget:
        return plan
    check_fits(plan, budget, str(dev), fixes(budget), levers=knobs.levers())
    return plan


def check_serving(
    settings: Mapping[str, Any], ckpt: str | Path, available: Callable[[Any], int | None] | None = None
) -> MemoryPlan:
    """The plan of a `configs/serve.yaml`-shaped server of `ckpt`: `max_batch` slots whose cache grows to the
    longest sequence one request may reach (its prompt + max_tokens, at most the context: every slot is as long as
    the longest), or with `max_cached_tokens` a cache fitted within that many positions in all, a prompt of `max_prompt_tokens` with audio of `max_audio_seconds`
    prefilled into it, and on a CPU `prepare_threads` requests' features made at once and `max_queue` waiting.
    Refused as `check_generation` refuses, naming max_batch, max_completion_tokens, dtype or quantize."""
    config = checkpoint_config(ckpt)
    context = max(config.text.max_position_embeddings, 1)

    def setting(name: str, default: Any) -> Any:
        value = settings.get(name)
        return default if value is None else value

    cap = max_audio_seconds(ckpt, config)
    seconds = min(float(setting("max_audio_seconds", cap)), cap)
    windows = max(1, math.ceil(seconds / config.window_seconds))
    prompt = min(int(setting("max_prompt_tokens", context - 1)), context - 1)
    longest = prompt + int(setting("max_completion_tokens", context - 1))
    if settings.get("max_cached_tokens") is not None:
        longest = min(longest, int(settings["max_cached_tokens"]))
    longest = min(longest, context)
    serving = {
        "prompt_tokens": prompt,
        "windows": windows,
        "slots": int(setting("max_batch", 8)),
        # requests waiting in the queue, and those decoding, keep their features (the job holds them)
        "queued": int(setting("max_queue", 64)),
        "extracting": int(setting("prepare_threads", 4)),
        # max_cached_tokens bounds one request's prompt + answer too, and the cache's positions in all
        "knobs": {"batch": "max_batch", "new_tokens": "max_cached_tokens", "queue": "max_queue"},
        "cache_positions": settings.get("max_cached_tokens"),
        "compiled": bool(settings.get("compile")),
    }
    plan = check_generation(
        settings,
        ckpt,
        [seconds],
        slots=serving["slots"],
        new_tokens=max(2, longest),
        available=available,
        serving=serving,
    )
    return plan


def _requested_device_dtype(device: Any, dtype: Any, quantize: str | None):  # noqa: ANN202 (torch imported lazily)
    """`plan=true`: the device and dtype a run would use, the device possibly not on this machine (`auto` dtype:
    bfloat16 on CUDA or with `quantize`, float32 elsewhere, as `runtime.resolve_device_dtype` without its memory
    check)."""
    import torch

    from musicflamingo.runtime import RuntimeConfigError, parse_dtype, resolve_device_dtype

    try:
        return resolve_device_dtype(device, dtype, quantize=quantize)
    except RuntimeConfigError:
        dev = torch.device(
            str(device)
        )  # a CUDA or MPS device absent here (settings.py refused anything else)
        dt = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" or quantize else torch.float32)
        return dev, dt
