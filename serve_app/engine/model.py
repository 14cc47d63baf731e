"""The streaming model: upstream's sampler built for a variant, with jitted entry points.

One `StreamingModel` holds the Flax module and its weights. Its functions are
pure and batch-size agnostic: `init_state` makes one session's state (batch 1, its
own seed), `step` advances a batch of states by one frame and returns int16 audio
and the frame's codes, never the per-layer emits upstream's system returns. All
take `weights`, the parameters as the step reads them: on CPU some are stored
transposed and the step's transposed convolutions are rewritten (`cpu_tuning`);
where the model computes in bfloat16, the float32 weights it only converts are
stored converted, and no float32 copy is kept.

Teacher forcing (jamming on a loop): upstream's JAX sampler has no forced tokens,
so `step` takes per-row forced codes. A forced row runs the temporal transformer on
its previous frame as usual (that is what fills its attention caches), then takes
the given codes instead of its samples as "the frame just generated", and decodes
them, so the codec's streaming state follows the loop too. This is the MLX
backend's `forced_tokens`, built from the same layers. `prefill` forces a run of K
frames in one call to the same state (to float rounding): the frames a loop puts
into the context are known in advance, so the temporal transformer takes them all
at once, as in training, instead of one per step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import sequence_layers.jax as sl
from magenta_rt.jax import system as upstream_system

from . import cpu_tuning, exported
from .device import on_cpu
from .run_once import run_once
from .sampling import with_fast_sampling
from .session import CODE_LEVELS
from .variants import FRAME_SAMPLES, Variant
from .weight_layout import WeightLayout

log = logging.getLogger(__name__)

CONDITIONING_TOKENS = 144
Params = dict[str, Any]
State = Any


def build_sampler(
    variant: Variant, *, compute_dtype=None, fast_sampling: bool = True
) -> upstream_system.MagentaRT2Sampler:
    """Upstream's `MagentaRT2Sampler` (depthformer + codec decoder) for a variant."""
    model = variant.model()
    if compute_dtype is not None:
        model.compute_dtype = compute_dtype
    depthformer_config = model.depthformer_config()
    if fast_sampling:
        depthformer_config = with_fast_sampling(depthformer_config)
    return upstream_system.MagentaRT2Sampler.Config(
        depthformer=depthformer_config, spectrostream=variant.codec_config()
    ).make()


def _with_values(seq, values):
    return type(seq)(values, seq.mask)


def _step_forcing(sampler, block, state, constants, forced_unique, force):
    """The sampler's serial step with the depthformer's output overridden on forced rows."""
    depthformer, *rest = sampler.layers
    codes, df_state = depthformer.step(block, state[0], training=False, constants=constants)
    row = force[:, None, None]
    values = jnp.where(row, forced_unique[:, None, :].astype(codes.values.dtype), codes.values)
    codes = _with_values(codes, values)
    encoder_state, previous_output, (rng, previous_frame, temporal, count), delay = df_state
    df_state = (encoder_state, _with_values(previous_output, values),
                (rng, _with_values(previous_frame, values), temporal, count), delay)
    x, decoder_state = decode_step(rest, codes, state[1:], constants)
    return x, values[:, 0, :], (df_state, *decoder_state)


def _prefill_forcing(sampler, block, state, forced_unique):
    """`_step_forcing` for a run of forced frames at once, to the same state.

    A forced frame's depthformer output is thrown away, so only what feeds the state
    is computed: the temporal transformer over all the frames together (its input
    for frame t is frame t-1, known in advance), the codec decoder over all their
    codes, and the per-frame RNG fold-ins the depth sampler would have made. The
    depth transformer, 12 sequential passes per frame, does not run at all."""
    depthformer, *rest = sampler.layers
    decoder = depthformer.decoder
    encoder_state, previous_output, (rng, previous_frame, temporal, count), delay = state[0]
    encoded, encoder_state = depthformer.encoder.body.step(
        block, encoder_state, training=False, constants={})
    inputs = jnp.concatenate([previous_frame.values, forced_unique[:, :-1]], axis=1)
    embedded = decoder.embedder(sl.Sequence.from_values(inputs), training=False)
    _, temporal = decoder.temporal_body.step(
        embedded.apply_values(jnp.mean, axis=-2), temporal, training=False,
        constants={depthformer.conditioning_name: encoded})

    def fold_in_frame(carry, _):
        rng, count = carry
        for _level in range(decoder.config.num_codebooks):  # as the depth sampler does
            rng = jax.vmap(jax.random.fold_in)(rng, count)
        return (rng, count + 1), None

    (rng, count), _ = jax.lax.scan(fold_in_frame, (rng, count), None, length=block.shape[1])
    last = forced_unique[:, -1:].astype(previous_frame.values.dtype)
    # `delay`, upstream's encoder-lookahead countdown, is 0 for these models and stays 0
    df_state = (encoder_state, _with_values(previous_output, last),
                (rng, _with_values(previous_frame, last), temporal, count), delay)
    codes = sl.Sequence.from_values(forced_unique.astype(previous_frame.values.dtype))
    x, decoder_state = decode_step(rest, codes, state[1:], {})
    return x, (df_state, *decoder_state)


def decode_step(layers, codes, states, constants):
    """The sampler's layers after the depthformer (the codec decoder): one frame of
    codes -> audio, each layer with its own streaming state."""
    x, new_states = codes, []
    for layer, layer_state in zip(layers, states, strict=True):
        x, layer_state = layer.step(x, layer_state, training=False, constants=constants)
        new_states.append(layer_state)
    return x, new_states


def _input_spec() -> sl.ChannelSpec:
    return sl.ChannelSpec([CONDITIONING_TOKENS], jnp.int32)


def dummy_inputs(batch: int) -> tuple[sl.Sequence, dict[str, jax.Array]]:
    """`neutral_step_inputs` in upstream's form (a one-frame block and the sampling
    constants): what init and benchmarks trace with (only shapes and dtypes matter)."""
    tokens, temperature, top_k, *_ = neutral_step_inputs(batch)
    block = sl.Sequence.from_values(jnp.asarray(tokens)[:, None, :])
    return block, {"temperature": jnp.asarray(temperature), "top_k": jnp.asarray(top_k)}


def neutral_step_inputs(rows: int) -> tuple[np.ndarray, ...]:
    """`StreamingModel.step`'s per-row inputs (tokens, temperature, top_k, active,
    forced, force) for `rows` rows stepping freely: for warm-up and tracing."""
    return (
        np.zeros((rows, CONDITIONING_TOKENS), np.int32),
        np.ones(rows, np.float32),
        np.full(rows, 40, np.int32),
        np.ones(rows, bool),
        np.zeros((rows, CODE_LEVELS), np.int32),
        np.zeros(rows, bool),
    )


def _config_text(sampler) -> str:
    """The sampler's whole config, without the addresses its functions print with."""
    return re.sub(r" at 0x[0-9a-f]+", "", repr(sampler.cfg))


def _init_variables(module, block, constants):
    state = module.get_initial_state(
        block.shape[0], _input_spec(), training=False, constants=constants
    )
    return module.step(block, state, training=False, constants=constants)


def random_params(sampler, seed: int = 0) -> Params:
    """Random parameters with the exact tree of a real checkpoint (for tiny and benchmarks)."""
    block, constants = dummy_inputs(1)
    rngs = {"params": jax.random.PRNGKey(seed), "random": jax.random.PRNGKey(seed)}
    return nn.unbox(run_once(
        lambda r: sampler.init(r, block, constants, method=_init_variables), rngs))


def expected_param_shapes(sampler) -> Params:
    """The parameter tree a checkpoint must provide, as ShapeDtypeStructs (no compute)."""
    block, constants = dummy_inputs(1)
    rngs = {"params": jax.random.PRNGKey(0), "random": jax.random.PRNGKey(0)}
    shapes = jax.eval_shape(
        lambda r: sampler.init(r, block, constants, method=_init_variables), rngs
    )
    return nn.unbox(shapes)


@dataclasses.dataclass
class StreamingModel:
    """A variant's sampler and its weights, with jitted init/step/prefill functions.

    `params` (the checkpoint's tree) is only read to make `weights`, the one copy kept:
    every jitted function takes `weights` (`WeightLayout.reading`)."""

    variant: Variant
    sampler: Any
    params: dataclasses.InitVar[Params]
    # Rewrite the step for XLA:CPU (cpu_tuning); None: when JAX's backend is the CPU.
    # After construction it says what was done.
    tune_for_cpu: bool | None = None
    # Store the weights a bfloat16 model only converts already converted (weight_layout);
    # False keeps them as loaded (benchmarks' before/after).
    narrow_weights: bool = True

    def __post_init__(self, params: Params) -> None:
        sampler = self.sampler
        self.decoder_delay_frames = self.variant.decoder_delay_frames

        def init_state(params: Params, seed: jax.Array) -> State:
            state = sampler.apply(
                params,
                1,
                _input_spec(),
                training=False,
                constants={},
                rngs={"random": jax.random.PRNGKey(seed)},
                method=sampler.get_initial_state,
            )
            # Upstream's SOS frame is weakly typed; the step returns it strongly typed.
            # Matching types keeps each bucket at exactly one compiled step.
            return jax.tree.map(lambda a: jax.lax.convert_element_type(a, a.dtype), state)

        reserved = sampler.cfg.depthformer.decoder.num_reserved_tokens
        codebook = sampler.cfg.depthformer.decoder.codebook_size
        offsets = reserved + codebook * jnp.arange(
            sampler.cfg.depthformer.decoder.num_codebooks, dtype=jnp.int32)

        def step(params, tokens, temperature, top_k, active, forced, force, state):
            """tokens [B,144] int32 -> (audio [B,1920,2] int16, codes [B,12], new state).

            Rows where `active` is False keep their state: a paced session that is
            not due yet shares the batch without advancing. Rows where `force` is
            True take `forced` (SpectroStream codes [B,12], 0..1023) as their frame.
            Returned codes are in the same SpectroStream form.
            """
            block = sl.Sequence.from_values(tokens[:, None, :])
            constants = {"temperature": temperature, "top_k": top_k}
            out, unique, new_state = sampler.apply(
                params, block, state, constants, forced + offsets, force,
                method=_step_forcing,
            )
            codes = (unique - reserved) % codebook

            def keep_inactive(new, old):
                mask = active.reshape(active.shape + (1,) * (new.ndim - 1))
                return jnp.where(mask, new, old)

            return out.values, codes, jax.tree.map(keep_inactive, new_state, state)

        def prefill(params, tokens, forced, state):
            """tokens [1,K,144], forced codes [1,K,12] -> (their audio [1,K*1920,2] int16,
            the state K forced steps would leave). Compiled once per K."""
            block = sl.Sequence.from_values(tokens)
            out, new_state = sampler.apply(params, block, state, forced + offsets,
                                           method=_prefill_forcing)
            return out.values, new_state

        if self.tune_for_cpu is None:
            self.tune_for_cpu = on_cpu()
        seed = jax.ShapeDtypeStruct((), jnp.uint32)
        state = jax.eval_shape(init_state, params, seed)
        run = [jax.ShapeDtypeStruct((1, 2, width), jnp.int32)
               for width in (CONDITIONING_TOKENS, CODE_LEVELS)]
        # A replica start reads the weights' layout, each bucket's step and each run's
        # prefill traced (`exported`); the salt is what their closures hold beyond the
        # arguments.
        salt = "|".join(map(str, (self.variant.name, self.tune_for_cpu, _config_text(sampler))))
        tuned, self._layout = cpu_tuning.tune(
            step, params, *neutral_step_inputs(1), state, enabled=self.tune_for_cpu,
            narrow=self.narrow_weights, salt=salt,
            readers=[(prefill, (*run, state)), (init_state, (seed,))],
        )
        self._keep(params)
        salt = f"{salt}|{self._layout.describe()}"
        self._restore = jax.jit(self._layout.restore)  # tools' `restored_params`
        self.init_state = jax.jit(self._layout.reading(init_state))
        self.prefill = exported.jit(self._layout.reading(prefill), salt=salt,
                                    donate_argnums=(3,))
        self.step = exported.jit(tuned, salt=salt, donate_argnums=(7,))

    def _keep(self, params: Params) -> None:
        """Keeps `params` (on the host, as `weights.load` reads them, or already on the
        device) as the functions read them (`weights`, on the device), and the codec's
        codebooks as trained: the loop encoder's nearest-codeword search reads them
        (`codec.AudioEncoder`; from the host, a copy of their own: 12 x 1024 x width)."""
        self.weights = jax.device_put(self._layout.prepare(params))
        self.codebooks = jax.device_put(params["params"]["soundstream"]["quantizer"])

    @property
    def layout(self) -> WeightLayout:
        """How `weights` were made from `params` (which are permuted, which narrowed)."""
        return self._layout

    @property
    def frame_samples(self) -> int:
        return FRAME_SAMPLES

    def with_params(self, params: Params) -> StreamingModel:
        """The same model with other weights of the same shapes. The jitted functions
        are shared, so nothing recompiles: this is what makes a hot swap free."""
        other = copy.copy(self)
        other._keep(params)
        return other

    def restored_params(self) -> Params:
        """The checkpoint's tree made again from `weights`, for tools (benchmarks'
        before/after, tests): a new copy on the device. Exact, except that narrowed
        weights keep the precision they are stored in."""
        return self._restore(self.weights)

    def state_at(self, seed: int) -> State:
        return self.on_device(self.init_state(self.weights, jnp.asarray(seed, jnp.uint32)))

    def on_device(self, state: State) -> State:
        """`state` committed to the device the weights are on. A jit specializes on
        whether its inputs are committed, and what an exported step returns always is
        (`exported`): every state starts committed, so that warm-up compiles the variant
        the steps after it take, and none compiles while serving."""
        (device,) = jax.tree.leaves(self.weights)[0].devices()
        return jax.device_put(state, device)


